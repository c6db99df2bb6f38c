"""Leases, as containerd's: a named hold on resources so garbage collection keeps them.

A pull takes a lease, adds every blob (and snapshot) it writes to it, records the image, then deletes the
lease: until then a concurrent GC cannot remove half-pulled content. A lease past ``expires_at`` no longer
protects anything and GC deletes it.

Resource kinds: ``content`` (a digest), ``ingest`` (an ingest ref), ``snapshots/<snapshotter>`` (a key).
"""

from __future__ import annotations

import builtins
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cargohold.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cargohold.metadata.content import validate_labels
from cargohold.metadata.db import (
    DEFAULT_NAMESPACE,
    MetadataDB,
    dump_labels,
    from_text,
    load_labels,
    to_text,
    utcnow,
)
from cargohold.metadata.labels import LEASE_PROCESS

KIND_CONTENT = "content"
KIND_INGEST = "ingest"
KIND_SNAPSHOTS = "snapshots"  # stored as "snapshots/<snapshotter>"


def _start_time(pid: int) -> str | None:
    """The start time (clock ticks since boot) of process ``pid`` from /proc, None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so count from the last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:
        return ""


def process_token(pid: int | None = None) -> str:
    """``<pid>:<start time>:<pid namespace>`` of this process (or of ``pid``, in ours): names the process even
    after its pid is reused."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid) or ''}:{_pid_namespace()}"


def process_alive(token: str) -> bool:
    """Whether the process a ``process_token`` names still runs. A token this process cannot check (another
    pid namespace: a container sharing the data root; no /proc; malformed) counts as alive: gc then only drops
    the lease when it expires."""
    pid_text, _, rest = token.partition(":")
    start, _, namespace = rest.partition(":")
    if not pid_text.isdigit() or not start or not os.path.isdir("/proc/self"):
        return True
    if namespace != _pid_namespace():
        return True
    return _start_time(int(pid_text)) == start


def snapshot_kind(snapshotter: str) -> str:
    """The resource kind of a snapshot of ``snapshotter``: ``snapshots/<snapshotter>``."""
    return f"{KIND_SNAPSHOTS}/{snapshotter}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime
    expires_at: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource:
    """One thing a lease holds: ``kind`` (content, ingest, snapshots/<snapshotter>) and its id."""

    kind: str
    resource: str


def _check_kind(kind: str) -> None:
    if kind in (KIND_CONTENT, KIND_INGEST):
        return
    if kind.startswith(KIND_SNAPSHOTS + "/") and len(kind) > len(KIND_SNAPSHOTS) + 1:
        return
    raise InvalidArgumentError(
        f"lease resource kind {kind!r}: want content, ingest or snapshots/<snapshotter>"
    )


class LeaseStore:
    """Leases of one namespace."""

    def __init__(self, db: MetadataDB, namespace: str = DEFAULT_NAMESPACE) -> None:
        if not namespace:
            raise InvalidArgumentError("leases: empty namespace")
        self.db = db
        self.namespace = namespace
        db.ensure_namespace(namespace)

    def _lease(self, lease_id: str) -> Lease | None:
        row = self.db.conn.execute(
            "SELECT * FROM leases WHERE namespace = ? AND id = ?", (self.namespace, lease_id)
        ).fetchone()
        if row is None:
            return None
        return Lease(
            id=row["id"],
            labels=load_labels(row["labels"]),
            created_at=from_text(row["created_at"]),
            expires_at=from_text(row["expires_at"]) if row["expires_at"] else None,
        )

    def get(self, lease_id: str) -> Lease:
        lease = self._lease(lease_id)
        if lease is None:
            raise NotFoundError(f"lease {lease_id}: not found in namespace {self.namespace}")
        return lease

    def create(
        self,
        lease_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        expires_at: datetime | None = None,
    ) -> Lease:
        """A new lease; a random id when ``lease_id`` is None. AlreadyExistsError when the id is taken."""
        lease_id = lease_id or f"cargohold-{secrets.token_hex(8)}"
        checked = validate_labels(labels or {}, f"lease {lease_id}")
        now = utcnow()
        with self.db.transaction() as conn:
            if self._lease(lease_id) is not None:
                raise AlreadyExistsError(f"lease {lease_id}: already exists in namespace {self.namespace}")
            conn.execute(
                "INSERT INTO leases (namespace, id, labels, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (self.namespace, lease_id, dump_labels(checked), to_text(now),
                 to_text(expires_at) if expires_at is not None else None),
            )
        return Lease(id=lease_id, labels=checked, created_at=from_text(to_text(now)), expires_at=expires_at)

    def delete(self, lease_id: str) -> None:
        """Drop the lease and its resource list (the resources themselves stay until GC)."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM leases WHERE namespace = ? AND id = ?", (self.namespace, lease_id)
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"lease {lease_id}: not found in namespace {self.namespace}")
            conn.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND lease = ?", (self.namespace, lease_id)
            )

    def list(self) -> builtins.list[Lease]:
        rows = self.db.query("SELECT id FROM leases WHERE namespace = ? ORDER BY id", (self.namespace,))
        return [lease for r in rows if (lease := self._lease(r["id"])) is not None]

    def add_resource(self, lease_id: str, kind: str, resource: str) -> None:
        """Hold ``resource`` under the lease (idempotent). NotFoundError when the lease does not exist."""
        _check_kind(kind)
        with self.db.transaction() as conn:
            if self._lease(lease_id) is None:
                raise NotFoundError(f"lease {lease_id}: not found in namespace {self.namespace}")
            conn.execute(
                "INSERT OR IGNORE INTO lease_resources (namespace, lease, kind, resource) "
                "VALUES (?, ?, ?, ?)",
                (self.namespace, lease_id, kind, resource),
            )

    def remove_resource(self, lease_id: str, kind: str, resource: str) -> None:
        """Stop holding ``resource`` (no error when it was not held)."""
        with self.db.transaction() as conn:
            if self._lease(lease_id) is None:
                raise NotFoundError(f"lease {lease_id}: not found in namespace {self.namespace}")
            conn.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND kind = ? AND resource = ?",
                (self.namespace, lease_id, kind, resource),
            )

    def resources(self, lease_id: str) -> builtins.list[Resource]:
        self.get(lease_id)
        rows = self.db.query(
            "SELECT kind, resource FROM lease_resources WHERE namespace = ? AND lease = ? "
            "ORDER BY kind, resource",
            (self.namespace, lease_id),
        )
        return [Resource(kind=r["kind"], resource=r["resource"]) for r in rows]

    @contextmanager
    def hold(self, *, expires_in: timedelta | None = timedelta(hours=24),
             labels: Mapping[str, str] | None = None) -> Iterator[Lease]:
        """A fresh lease for the ``with`` block, deleted after it (also on error). It expires after
        ``expires_in`` anyway, so a crashed process does not pin content for ever; it also names this process
        (``cargohold.io/pid``), so gc drops it as soon as the process is gone."""
        expires_at = utcnow() + expires_in if expires_in is not None else None
        lease = self.create(labels={**(labels or {}), LEASE_PROCESS: process_token()}, expires_at=expires_at)
        try:
            yield lease
        finally:
            try:
                self.delete(lease.id)
            except NotFoundError:
                pass
