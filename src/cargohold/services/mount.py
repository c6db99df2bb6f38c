"""An image's filesystem on the host: mounted from a snapshotter (``mount``/``unmount``) or written flat into
a plain directory (``rootfs``/``remove_rootfs``).

Needs: a ``Store``, an event sink; ``mount`` unpacks first when needed (executor, resolver as ``unpack``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from cargohold.diff.apply import apply_layer
from cargohold.diff.removal import remove_tree
from cargohold.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LimitExceededError,
    NotFoundError,
    UnavailableError,
)
from cargohold.events import Event, EventSink
from cargohold.metadata.db import utcnow
from cargohold.metadata.labels import LABEL_GC_ROOT, MOUNT_LABEL
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.platform import Platform
from cargohold.remotes.resolver import Resolver
from cargohold.services import images
from cargohold.services.unpack import unpack, unpacked
from cargohold.snapshots import known_snapshotters
from cargohold.snapshots.base import Mount
from cargohold.snapshots.mount import mount_all, mounts_at_or_below
from cargohold.snapshots.mount import unmount as unmount_at
from cargohold.store import Store


def rootfs(store: Store, name: str, target: Path | str, *, on_event: EventSink,
           platform: Platform | str | None = None) -> Path:
    """Write the image's flattened filesystem (whiteouts applied) into a plain, empty directory."""
    dest = Path(target)
    if dest.exists() and any(dest.iterdir()):
        raise FailedPreconditionError(f"{dest}: directory is not empty")
    resolved = images.resolve_manifest(store, name, platform)
    missing = [layer for layer in resolved.manifest.layers if not store.content.exists(layer.digest)]
    if missing:
        raise FailedPreconditionError(
            f"image {name}: missing blobs: {', '.join(str(layer.digest) for layer in missing)}"
        )
    limit = store.config.max_layer_size
    for layer in resolved.manifest.layers:
        if limit is not None and layer.size > limit:
            raise LimitExceededError(
                f"layer {layer.digest}: {layer.size} bytes is more than max_layer_size ({limit} bytes)")
    dest.mkdir(parents=True, exist_ok=True)
    for layer, diff_id in zip(resolved.manifest.layers, resolved.diff_ids, strict=True):
        on_event(Event(action="apply", status="running", item=str(layer.digest), media_type=layer.media_type,
                       total=layer.size))
        with store.content.open(layer.digest) as stream:
            apply_layer(dest, stream, expected_digest=layer.digest, expected_diff_id=diff_id,
                        on_progress=_apply_progress(on_event, layer),
                        max_unpacked_size=store.config.max_unpacked_size)
        on_event(Event(action="apply", status="done", item=str(layer.digest), media_type=layer.media_type,
                       current=layer.size, total=layer.size))
    return dest


def _apply_progress(on_event: EventSink, layer: Descriptor) -> Callable[[int, int], None]:
    """``apply`` running events: compressed bytes read against the blob's size (the tar's size is unknown)."""

    def progress(compressed: int, _uncompressed: int) -> None:
        on_event(Event(action="apply", status="running", item=str(layer.digest), media_type=layer.media_type,
                       current=min(compressed, layer.size), total=layer.size))

    return progress


def remove_rootfs(store: Store, target: Path | str) -> None:
    """Remove a directory tree written by ``rootfs``, read-only directories included (an ordinary user's
    ``rm -rf`` cannot), never following symlinks. Refuses a path that is not a directory, a tree with
    anything mounted at or below it, one holding the data root, and one whose directory is not writable."""
    given = os.path.abspath(target)
    # The parent's real path, as /proc/self/mountinfo spells mount points; the last component stays
    # unresolved (a symlink there is refused below, not followed).
    path = os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgumentError(f"{path}: not a directory")
    mounted = mounts_at_or_below(path)
    if mounted:
        raise FailedPreconditionError(f"{path}: {mounted[-1]} is mounted there; unmount it first")
    data_root = os.path.abspath(store.root)
    if data_root == path or data_root.startswith(path.rstrip("/") + "/"):
        raise FailedPreconditionError(f"{path}: holds the data root {data_root}; not removing it")
    parent = os.path.dirname(path)
    if not os.access(parent, os.W_OK | os.X_OK):  # checked first: nothing is removed if the top cannot be
        raise FailedPreconditionError(f"{path}: cannot remove it, its directory {parent} is not writable")
    try:
        remove_tree(path, one_filesystem=True)
    except OSError as exc:
        raise FailedPreconditionError(f"removing {path}: {exc.filename}: {exc.strerror or exc}") from exc


def mount(store: Store, name: str, target: Path | str, *, on_event: EventSink, executor: Executor,
          resolver: Callable[[], Resolver], snapshotter: str | None = None, platform: Platform | str | None = None,
          writable: bool = False) -> list[Mount]:
    """Mount the image's root filesystem at ``target`` (read-only unless ``writable``), unpacking first
    when needed. The snapshot is keyed by the mount point, so ``unmount(target)`` finds it."""
    dest = Path(target).resolve()
    if not dest.is_dir():
        raise NotFoundError(f"mount point {dest}: not a directory")
    sn = store.snapshotter(snapshotter)
    if not unpacked(store, name, sn.name, platform):
        unpack(store, name, on_event=on_event, executor=executor, resolver=resolver, snapshotter=sn.name,
               platform=platform)
    resolved = images.resolve_manifest(store, name, platform)
    key = _mount_key(dest)
    parent = str(resolved.chain_ids[-1])
    # gc.root: a mounted snapshot is referenced by nothing else, yet must survive garbage collection.
    labels = {MOUNT_LABEL: str(dest), LABEL_GC_ROOT: utcnow().isoformat()}
    mounts = sn.prepare(key, parent, labels) if writable else sn.view(key, parent, labels)
    try:
        mount_all(mounts, dest)
    except BaseException:
        sn.remove(key)
        raise
    return mounts


def unmount(store: Store, target: Path | str) -> None:
    """Unmount what ``mount`` mounted at ``target`` and remove its snapshot; NotFoundError when there is
    neither a mount nor a snapshot of ``mount`` there."""
    dest = Path(target).resolve()
    key = _mount_key(dest)
    mounted = bool(mounts_at_or_below(dest))
    unmount_at(dest)
    removed = False
    for name in [*known_snapshotters(), *store.config.snapshotters]:
        try:
            sn = store.snapshotter(name)
            sn.stat(key)
        except (NotFoundError, FailedPreconditionError, UnavailableError):
            continue
        sn.remove(key)
        removed = True
    if not mounted and not removed:
        raise NotFoundError(f"{dest}: not mounted (nothing 'cargohold mount' made is there)")


def _mount_key(path: Path) -> str:
    return f"mount:{path}"
