"""Snapshotters: containerd's Snapshotter interface (``base``), the ``native`` and ``overlayfs``
implementations, and mount helpers. ``SNAPSHOTTERS`` holds the local ones; a snapshotter served over
containerd's snapshots gRPC API (``proxy``) is opened by name and socket with ``open_proxy_snapshotter``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cargohold.errors import InvalidArgumentError
from cargohold.metadata.db import DEFAULT_NAMESPACE, MetadataDB
from cargohold.snapshots.base import Info, Kind, Mount, Snapshotter, Usage
from cargohold.snapshots.mount import mount_all, unmount, with_temp_mount
from cargohold.snapshots.native import NativeSnapshotter
from cargohold.snapshots.overlay import OverlaySnapshotter, default_snapshotter_name, overlay_supported

SnapshotterFactory = Callable[[Path, MetadataDB, str], Snapshotter]
"""Builds a snapshotter from (root, db, namespace)."""

SNAPSHOTTERS: dict[str, SnapshotterFactory] = {
    NativeSnapshotter.name: NativeSnapshotter,
    OverlaySnapshotter.name: OverlaySnapshotter,
}


def open_snapshotter(
    name: str, root: Path | str, db: MetadataDB, namespace: str = DEFAULT_NAMESPACE
) -> Snapshotter:
    """The snapshotter registered as ``name`` ("native", "overlayfs", ...) for ``namespace``."""
    try:
        factory = SNAPSHOTTERS[name]
    except KeyError:
        known = ", ".join(sorted(SNAPSHOTTERS))
        raise InvalidArgumentError(f"unknown snapshotter {name!r} (known: {known})") from None
    return factory(Path(root), db, namespace)


def open_proxy_snapshotter(name: str, address: str, *, namespace: str = DEFAULT_NAMESPACE, remote: bool = False,
                           namespaced_keys: bool = False) -> Snapshotter:
    """A snapshotter served over containerd's snapshots gRPC API on the unix socket ``address``; with
    ``namespaced_keys`` keys are made unique per namespace on this side (for daemons that ignore it)."""
    from cargohold.snapshots.proxy import ProxySnapshotter  # grpc is loaded only when a proxy is used

    return ProxySnapshotter(name, address, namespace=namespace, remote=remote, namespaced_keys=namespaced_keys)


def known_snapshotters() -> list[str]:
    """Names of every registered snapshotter."""
    return sorted(SNAPSHOTTERS)


def available_snapshotters(root: Path | str) -> list[str]:
    """Registered snapshotters usable under ``root`` here (overlayfs only where overlay mounts work)."""
    return [n for n in known_snapshotters() if n != OverlaySnapshotter.name or overlay_supported(root)]


__all__ = [
    "SNAPSHOTTERS",
    "Info",
    "Kind",
    "Mount",
    "NativeSnapshotter",
    "OverlaySnapshotter",
    "Snapshotter",
    "SnapshotterFactory",
    "Usage",
    "available_snapshotters",
    "default_snapshotter_name",
    "known_snapshotters",
    "mount_all",
    "open_proxy_snapshotter",
    "open_snapshotter",
    "overlay_supported",
    "unmount",
    "with_temp_mount",
]
