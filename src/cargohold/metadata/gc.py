"""Garbage collection: mark and sweep over every namespace's graph, as containerd's metadata GC.

Roots, per namespace:
  * every image's target digest;
  * every resource of a lease that has not expired (``content`` digests, ``snapshots/<snapshotter>`` keys);
  * content and snapshots labelled ``containerd.io/gc.root``.
Edges:
  * content and snapshot labels ``containerd.io/gc.ref.content[.<anything>]`` = a digest;
  * content and snapshot labels ``containerd.io/gc.ref.snapshot.<snapshotter>[/<anything>|.<anything>]`` =
    a snapshot key of that snapshotter;
  * a snapshot's parent.
Sweep:
  * content rows nothing reaches are deleted, then every blob file no namespace has a row for (this also
    clears files orphaned by a crash between a commit's rename and its row insert);
  * expired leases are deleted;
  * unreferenced snapshots are only *reported*: removing their directories is each snapshotter's job.

The whole collection runs in one write transaction, so it never interleaves with a commit, the content
store's AlreadyExists shortcut, or an image or lease change. Ingests in progress are not touched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from cargohold.errors import InvalidArgumentError
from cargohold.metadata.db import MetadataDB, from_text, load_labels, utcnow
from cargohold.metadata.labels import LABEL_GC_REF_CONTENT, LABEL_GC_REF_SNAPSHOT, LABEL_GC_ROOT
from cargohold.metadata.leases import KIND_CONTENT, KIND_SNAPSHOTS
from cargohold.oci.digest import Digest

log = logging.getLogger(__name__)


ContentNode = tuple[str, str]  # (namespace, digest)
SnapshotNode = tuple[str, str, str]  # (snapshotter, namespace, key)


class BlobFiles(Protocol):
    """What GC needs of the blob files (``content.local.LocalStore`` provides it)."""

    def blob_digests(self) -> Iterator[Digest]: ...

    def remove_blob(self, digest: Digest) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class GCResult:
    """What a collection removed (or, with ``dry_run``, would remove).

    ``removed_content``: digests whose row went in at least one namespace (sorted, unique);
    ``removed_records``: the (namespace, digest) rows; ``removed_blobs``: blob files deleted;
    ``removed_snapshots``: unreferenced snapshots (snapshotter, namespace, key), reported, not removed;
    ``expired_leases``: (namespace, lease id).
    """

    removed_content: list[Digest] = field(default_factory=list)
    removed_records: list[tuple[str, Digest]] = field(default_factory=list)
    removed_blobs: list[Digest] = field(default_factory=list)
    removed_snapshots: list[SnapshotNode] = field(default_factory=list)
    expired_leases: list[tuple[str, str]] = field(default_factory=list)


def _snapshotter_of(label_key: str) -> str:
    rest = label_key[len(LABEL_GC_REF_SNAPSHOT) + 1:]
    return rest.split("/", 1)[0].split(".", 1)[0]


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
    """Fill the graph and its roots; return the expired leases."""
    conn = db.conn
    now = utcnow()
    for row in conn.execute("SELECT namespace, digest, labels FROM content"):
        labels = load_labels(row["labels"])
        node = (row["namespace"], row["digest"])
        graph.content[node] = labels
        if LABEL_GC_ROOT in labels:
            graph.reach_content(node)
    for row in conn.execute("SELECT snapshotter, namespace, key, parent, labels FROM snapshots"):
        labels = load_labels(row["labels"])
        snode = (row["snapshotter"], row["namespace"], row["key"])
        graph.snapshots[snode] = (row["parent"], labels)
        if LABEL_GC_ROOT in labels:
            graph.reach_snapshot(snode)
    for row in conn.execute("SELECT namespace, digest FROM images"):
        graph.reach_content((row["namespace"], row["digest"]))
    expired: list[tuple[str, str]] = []
    live: set[tuple[str, str]] = set()
    for row in conn.execute("SELECT namespace, id, expires_at FROM leases"):
        lease = (row["namespace"], row["id"])
        if row["expires_at"] and from_text(row["expires_at"]) <= now:
            expired.append(lease)
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
    return sorted(expired)


def _digest(text: str) -> Digest | None:
    try:
        return Digest.parse(text)
    except InvalidArgumentError:
        return None


def collect(db: MetadataDB, local_store: BlobFiles, *, dry_run: bool = False) -> GCResult:
    """Mark from the roots, sweep what is unreachable; with ``dry_run`` only report it."""
    graph = _Graph()
    with db.transaction() as conn:
        expired = _load(db, graph)
        graph.mark()
        dead_rows = sorted(node for node in graph.content if node not in graph.marked_content)
        live_digests = {node[1] for node in graph.marked_content if node in graph.content}
        dead_snapshots = sorted(node for node in graph.snapshots if node not in graph.marked_snapshots)
        if not dry_run:
            conn.executemany("DELETE FROM content WHERE namespace = ? AND digest = ?", dead_rows)
            for namespace, lease in expired:
                conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease))
                conn.execute(
                    "DELETE FROM lease_resources WHERE namespace = ? AND lease = ?", (namespace, lease)
                )
        removed_blobs: list[Digest] = []
        for digest in list(local_store.blob_digests()):
            if str(digest) in live_digests:
                continue
            if dry_run or local_store.remove_blob(digest):
                removed_blobs.append(digest)
    records = [(ns, d) for ns, text in dead_rows if (d := _digest(text)) is not None]
    result = GCResult(
        removed_content=sorted({d for _, d in records}, key=str),
        removed_records=records,
        removed_blobs=sorted(removed_blobs, key=str),
        removed_snapshots=dead_snapshots,
        expired_leases=expired,
    )
    log.debug("gc%s: %d content rows, %d blob files, %d unreferenced snapshots, %d expired leases",
              " (dry run)" if dry_run else "", len(records), len(removed_blobs), len(dead_snapshots),
              len(expired))
    return result
