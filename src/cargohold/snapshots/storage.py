"""Snapshot metadata rows and snapshot directories, shared by the local snapshotters.

Layout (as containerd)::

    ROOT/snapshots/<snapshotter>/snapshots/<id>/...     one directory per snapshot, by numeric id
    ROOT/snapshots/<snapshotter>/snapshots/tmp-<hex>    a snapshot being created
    ROOT/snapshots/<snapshotter>/snapshots/rm-<hex>     a snapshot being deleted

Rows live in the metadata DB table ``snapshots`` keyed (snapshotter, namespace, key); ids come from
``snapshot_ids`` and are unique per snapshotter across namespaces, so directories never collide.

Crash safety: a new snapshot is built in a ``tmp-`` directory outside any DB transaction (a native copy can
take seconds), then one transaction re-checks the key and parent, allocates the id, renames the directory to
``<id>`` and inserts the row. Until that transaction commits nothing is visible. Each scratch directory is
``flock``-ed by its creator for as long as it (or a ``cp`` child it started) works in it, and created and
locked inside a DB transaction, so the cleanup that runs when a snapshotter is opened (also in a
transaction) deletes exactly the scratch directories of dead processes, plus ``<id>`` directories that have
no row (a crash between rename and commit).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cargohold.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from cargohold.metadata.content import validate_labels
from cargohold.metadata.db import MetadataDB, dump_labels, from_text, load_labels, to_text, utcnow
from cargohold.snapshots.base import Info, Kind
from cargohold.snapshots.dirs import Scratch, rmtree_quiet
from cargohold.snapshots.filters import info_fields, parse_filters

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """A snapshot row: its Info plus the numeric id that names its directory."""

    id: int
    info: Info


class SnapshotStore:
    """Rows of one (snapshotter, namespace) and the directories of one snapshotter."""

    def __init__(self, directory: Path, db: MetadataDB, namespace: str, snapshotter: str) -> None:
        if not namespace:
            raise InvalidArgumentError("snapshots: empty namespace")
        self.dir = directory / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = db
        self.namespace = namespace
        self.snapshotter = snapshotter
        db.ensure_namespace(namespace)
        self.cleanup()

    def __repr__(self) -> str:
        return f"SnapshotStore({self.snapshotter}, {self.namespace}, {self.dir})"

    def path(self, sid: int) -> Path:
        return self.dir / str(sid)

    # --- reading ---------------------------------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> Record:
        return Record(
            id=row["id"],
            info=Info(
                key=row["key"],
                parent=row["parent"],
                kind=Kind(row["kind"]),
                labels=load_labels(row["labels"]),
                created_at=from_text(row["created_at"]),
                updated_at=from_text(row["updated_at"]),
            ),
        )

    def _find(self, conn: sqlite3.Connection, key: str) -> Record | None:
        row = conn.execute(
            "SELECT * FROM snapshots WHERE snapshotter = ? AND namespace = ? AND key = ?",
            (self.snapshotter, self.namespace, key),
        ).fetchone()
        return self._record(row) if row else None

    def get(self, key: str, conn: sqlite3.Connection | None = None) -> Record:
        rec = self._find(conn or self.db.conn, key)
        if rec is None:
            raise NotFoundError(
                f"snapshot {key} does not exist (snapshotter {self.snapshotter}, namespace {self.namespace})"
            )
        return rec

    def chain(self, key: str, conn: sqlite3.Connection | None = None) -> list[Record]:
        """``key`` followed by its ancestors, nearest first (one recursive query)."""
        db = conn or self.db.conn
        rows = db.execute(
            """
            WITH RECURSIVE chain(key, depth) AS (
                SELECT ?, 0
                UNION ALL
                SELECT s.parent, c.depth + 1 FROM snapshots s JOIN chain c
                  ON s.snapshotter = ? AND s.namespace = ? AND s.key = c.key
                WHERE s.parent != '' AND c.depth < 10000
            )
            SELECT s.* FROM chain c JOIN snapshots s
              ON s.snapshotter = ? AND s.namespace = ? AND s.key = c.key
            ORDER BY c.depth
            """,
            (key, self.snapshotter, self.namespace, self.snapshotter, self.namespace),
        ).fetchall()
        if not rows:
            raise NotFoundError(
                f"snapshot {key} does not exist (snapshotter {self.snapshotter}, namespace {self.namespace})"
            )
        return [self._record(r) for r in rows]

    def walk(self, filters: Sequence[str]) -> Iterator[Info]:
        """Matching snapshots by key. Filters are parsed and rows read now (bad filters raise here, and
        callers may change snapshots while iterating)."""
        match = parse_filters(filters)
        rows = self.db.query(
            "SELECT * FROM snapshots WHERE snapshotter = ? AND namespace = ? ORDER BY key",
            (self.snapshotter, self.namespace),
        )
        infos = [self._record(row).info for row in rows]
        return iter([info for info in infos if match.match(info_fields(info))])

    # --- writing ---------------------------------------------------------------------------------------

    def _absent(self, conn: sqlite3.Connection, key: str) -> None:
        if self._find(conn, key) is not None:
            raise AlreadyExistsError(
                f"snapshot {key} already exists (snapshotter {self.snapshotter}, namespace {self.namespace})"
            )

    def _parents(self, conn: sqlite3.Connection, key: str, parent: str) -> list[Record]:
        if not parent:
            return []
        rec = self._find(conn, parent)
        if rec is None:
            raise NotFoundError(f"snapshot {key}: parent snapshot {parent} does not exist")
        if rec.info.kind is not Kind.COMMITTED:
            raise InvalidArgumentError(
                f"snapshot {key}: parent {parent} is {rec.info.kind.filter_name}, not a committed snapshot"
            )
        return self.chain(parent, conn)

    def _next_id(self, conn: sqlite3.Connection) -> int:
        conn.execute(
            "INSERT OR IGNORE INTO snapshot_ids (snapshotter, next_id) VALUES (?, 1)", (self.snapshotter,)
        )
        sid: int = conn.execute(
            "SELECT next_id FROM snapshot_ids WHERE snapshotter = ?", (self.snapshotter,)
        ).fetchone()[0]
        conn.execute("UPDATE snapshot_ids SET next_id = ? WHERE snapshotter = ?", (sid + 1, self.snapshotter))
        return sid

    def create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str] | None,
        populate: Callable[[Scratch, list[Record]], None],
    ) -> list[Record]:
        """Create snapshot ``key``; ``populate`` fills its directory. Returns [new record, *parent chain]."""
        if not key:
            raise InvalidArgumentError("snapshot key must not be empty")
        clean = validate_labels(labels or {}, f"snapshot {key}")
        with self.db.transaction() as conn:
            self._absent(conn, key)  # fail fast, before any copying
            parents = self._parents(conn, key, parent)
            # Created and locked inside the transaction: cleanup (also transactional) never sees it unlocked.
            scratch = Scratch.create(self.dir, "tmp")
        try:
            populate(scratch, parents)
            now = to_text(utcnow())
            with self.db.transaction() as conn:
                self._absent(conn, key)
                again = self._parents(conn, key, parent)
                if [p.id for p in again] != [p.id for p in parents]:
                    raise FailedPreconditionError(f"snapshot {key}: parent {parent} changed during prepare")
                sid = self._next_id(conn)
                final = self.path(sid)
                if final.exists():  # left by a crash after rename, before commit: no row owns it
                    self._discard(final)
                os.rename(scratch.path, final)
                try:
                    conn.execute(
                        "INSERT INTO snapshots (snapshotter, namespace, key, id, parent, kind, labels, "
                        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            self.snapshotter,
                            self.namespace,
                            key,
                            sid,
                            parent,
                            kind.value,
                            dump_labels(clean),
                            now,
                            now,
                        ),
                    )
                except BaseException:
                    os.rename(final, scratch.path)
                    raise
                scratch.path = final
        except BaseException:
            if scratch.path.name.startswith("tmp-"):
                scratch.remove()
            raise
        finally:
            scratch.close()
        return [self.get(key), *parents]

    def commit(
        self, name: str, key: str, labels: Mapping[str, str] | None, parent: str | None = None
    ) -> Record:
        """Active ``key`` becomes committed ``name``; ``parent`` (when not None) replaces its parent."""
        if not name:
            raise InvalidArgumentError(f"commit of snapshot {key}: name must not be empty")
        clean = validate_labels(labels or {}, f"snapshot {name}")
        now = to_text(utcnow())
        with self.db.transaction() as conn:
            rec = self.get(key, conn)
            if rec.info.kind is not Kind.ACTIVE:
                raise FailedPreconditionError(
                    f"snapshot {key} is {rec.info.kind.filter_name}: only active snapshots can be committed"
                )
            if name != key:
                self._absent(conn, name)
            if parent is not None:
                self._parents(conn, name, parent)  # must exist and be committed (so it cannot be ``key``)
            conn.execute(
                "UPDATE snapshots SET key = ?, parent = ?, kind = ?, labels = ?, created_at = ?, "
                "updated_at = ? WHERE snapshotter = ? AND namespace = ? AND key = ?",
                (
                    name,
                    rec.info.parent if parent is None else parent,
                    Kind.COMMITTED.value,
                    dump_labels(clean),
                    now,
                    now,
                    self.snapshotter,
                    self.namespace,
                    key,
                ),
            )
            committed = self.get(name, conn)
        # After the transaction (no file work under the write lock); a crash before it leaves no record, and
        # a snapshot without one is simply not checked.
        record_top_level(self.path(committed.id))
        return committed

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        key = info.key
        if not key:
            raise InvalidArgumentError("snapshot update: key must not be empty")
        with self.db.transaction() as conn:
            rec = self.get(key, conn)
            labels = dict(rec.info.labels)
            if not fieldpaths:
                labels = dict(info.labels)
            for path in fieldpaths:
                if path == "labels":
                    labels = dict(info.labels)
                elif path.startswith("labels."):
                    name = path[len("labels.") :]
                    labels[name] = info.labels.get(name, "")
                else:
                    raise InvalidArgumentError(f"cannot update {path!r} field on snapshot {key}")
            clean = validate_labels(labels, f"snapshot {key}")
            conn.execute(
                "UPDATE snapshots SET labels = ?, updated_at = ? "
                "WHERE snapshotter = ? AND namespace = ? AND key = ?",
                (dump_labels(clean), to_text(utcnow()), self.snapshotter, self.namespace, key),
            )
            return self.get(key, conn).info

    def remove(self, key: str) -> None:
        trash: Scratch | None = None
        src = moved = None
        try:
            with self.db.transaction(frees_space=True) as conn:
                rec = self.get(key, conn)
                child = conn.execute(
                    "SELECT key FROM snapshots WHERE snapshotter = ? AND namespace = ? AND parent = ? "
                    "LIMIT 1",
                    (self.snapshotter, self.namespace, key),
                ).fetchone()
                if child is not None:
                    raise FailedPreconditionError(
                        f"cannot remove snapshot {key}: snapshot {child['key']} has it as parent"
                    )
                conn.execute(
                    "DELETE FROM snapshots WHERE snapshotter = ? AND namespace = ? AND key = ?",
                    (self.snapshotter, self.namespace, key),
                )
                src = self.path(rec.id)
                if src.exists():
                    # Renamed and locked inside the transaction: a concurrent cleanup never sees it unlocked.
                    dest = self.dir / f"rm-{secrets.token_hex(8)}"
                    os.rename(src, dest)
                    moved = dest
                    trash = Scratch(dest)
                    fcntl.flock(trash.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            if moved is not None and src is not None:  # the row is back (rollback): so is the directory
                os.rename(moved, src)
            if trash is not None:
                trash.close()
            raise
        if trash is not None:
            trash.remove()
            trash.close()

    def _discard(self, path: Path) -> None:
        """Rename an orphan away and delete it (caller holds the DB write lock)."""
        trash = self.dir / f"rm-{secrets.token_hex(8)}"
        os.rename(path, trash)
        rmtree_quiet(trash)

    def cleanup(self) -> None:
        """Delete scratch directories of dead processes and directories no row refers to."""
        doomed: list[Scratch] = []
        with self.db.transaction() as conn:
            ids = {
                r[0]
                for r in conn.execute("SELECT id FROM snapshots WHERE snapshotter = ?", (self.snapshotter,))
            }
            for entry in os.scandir(self.dir):
                if entry.name.isdigit() and int(entry.name) not in ids:
                    trash = self.dir / f"rm-{secrets.token_hex(8)}"
                    os.rename(entry.path, trash)
                    got = Scratch.try_lock(trash)
                elif entry.name.startswith(("tmp-", "rm-")):
                    got = Scratch.try_lock(Path(entry.path))
                else:
                    continue
                if got is not None:
                    log.debug("removing leftover snapshot directory %s", got.path)
                    doomed.append(got)
        for scratch in doomed:
            scratch.remove()
            scratch.close()


TOP_LEVEL_RECORD = "fs.top"
"""Beside a committed snapshot's ``fs``: its sorted top-level names, one a line, as they were at commit; a cheap
check that the directory was not damaged or removed from under us (``images check``)."""


def _top_level(directory: Path) -> str:
    return "".join(f"{name}\n" for name in sorted(os.listdir(directory / "fs")))


def record_top_level(directory: Path) -> None:
    """Write the top-level record of the snapshot directory ``directory`` (nothing when it has no ``fs``)."""
    try:
        text = _top_level(directory)
    except OSError:
        return
    tmp = directory / f".{TOP_LEVEL_RECORD}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / TOP_LEVEL_RECORD)


def top_level_damage(directory: Path) -> str | None:
    """Why the committed snapshot directory no longer matches its record (missing, names differ), or None
    when it matches or has no record to compare with."""
    if not directory.is_dir():
        return f"directory {directory} is missing"
    try:
        recorded = (directory / TOP_LEVEL_RECORD).read_text()
    except FileNotFoundError:
        return None
    try:
        now = _top_level(directory)
    except OSError as exc:
        return f"{directory / 'fs'}: {exc.strerror or exc}"
    if now != recorded:
        gone = sorted(set(recorded.splitlines()) - set(now.splitlines()))
        added = sorted(set(now.splitlines()) - set(recorded.splitlines()))
        return f"{directory / 'fs'}: top-level names changed (missing {gone or '-'}, added {added or '-'})"
    return None
