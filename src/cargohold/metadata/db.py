"""The metadata database: one SQLite file in WAL mode, one connection per thread, versioned migrations."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cargohold.errors import CargoholdError, FailedPreconditionError, NoSpaceError, UnavailableError
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


#: Seconds a command waits for another process's write transaction before giving up (config ``lock_timeout``).
DEFAULT_LOCK_TIMEOUT = 30.0
#: Seconds of waiting before the user is told why nothing happens.
LOCK_NOTICE_AFTER = 3.0
# Space set aside next to the database (``metadata.db-reserve``) for the writes that free space: an
# ``images rm`` or ``gc`` on a disk with no byte left still needs a few WAL pages. Released when a write
# transaction that frees space starts with less than this free; made again after a write when there is room.
RESERVE_SIZE = 1 << 20
# In WAL mode SQLite's writer lock is one byte of the -shm file: WALINDEX_LOCK_OFFSET (120) + WAL_WRITE_LOCK (0).
_WAL_WRITE_LOCK_BYTE = 120

log = logging.getLogger(__name__)


def lock_holder(db_path: Path) -> int | None:
    """The pid holding SQLite's write lock on ``db_path`` (its ``-shm`` byte 120), read from /proc/locks.

    Reading /proc/locks needs no file descriptor: opening and closing the -shm file ourselves would drop this
    process's own POSIX locks on it (fcntl locks belong to the process, not the descriptor).
    """
    try:
        st = os.stat(f"{db_path}-shm")
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        fields = line.split()
        # "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 120 120" (blocked waiters are marked "->" and skipped)
        if len(fields) < 8 or fields[1] == "->" or fields[5] != ident or fields[3] != "WRITE":
            continue
        try:
            first = int(fields[6])
            last = int(fields[7]) if fields[7] != "EOF" else _WAL_WRITE_LOCK_BYTE
            pid = int(fields[4])
        except ValueError:
            continue
        if first <= _WAL_WRITE_LOCK_BYTE <= last and pid > 0:
            return pid
    return None


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text


def _is_out_of_space(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "disk is full" in text or "disk i/o error" in text


def _translate(exc: sqlite3.Error, path: Path, operation: str) -> CargoholdError:
    """The one place a sqlite3 error becomes a cargohold error naming the database and the operation."""
    text = str(exc)
    lower = text.lower()
    where = f"metadata database {path}: {operation}"
    if _is_busy(exc):
        return UnavailableError(f"{where}: the database is locked by another process")
    if "disk is full" in lower:
        return NoSpaceError(f"{where}: {text}: {os.strerror(errno.ENOSPC)} (free space on {path.parent} and retry)")
    if "disk i/o error" in lower:
        return UnavailableError(f"{where}: {text} (free space on {path.parent} and retry)")
    if "readonly" in lower or "read-only" in lower:
        return FailedPreconditionError(f"{where}: {text}")
    if "unable to open" in lower:
        return FailedPreconditionError(f"{where}: {text} (check that {path.parent} exists and is writable)")
    if "malformed" in lower or "not a database" in lower:
        return FailedPreconditionError(f"{where}: {text} (the file is damaged)")
    return FailedPreconditionError(f"{where}: {text}")


class MetadataDB:
    """Owns the SQLite file. Each thread gets its own connection; writes go through ``transaction()``.

    ``transaction()`` takes SQLite's write lock up front (BEGIN IMMEDIATE) so read-modify-write sequences are
    atomic across threads and processes. A second writer waits at most ``lock_timeout`` seconds (telling the user
    after a few seconds who holds the lock), then gets an UnavailableError naming the database and the holder.
    Opening never writes unless the schema must change, so a full disk never stops the commands that free space.
    """

    def __init__(self, path: Path | str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = Path(path)
        self.lock_timeout = max(0.0, float(lock_timeout))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Every thread's connection with its thread, for close() and to close those of threads that ended:
        # the count stays bounded by the live threads that used the database.
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._all_lock = threading.Lock()
        try:
            self._migrate()
        except BaseException:
            self.close()  # an exclusive-mode connection (full disk) would otherwise block the next opener
            raise

    def _connect(self) -> sqlite3.Connection:
        with self.errors("open"):
            try:
                return self._open(exclusive=False)
            except sqlite3.OperationalError as exc:
                if not _is_out_of_space(exc):
                    raise
            # A WAL database closed cleanly has no -shm file, and creating one needs free blocks. In EXCLUSIVE
            # locking mode SQLite keeps the WAL index in this process's memory instead, so a full disk still
            # opens (other processes wait until this command ends, which is bounded by their lock_timeout).
            log.warning("metadata database %s: the disk is full; opened without shared memory", self.path)
            return self._open(exclusive=True)

    def _open(self, *, exclusive: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.lock_timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            if exclusive:
                conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # must precede the first access
            # Asking for WAL when the file is in WAL mode already is a read: no write on a full disk.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self.lock_timeout * 1000)}")
        except BaseException:
            conn.close()
            raise
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

    @contextmanager
    def errors(self, operation: str) -> Iterator[None]:
        """Turn sqlite3 errors raised inside into cargohold errors naming this database and ``operation``."""
        try:
            yield
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, operation) from exc

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
        if exists is None:
            return 0
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row["version"]) if row else 0

    def _migrate(self) -> None:
        conn = self.conn
        # Read the version without taking the write lock: an up-to-date database is never written on open.
        with self.errors("read the schema version"):
            current = self._schema_version(conn)
        self._check_not_newer(current)
        if current == SCHEMA_VERSION:
            return
        try:
            self._begin_immediate(conn, "upgrade the schema")
            try:
                current = self._schema_version(conn)  # another process may have migrated meanwhile
                self._check_not_newer(current)
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
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
                self._rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise FailedPreconditionError(
                f"metadata database {self.path} needs a schema upgrade to version {SCHEMA_VERSION} and it could "
                f"not be written: {exc}"
            ) from exc
        except UnavailableError as exc:
            raise UnavailableError(
                f"metadata database {self.path} needs a schema upgrade to version {SCHEMA_VERSION}: {exc}"
            ) from exc

    def _check_not_newer(self, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise FailedPreconditionError(
                f"{self.path}: metadata schema version {current} is newer than this cargohold "
                f"({SCHEMA_VERSION}); upgrade cargohold"
            )

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        # A failed COMMIT (full disk) or statement may already have ended the transaction; a ROLLBACK then
        # raises "no transaction is active" and would hide the real error.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("rollback failed on %s", conn, exc_info=True)

    def _begin_immediate(self, conn: sqlite3.Connection, operation: str) -> None:
        """BEGIN IMMEDIATE, waiting at most ``lock_timeout`` for another writer and saying so after a few seconds.

        SQLite's own busy handler waits silently; it gets slices of the wait so the notice can be printed.
        Raises UnavailableError naming the database and, when /proc/locks tells, the holding pid.
        """
        deadline = time.monotonic() + self.lock_timeout
        notice_at = time.monotonic() + LOCK_NOTICE_AFTER
        noticed = False
        try:
            while True:
                now = time.monotonic()
                wait_until = deadline if noticed else min(deadline, notice_at)
                conn.execute(f"PRAGMA busy_timeout={max(0, int((wait_until - now) * 1000))}")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc):
                        raise
                if time.monotonic() >= deadline:
                    holder = lock_holder(self.path)
                    by = f" by pid {holder}" if holder else " by another process"
                    raise UnavailableError(
                        f"metadata database {self.path}: {operation}: still locked{by} after "
                        f"{self.lock_timeout:g} s (see --lock-timeout)"
                    )
                if not noticed:
                    noticed = True
                    holder = lock_holder(self.path)
                    by = f", locked by pid {holder}" if holder else ", locked by another process"
                    log.warning("waiting for the metadata database %s%s (giving up after %g s)",
                                self.path, by, self.lock_timeout)
        finally:
            conn.execute(f"PRAGMA busy_timeout={int(self.lock_timeout * 1000)}")

    @contextmanager
    def transaction(self, *, frees_space: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested calls join the outer one. sqlite3 errors become cargohold errors.

        ``frees_space``: the transaction removes things (images rm, content rm, snapshots rm, gc, a lease's
        end); on a full disk it may use the space reserved for that (``RESERVE_SIZE``).
        """
        conn = self.conn
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield conn
            finally:
                self._local.depth = depth
            return
        if frees_space:
            self._release_reserve_if_short()
        with self.errors("write"):
            self._begin_immediate(conn, "write")
            self._local.depth = 1
            try:
                yield conn
            except BaseException:
                self._rollback(conn)
                raise
            else:
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback(conn)
                    raise
            finally:
                self._local.depth = 0
        self._keep_reserve()

    @property
    def reserve_path(self) -> Path:
        return self.path.with_name(self.path.name + "-reserve")

    def _free(self) -> int | None:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _release_reserve_if_short(self) -> None:
        free = self._free()
        if free is None or free >= RESERVE_SIZE:
            return
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return
        except OSError:
            log.debug("could not release %s", self.reserve_path, exc_info=True)
            return
        log.warning("metadata database %s: the disk is full; released the %d bytes reserved for this write",
                    self.path, RESERVE_SIZE)

    def _keep_reserve(self) -> None:
        """Set the reserve aside again after a write, when the disk has room for it twice over."""
        reserve = self.reserve_path
        if reserve.exists():
            return
        free = self._free()
        if free is None or free < 2 * RESERVE_SIZE:
            return
        tmp = reserve.with_name(f"{reserve.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_SIZE)  # real blocks, not a sparse promise
            finally:
                os.close(fd)
            os.rename(tmp, reserve)
        except OSError:
            log.debug("could not set aside %s", reserve, exc_info=True)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        with self.errors("read"):
            return self.conn.execute(sql, params).fetchall()

    def ensure_namespace(self, namespace: str) -> None:
        # Every command calls this on open: read first so an existing namespace costs no write (full disk).
        if self.query("SELECT 1 FROM namespaces WHERE name = ?", (namespace,)):
            return
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
