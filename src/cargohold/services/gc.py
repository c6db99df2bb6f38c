"""Garbage collection of a whole data root (every namespace): content, blob files, leases, snapshots.

Needs: a ``Store`` (its snapshotters for its namespace; other namespaces' are opened here).
"""

from __future__ import annotations

from cargohold.errors import FailedPreconditionError, NotFoundError
from cargohold.metadata.gc import GCResult, collect
from cargohold.snapshots import known_snapshotters, open_snapshotter
from cargohold.snapshots.base import Kind
from cargohold.store import Store


def gc(store: Store, *, dry_run: bool = False) -> tuple[GCResult, list[tuple[str, str, str]]]:
    """Collect garbage in every namespace: unreferenced content rows and blob files, expired leases, and
    committed snapshots nothing references (children first). Active snapshots and views (mounts, unpacks
    in progress) are left alone. Returns the collection and the snapshots removed (or that would be)."""
    result = collect(store.db, store.local, dry_run=dry_run)
    pending: list[tuple[str, str, str]] = []
    for node in result.removed_snapshots:
        name, namespace, key = node
        if name not in known_snapshotters():
            continue
        sn = store.snapshotter(name) if namespace == store.namespace else open_snapshotter(
            name, store.root, store.db, namespace)
        try:
            if sn.stat(key).kind == Kind.COMMITTED:
                pending.append(node)
        except NotFoundError:
            pass
    if dry_run:
        return result, pending
    removed: list[tuple[str, str, str]] = []
    while pending:  # a dead snapshot's children are dead too: remove leaves until none is left
        progress = False
        for node in list(pending):
            name, namespace, key = node
            sn = store.snapshotter(name) if namespace == store.namespace else open_snapshotter(
                name, store.root, store.db, namespace)
            try:
                sn.remove(key)
            except FailedPreconditionError:
                continue  # still has children (maybe live ones: a mount on top); retried next pass
            except NotFoundError:
                pass
            else:
                removed.append(node)
            pending.remove(node)
            progress = True
        if not progress:
            break
    return result, removed
