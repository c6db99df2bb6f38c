"""Unpack an image of the store into a snapshotter; whether it is unpacked.

Needs: a ``Store``, the executor for layer tasks, an event sink, and (to fetch missing blobs) a way to get
the resolver.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

from cargohold.content.namespaced import NamespacedStore
from cargohold.diff.worker import ApplyPool
from cargohold.errors import NotFoundError, UnsupportedMediaTypeError
from cargohold.events import EventSink
from cargohold.images.image import ResolvedManifest, resolve_manifest
from cargohold.metadata.labels import LEASE_UNPACK
from cargohold.metadata.leases import snapshot_kind
from cargohold.oci.platform import Platform
from cargohold.remotes.resolver import Resolver
from cargohold.remotes.sources import registry_fetch_fn
from cargohold.services import images
from cargohold.snapshots.base import Kind
from cargohold.store import Store
from cargohold.unpack.labels import cri_layer_labels
from cargohold.unpack.unpacker import FetchFn, LayerLabelsFn, Unpacker, UnpackResult


def new_unpacker(store: Store, snapshotter: str | None, fetch: FetchFn | None, content: NamespacedStore,
                 *, on_event: EventSink, executor: Executor, lease: str | None = None,
                 applier: ApplyPool | None = None, download_executor: Executor | None = None) -> Unpacker:
    """An unpacker into the store's ``snapshotter`` reading ``content``; with ``lease``, every snapshot it
    relies on is added to that lease before use."""
    unpacker = Unpacker(content=content, snapshotter=store.snapshotter(snapshotter),
                        locks_dir=store.root / "unpack" / "locks", fetch=fetch, on_event=on_event,
                        executor=executor, max_layer_size=store.config.max_layer_size,
                        max_unpacked_size=store.config.max_unpacked_size, applier=applier,
                        download_executor=download_executor)
    if lease is not None:
        kind = snapshot_kind(unpacker.snapshotter.name)
        unpacker.hold = lambda key: store.leases.add_resource(lease, kind, key)
    return unpacker


def layer_labels_fn(image_ref: str, resolved: ResolvedManifest) -> LayerLabelsFn:
    """The CRI per-layer target labels of ``resolved`` (remote snapshotters read them)."""
    layers = resolved.manifest.layers
    manifest_digest = str(resolved.descriptor.digest)
    return lambda i: cri_layer_labels(image_ref, manifest_digest, layers, i)


def unpack(
    store: Store,
    name: str,
    *,
    on_event: EventSink,
    executor: Executor,
    resolver: Callable[[], Resolver] | None = None,
    snapshotter: str | None = None,
    platform: Platform | str | None = None,
    layer_labels: bool = False,
    fetch_missing: bool = True,
    applier: ApplyPool | None = None,
    download_executor: Executor | None = None,
) -> UnpackResult:
    """Unpack an image already in the store into a snapshotter.

    Blobs missing from the store are fetched from the image's registry (through ``resolver()``) when
    ``fetch_missing`` and the image's name is a registry reference; otherwise a missing blob is an error that names it.
    """
    image = images.image(store, name)
    resolved = resolve_manifest(store.content, image.target, images.matcher([platform] if platform else []),
                                name=image.name)
    fetch: FetchFn | None = None
    if fetch_missing and resolver is not None:
        fetch = registry_fetch_fn(resolver, image.name, store.content, on_event)
    # A lease keeps the snapshots this unpack commits safe from a concurrent gc until the config's
    # gc.ref.snapshot label (set at the end) references them.
    with store.leases.hold(labels={LEASE_UNPACK: image.name}) as lease:
        unpacker = new_unpacker(store, snapshotter, fetch, store.content.with_lease(lease.id), on_event=on_event,
                                executor=executor, lease=lease.id, applier=applier,
                                download_executor=download_executor)
        return unpacker.unpack(resolved, layer_labels=layer_labels_fn(image.name, resolved) if layer_labels else None)


def unpacked(store: Store, name: str, snapshotter: str | None = None, platform: Platform | str | None = None
             ) -> bool:
    """Whether the image's top layer snapshot exists in the snapshotter."""
    try:
        resolved = images.resolve_manifest(store, name, platform)
    except (NotFoundError, UnsupportedMediaTypeError):  # an artifact is never unpacked
        return False
    return committed_in(store, resolved, snapshotter)


def committed_in(store: Store, resolved: ResolvedManifest, snapshotter: str | None) -> bool:
    """Whether the top layer of ``resolved`` is a committed snapshot of ``snapshotter``."""
    if not resolved.chain_ids:
        return False
    try:
        return store.snapshotter(snapshotter).stat(str(resolved.chain_ids[-1])).kind == Kind.COMMITTED
    except NotFoundError:
        return False
