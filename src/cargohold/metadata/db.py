"""The metadata database: one SQLite file in WAL mode, one connection per thread, versioned migrations."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cargohold.errors import FailedPreconditionError
from cargohold.metadata.schema import MIGRATIONS, SCHEMA_VERSION

DEFAULT_NAMESPACE = "default"


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_text(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def from_text(text: str) -> datetime:
    return datetime.fromisoformat(text)


def dump_labels(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"))


def load_labels(text: str) -> dict[str, str]:
    value = json.loads(text or "{}")
    return {str(k): str(v) for k, v in value.items()}


class MetadataDB:
    """Owns the SQLite file. Each thread gets its own connection; writes go through ``transaction()``.

    ``transaction()`` takes SQLite's write lock up front (BEGIN IMMEDIATE) so read-modify-write sequences are
    atomic across threads and processes; ``busy_timeout`` makes a second writer wait instead of failing.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Every thread's connection with its thread, for close() and to close those of threads that ended:
        # the count stays bounded by the live threads that used the database.
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._all_lock = threading.Lock()
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._all_lock:
                ended = [c for t, c in self._all if not t.is_alive()]
                self._all = [(t, c) for t, c in self._all if t.is_alive()]
                self._all.append((threading.current_thread(), conn))
            for old in ended:
                old.close()
        return conn

    def _migrate(self) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            current = row["version"] if row else 0
            if current > SCHEMA_VERSION:
                raise FailedPreconditionError(
                    f"{self.path}: metadata schema version {current} is newer than this cargohold "
                    f"({SCHEMA_VERSION}); upgrade cargohold"
                )
            # Statements are split on ";" so they run inside this transaction (executescript would commit).
            for version, script in MIGRATIONS:
                if version <= current:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                current = version
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (current,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested calls join the outer one."""
        conn = self.conn
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield conn
            finally:
                self._local.depth = depth
            return
        conn.execute("BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            self._local.depth = 0

    def query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def ensure_namespace(self, namespace: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO namespaces (name, created_at) VALUES (?, ?)",
                (namespace, to_text(utcnow())),
            )

    def namespaces(self) -> list[str]:
        return [r["name"] for r in self.query("SELECT name FROM namespaces ORDER BY name")]

    def close(self) -> None:
        """Close every thread's connection (threads still using the database reconnect)."""
        with self._all_lock:
            conns, self._all = self._all, []
        for _, conn in conns:
            conn.close()
        self._local.conn = None
