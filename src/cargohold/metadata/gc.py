"""Garbage collection: mark and sweep over every namespace's graph, as containerd's metadata GC.

Roots, per namespace:
  * every image's target digest;
  * every resource of a live lease (``content`` digests, ``snapshots/<snapshotter>`` keys): a lease is dead
    once it has expired or once the process its ``cargohold.io/pid`` label names is gone (a crash, kill -9);
  * content and snapshots labelled ``containerd.io/gc.root``;
  * snapshots gc never removes: active snapshots and views other than unpacks' (``extract-…`` keys labelled
    ``containerd.io/snapshot.ref``): mounts and containers' rootfs carry gc.root anyway, and what a client of
    the snapshots server prepares is its business.
Edges:
  * content and snapshot labels ``containerd.io/gc.ref.content[.<anything>]`` = a digest;
  * content and snapshot labels ``containerd.io/gc.ref.snapshot.<snapshotter>[/<anything>|.<anything>]`` =
    a snapshot key of that snapshotter;
  * a snapshot's parent.

Two phases, so the write lock is held only for the rows:

1. ``sweep_rows``: ONE write transaction marks and deletes the dead ``content`` rows, the dead ``snapshots``
   rows (the local snapshotters' records) and the dead leases. Nothing on disk is touched, so the
   transaction is short and writers (pulls, commits) never wait on it for long.
2. Afterwards, the backing files go: ``sweep_blobs`` unlinks blob files no namespace has a row for; the
   snapshot directories whose row is gone are removed by the snapshot store's cleanup (an id directory
   without a row is an orphan). Both are idempotent: a crash between the phases (or during the second)
   leaves only orphans, which the next collection removes.

Why unlinking blob files outside the big transaction is safe: a blob file becomes visible to a namespace
only inside a write transaction, either a commit (rename into place + row insert) or the AlreadyExists
shortcut (``_claim_existing``: look at the file + row insert). ``sweep_blobs`` lists files without any
lock, then, per batch, re-checks "no row in any namespace" and unlinks *inside a short write
transaction*. Within it no commit or claim can run, so a file found without a row cannot get one before it
is gone; a claim that runs afterwards sees no file and writes the blob again. A file that got a row between
the listing and the batch is seen by the re-check and kept. The cost is one short transaction per batch.

Snapshots: the unpacker adds every snapshot it relies on (existing chains, its own ``extract-…`` key) to its
lease *before* it looks at it, so a snapshot it saw is either already marked (held by a live lease) or its
row was deleted before the look (the unpack then finds it missing and rebuilds it). Proxy snapshotters keep
their records in their daemon: ``sweep_rows`` returns the marked keys per snapshotter so the caller can
remove the rest through the proxy.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from cargohold.errors import InvalidArgumentError
from cargohold.metadata.content import referenced_anywhere
from cargohold.metadata.db import MetadataDB, from_text, load_labels, utcnow
from cargohold.metadata.labels import (
    LABEL_GC_REF_CONTENT,
    LABEL_GC_REF_SNAPSHOT,
    LABEL_GC_ROOT,
    LEASE_PROCESS,
    SNAPSHOT_REF,
)
from cargohold.metadata.leases import KIND_CONTENT, KIND_SNAPSHOTS, process_alive, snapshot_kind
from cargohold.oci.digest import Digest

log = logging.getLogger(__name__)

UNPACK_KEY_PREFIX = "extract-"
"""Key prefix of the unpacker's active snapshots: with a ``containerd.io/snapshot.ref`` label, gc may remove
them once nothing (their unpack's lease) holds them."""
BLOB_BATCH = 256
"""Blob files re-checked and unlinked per (short) write transaction."""

ContentNode = tuple[str, str]  # (namespace, digest)
SnapshotNode = tuple[str, str, str]  # (snapshotter, namespace, key)


class BlobFiles(Protocol):
    """What GC needs of the blob files (``content.local.LocalStore`` provides it)."""

    def blob_digests(self) -> Iterator[Digest]: ...

    def remove_blob(self, digest: Digest) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RowSweep:
    """What the row transaction deleted (or, with ``dry_run``, would delete).

    ``removed_records``: dead (namespace, digest) content rows; ``removed_snapshots``: dead snapshot rows
    (snapshotter, namespace, key) of the local snapshotters; ``expired_leases``: (namespace, lease id) of
    expired leases and of leases whose process is gone; ``marked_snapshots``: every snapshot reached, also
    of snapshotters with no rows here (proxies); ``live_digests``: digests some live row still has.
    """

    removed_records: list[tuple[str, Digest]] = field(default_factory=list)
    removed_snapshots: list[SnapshotNode] = field(default_factory=list)
    expired_leases: list[tuple[str, str]] = field(default_factory=list)
    marked_snapshots: frozenset[SnapshotNode] = frozenset()
    live_digests: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class GCResult:
    """What a collection removed (or, with ``dry_run``, would remove).

    ``removed_content``: digests whose row went in at least one namespace (sorted, unique);
    ``removed_records``: the (namespace, digest) rows; ``removed_blobs``: blob files deleted;
    ``removed_snapshots``: snapshot rows (snapshotter, namespace, key) deleted, their directories removed
    after; ``expired_leases``: (namespace, lease id), expired or of a process that is gone.
    The caller (``services.gc``) adds what it removed besides: ``removed_ingests`` (ingest refs),
    ``removed_locks`` (stale lock files) and ``unreachable`` ((snapshotter, error) of proxies that were down).
    """

    removed_content: list[Digest] = field(default_factory=list)
    removed_records: list[tuple[str, Digest]] = field(default_factory=list)
    removed_blobs: list[Digest] = field(default_factory=list)
    removed_snapshots: list[SnapshotNode] = field(default_factory=list)
    expired_leases: list[tuple[str, str]] = field(default_factory=list)
    removed_ingests: list[str] = field(default_factory=list)
    removed_locks: list[str] = field(default_factory=list)
    unreachable: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, rows: RowSweep, blobs: list[Digest], *, removed_ingests: list[str] | None = None,
           removed_locks: list[str] | None = None, unreachable: list[tuple[str, str]] | None = None) -> GCResult:
        """The result of a row sweep and a blob sweep (and what the caller removed besides)."""
        return cls(removed_content=sorted({d for _, d in rows.removed_records}, key=str),
                   removed_records=rows.removed_records, removed_blobs=blobs,
                   removed_snapshots=rows.removed_snapshots, expired_leases=rows.expired_leases,
                   removed_ingests=removed_ingests or [], removed_locks=removed_locks or [],
                   unreachable=unreachable or [])


def _snapshotter_of(label_key: str) -> str:
    rest = label_key[len(LABEL_GC_REF_SNAPSHOT) + 1:]
    return rest.split("/", 1)[0].split(".", 1)[0]


def removable_snapshot(key: str, kind: str, labels: dict[str, str]) -> bool:
    """Whether gc may remove this snapshot once unreferenced: committed ones, and unpacks' active ones.
    ``kind`` as stored (containerd's spelling, any case: ``Committed``, ``Active``, ``View``)."""
    kind = kind.lower()
    if kind == "committed":
        return True
    return kind == "active" and key.startswith(UNPACK_KEY_PREFIX) and SNAPSHOT_REF in labels


class _Graph:
    def __init__(self) -> None:
        self.content: dict[ContentNode, dict[str, str]] = {}
        self.snapshots: dict[SnapshotNode, tuple[str, dict[str, str]]] = {}
        self.marked_content: set[ContentNode] = set()
        self.marked_snapshots: set[SnapshotNode] = set()
        self._content_todo: list[ContentNode] = []
        self._snapshot_todo: list[SnapshotNode] = []

    def reach_content(self, node: ContentNode) -> None:
        if node not in self.marked_content:
            self.marked_content.add(node)
            self._content_todo.append(node)

    def reach_snapshot(self, node: SnapshotNode) -> None:
        if node not in self.marked_snapshots:
            self.marked_snapshots.add(node)
            self._snapshot_todo.append(node)

    def _follow_labels(self, namespace: str, labels: dict[str, str]) -> None:
        for key, value in labels.items():
            if key == LABEL_GC_REF_CONTENT or key.startswith(LABEL_GC_REF_CONTENT + "."):
                self.reach_content((namespace, value))
            elif key.startswith(LABEL_GC_REF_SNAPSHOT + "."):
                snapshotter = _snapshotter_of(key)
                if snapshotter:
                    self.reach_snapshot((snapshotter, namespace, value))

    def mark(self) -> None:
        while self._content_todo or self._snapshot_todo:
            while self._content_todo:
                node = self._content_todo.pop()
                self._follow_labels(node[0], self.content.get(node, {}))
            while self._snapshot_todo:
                snapshotter, namespace, _ = snode = self._snapshot_todo.pop()
                parent, labels = self.snapshots.get(snode, ("", {}))
                if parent:
                    self.reach_snapshot((snapshotter, namespace, parent))
                self._follow_labels(namespace, labels)


def _load(db: MetadataDB, graph: _Graph) -> list[tuple[str, str]]:
    """Fill the graph and its roots; return the dead leases (expired, or their process is gone)."""
    conn = db.conn
    now = utcnow()
    for row in conn.execute("SELECT namespace, digest, labels FROM content"):
        labels = load_labels(row["labels"])
        node = (row["namespace"], row["digest"])
        graph.content[node] = labels
        if LABEL_GC_ROOT in labels:
            graph.reach_content(node)
    for row in conn.execute("SELECT snapshotter, namespace, key, parent, kind, labels FROM snapshots"):
        labels = load_labels(row["labels"])
        snode = (row["snapshotter"], row["namespace"], row["key"])
        graph.snapshots[snode] = (row["parent"], labels)
        if LABEL_GC_ROOT in labels or not removable_snapshot(row["key"], row["kind"], labels):
            graph.reach_snapshot(snode)
    for row in conn.execute("SELECT namespace, digest FROM images"):
        graph.reach_content((row["namespace"], row["digest"]))
    dead: list[tuple[str, str]] = []
    live: set[tuple[str, str]] = set()
    for row in conn.execute("SELECT namespace, id, labels, expires_at FROM leases"):
        lease = (row["namespace"], row["id"])
        process = load_labels(row["labels"]).get(LEASE_PROCESS)
        if (row["expires_at"] and from_text(row["expires_at"]) <= now) or (
                process is not None and not process_alive(process)):
            dead.append(lease)
        else:
            live.add(lease)
    for row in conn.execute("SELECT namespace, lease, kind, resource FROM lease_resources"):
        if (row["namespace"], row["lease"]) not in live:
            continue
        kind: str = row["kind"]
        if kind == KIND_CONTENT:
            graph.reach_content((row["namespace"], row["resource"]))
        elif kind.startswith(KIND_SNAPSHOTS + "/"):
            graph.reach_snapshot((kind[len(KIND_SNAPSHOTS) + 1:], row["namespace"], row["resource"]))
    return sorted(dead)


def _digest(text: str) -> Digest | None:
    try:
        return Digest.parse(text)
    except InvalidArgumentError:
        return None


def sweep_rows(db: MetadataDB, *, dry_run: bool = False) -> RowSweep:
    """Phase 1: mark from the roots and delete every unreachable content row, snapshot row and dead lease,
    in one write transaction that touches no file. With ``dry_run`` only report them."""
    graph = _Graph()
    with db.transaction(frees_space=not dry_run) as conn:
        dead_leases = _load(db, graph)
        graph.mark()
        dead_rows = sorted(node for node in graph.content if node not in graph.marked_content)
        dead_snapshots = sorted(node for node in graph.snapshots if node not in graph.marked_snapshots)
        if not dry_run:
            conn.executemany("DELETE FROM content WHERE namespace = ? AND digest = ?", dead_rows)
            conn.executemany("DELETE FROM snapshots WHERE snapshotter = ? AND namespace = ? AND key = ?",
                             dead_snapshots)
            for namespace, lease in dead_leases:
                conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease))
                conn.execute(
                    "DELETE FROM lease_resources WHERE namespace = ? AND lease = ?", (namespace, lease)
                )
    return RowSweep(
        removed_records=[(ns, d) for ns, text in dead_rows if (d := _digest(text)) is not None],
        removed_snapshots=dead_snapshots,
        expired_leases=dead_leases,
        marked_snapshots=frozenset(graph.marked_snapshots),
        live_digests=frozenset(node[1] for node in graph.marked_content if node in graph.content),
    )


def sweep_blobs(db: MetadataDB, files: BlobFiles, *, dry_run: bool = False,
                live_digests: frozenset[str] = frozenset()) -> list[Digest]:
    """Phase 2 for content: unlink the blob files no namespace has a row for (see the module docstring for
    why this cannot race a commit). With ``dry_run``, report the files not in ``live_digests`` (what
    ``sweep_rows`` found still referenced) instead."""
    listed = list(files.blob_digests())  # walked with no lock held
    if dry_run:
        return sorted((d for d in listed if str(d) not in live_digests), key=str)
    removed: list[Digest] = []
    for start in range(0, len(listed), BLOB_BATCH):
        with db.transaction():
            for digest in listed[start:start + BLOB_BATCH]:
                if not referenced_anywhere(db, digest) and files.remove_blob(digest):
                    removed.append(digest)
    return sorted(removed, key=str)


def collect(db: MetadataDB, local_store: BlobFiles, *, dry_run: bool = False) -> GCResult:
    """Both phases for the metadata and the blob files: rows (one transaction), then unreferenced blob
    files. Snapshot directories are the snapshotters' (``services.gc`` runs their cleanup)."""
    rows = sweep_rows(db, dry_run=dry_run)
    blobs = sweep_blobs(db, local_store, dry_run=dry_run, live_digests=rows.live_digests)
    result = GCResult.of(rows, blobs)
    log.debug("gc%s: %d content rows, %d blob files, %d snapshots, %d dead leases",
              " (dry run)" if dry_run else "", len(rows.removed_records), len(blobs),
              len(rows.removed_snapshots), len(rows.expired_leases))
    return result


def _dead_leases(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(namespace, id) of the leases whose ``cargohold.io/pid`` process is gone (expired ones are left to gc)."""
    dead: list[tuple[str, str]] = []
    for row in conn.execute("SELECT namespace, id, labels FROM leases"):
        process = load_labels(row["labels"]).get(LEASE_PROCESS)
        if process is not None and not process_alive(process):
            dead.append((row["namespace"], row["id"]))
    return sorted(dead)


def reap_dead_processes(db: MetadataDB) -> tuple[list[tuple[str, str]], list[SnapshotNode]]:
    """The cheap part of gc that the start of a pull, import or unpack runs: in one write transaction, drop
    the leases of processes that are gone and the unpacks' ``extract-…`` active snapshots that only such a
    lease held (none of their content, nothing else: what else is unreferenced waits for a real gc).
    Returns (dead leases, snapshot rows deleted); the snapshotters' cleanup then removes their directories."""
    with db.transaction() as conn:
        dead = _dead_leases(conn)
        if not dead:
            return [], []
        dead_set = set(dead)
        doomed: list[SnapshotNode] = []
        for namespace, lease in dead:
            rows = conn.execute(
                "SELECT kind, resource FROM lease_resources WHERE namespace = ? AND lease = ? AND kind LIKE ?",
                (namespace, lease, KIND_SNAPSHOTS + "/%"),
            ).fetchall()
            for row in rows:
                snapshotter, key = row["kind"][len(KIND_SNAPSHOTS) + 1:], row["resource"]
                if key.startswith(UNPACK_KEY_PREFIX):
                    doomed.append((snapshotter, namespace, key))
        removed: list[SnapshotNode] = []
        for snapshotter, namespace, key in sorted(set(doomed)):
            snap = conn.execute(
                "SELECT kind, labels FROM snapshots WHERE snapshotter = ? AND namespace = ? AND key = ?",
                (snapshotter, namespace, key)).fetchone()
            if snap is None or not removable_snapshot(key, snap["kind"], load_labels(snap["labels"])) \
                    or str(snap["kind"]).lower() != "active":
                continue
            holders = conn.execute(
                "SELECT lease FROM lease_resources WHERE namespace = ? AND kind = ? AND resource = ?",
                (namespace, snapshot_kind(snapshotter), key)).fetchall()
            if any((namespace, h["lease"]) not in dead_set for h in holders):
                continue  # a live lease relies on it too
            child = conn.execute(
                "SELECT 1 FROM snapshots WHERE snapshotter = ? AND namespace = ? AND parent = ? LIMIT 1",
                (snapshotter, namespace, key)).fetchone()
            if child is not None:
                continue
            conn.execute("DELETE FROM snapshots WHERE snapshotter = ? AND namespace = ? AND key = ?",
                         (snapshotter, namespace, key))
            removed.append((snapshotter, namespace, key))
        for namespace, lease in dead:
            conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease))
            conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ?", (namespace, lease))
    log.debug("reaped %d leases of dead processes, %d extract snapshots", len(dead), len(removed))
    return dead, removed
