"""Garbage collection of a whole data root (every namespace): content, blob files, leases, snapshots, and what
crashes leave (ingests, unpacks' lock files and active snapshots).

Needs: a ``Store`` (its snapshotters; other namespaces' are opened here).

Order, and why it is safe while pulls, imports and unpacks run (see ``metadata.gc`` for the argument):

1. ``metadata.gc.sweep_rows``: one write transaction deletes dead content rows, dead snapshot rows of the
   local snapshotters and dead leases (expired, or whose process is gone: the active ``extract-…`` snapshot of
   a killed unpack then has nothing holding it). No file is touched while the write lock is held.
2. The local snapshotters' cleanup removes the directories no row owns any more (renamed away in a short
   transaction, deleted outside it).
3. Blob files no row refers to are unlinked, re-checked in short per-batch transactions.
4. Ingests whose writer is gone (or idle for a day) and unpack lock files nobody holds are removed.
5. Each configured proxy snapshotter is walked: what the marked graph (images' gc.ref.snapshot labels,
   leases, parents of kept ones) does not reach is removed through the proxy, children first. A proxy that is
   down is reported in the result and tried again by the next gc.

Every step after the first is idempotent: a crash anywhere leaves orphans that the next gc removes.
"""

from __future__ import annotations

import logging

from cargohold.errors import CargoholdError, FailedPreconditionError, NotFoundError
from cargohold.metadata.gc import (
    GCResult,
    RowSweep,
    SnapshotNode,
    reap_dead_processes,
    removable_snapshot,
    sweep_blobs,
    sweep_rows,
)
from cargohold.metadata.leases import snapshot_kind
from cargohold.snapshots import known_snapshotters, open_snapshotter
from cargohold.snapshots.base import Info, Snapshotter
from cargohold.store import Store
from cargohold.unpack.unpacker import remove_stale_locks

log = logging.getLogger(__name__)


def gc(store: Store, *, dry_run: bool = False) -> tuple[GCResult, list[SnapshotNode]]:
    """Collect garbage in every namespace (see the module docstring). Returns the collection and every
    snapshot removed (or that would be), local and proxy ones, as (snapshotter, namespace, key)."""
    rows = sweep_rows(store.db, dry_run=dry_run)
    return finish(store, rows, dry_run=dry_run)


def reap(store: Store) -> tuple[list[tuple[str, str]], list[SnapshotNode]]:
    """What the next pull, import or unpack cleans up before it starts: leases of dead processes, the
    ``extract-…`` snapshots only they held (rows, then directories) and unpack lock files nobody holds.
    Ingests are left alone: the same ref's next download resumes one, and gc removes the rest.
    Returns (dead leases, snapshots removed)."""
    leases, snapshots = reap_dead_processes(store.db)
    if snapshots:
        _cleanup_local(store)
    remove_stale_locks(store.root / "unpack" / "locks")
    return leases, snapshots


def finish(store: Store, rows: RowSweep, *, dry_run: bool = False) -> tuple[GCResult, list[SnapshotNode]]:
    """The steps after the row transaction: directories, blob files, ingests, lock files, proxies. Safe to
    run again (or only on the next gc, after a crash): each removes what has no row, nothing else."""
    if not dry_run:
        _cleanup_local(store)
    blobs = sweep_blobs(store.db, store.local, dry_run=dry_run, live_digests=rows.live_digests)
    ingests: list[str] = []
    locks: list[str] = []
    if not dry_run:
        ingests = store.local.remove_stale_ingests()
        locks = remove_stale_locks(store.root / "unpack" / "locks")
    proxy_removed: list[SnapshotNode] = []
    unreachable: list[tuple[str, str]] = []
    for name in sorted(store.config.snapshotters):
        try:
            proxy_removed += _collect_proxy(store, name, rows, dry_run=dry_run)
        except CargoholdError as exc:
            log.warning("gc: proxy snapshotter %s: %s", name, exc)
            unreachable.append((name, str(exc)))
    result = GCResult.of(rows, blobs, removed_ingests=ingests, removed_locks=locks, unreachable=unreachable)
    return result, sorted([*rows.removed_snapshots, *proxy_removed])


def _cleanup_local(store: Store) -> None:
    """Remove the directories of the local snapshotters that no row owns (ids are unique per snapshotter
    across namespaces, so one cleanup per snapshotter covers them all)."""
    for name in known_snapshotters():
        if name in store.config.snapshotters or not (store.root / "snapshots" / name).is_dir():
            continue
        sn = open_snapshotter(name, store.root, store.db, store.namespace)  # its open runs the cleanup
        sn.close()


def _held_by_leases(store: Store, name: str) -> set[str]:
    """Keys of snapshotter ``name`` that any lease holds now (read again just before removing through a
    proxy, so an unpack that started after the row transaction keeps what it relies on)."""
    rows = store.db.query("SELECT resource FROM lease_resources WHERE kind = ?", (snapshot_kind(name),))
    return {r["resource"] for r in rows}


def _collect_proxy(store: Store, name: str, rows: RowSweep, *, dry_run: bool) -> list[SnapshotNode]:
    """Remove, through the proxy, its snapshots the graph does not reach (in the store's namespace: the
    daemon keeps the records; keys marked in any namespace are kept)."""
    sn: Snapshotter = store.snapshotter(name)
    infos = {info.key: info for info in sn.walk()}
    marked = {key for snapshotter, _, key in rows.marked_snapshots if snapshotter == name}
    marked |= _held_by_leases(store, name)
    kept: set[str] = set()
    todo = [key for key in marked if key in infos]
    todo += [key for key, info in infos.items() if not removable_snapshot(key, info.kind.value, dict(info.labels))]
    while todo:
        key = todo.pop()
        if key in kept:
            continue
        kept.add(key)
        parent = infos[key].parent if key in infos else ""
        if parent:
            todo.append(parent)
    doomed = [key for key in infos if key not in kept]
    if dry_run:
        return [(name, store.namespace, key) for key in sorted(doomed)]
    return [(name, store.namespace, key) for key in _remove_leaves_first(sn, infos, doomed)]


def _remove_leaves_first(sn: Snapshotter, infos: dict[str, Info], doomed: list[str]) -> list[str]:
    pending = set(doomed)
    removed: list[str] = []
    while pending:
        parents = {infos[key].parent for key in pending}
        leaves = sorted(key for key in pending if key not in parents)
        if not leaves:
            break
        for key in leaves:
            pending.discard(key)
            try:
                sn.remove(key)
            except NotFoundError:
                continue
            except FailedPreconditionError as exc:  # a child we did not see (made meanwhile): keep it
                log.info("gc: keeping snapshot %s of %s: %s", key, sn.name, exc)
                pending -= _ancestors(infos, key)
                continue
            removed.append(key)
    return sorted(removed)


def _ancestors(infos: dict[str, Info], key: str) -> set[str]:
    out: set[str] = set()
    parent = infos[key].parent
    while parent and parent not in out:
        out.add(parent)
        parent = infos[parent].parent if parent in infos else ""
    return out

