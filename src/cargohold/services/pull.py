"""Pull: resolve a reference, fetch the image's blobs for the platforms, unpack them, record the image.

Needs: a ``Store``, a resolver, an event sink, the executor walking the graph and the one for layer tasks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from cargohold import stages
from cargohold.content.namespaced import NamespacedStore
from cargohold.diff.worker import ApplyPool, shared_pool
from cargohold.errors import LimitExceededError, UnsupportedMediaTypeError
from cargohold.events import Event, EventSink
from cargohold.images.handlers import (
    Handler,
    children,
    compose,
    dispatch,
    filter_platforms,
    limit_manifests,
    read_manifest_or_index,
    set_children_labels,
)
from cargohold.images.image import manifest_for, resolve_manifest
from cargohold.metadata.db import utcnow
from cargohold.metadata.images import Image
from cargohold.metadata.labels import LEASE_PULL
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.artifact import is_image, not_runnable_message
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.manifest import Manifest
from cargohold.oci.platform import Platform
from cargohold.oci.reference import Reference
from cargohold.remotes.fetch import BlobTap
from cargohold.remotes.resolver import Resolver
from cargohold.remotes.sources import fetch_one as fetch_blob_once
from cargohold.remotes.sources import source_label
from cargohold.services import images
from cargohold.services.unpack import layer_labels_fn, new_unpacker
from cargohold.store import Store
from cargohold.unpack.unpacker import UnpackResult


@dataclass(frozen=True, slots=True, kw_only=True)
class PullResult:
    image: Image
    manifests: tuple[Descriptor, ...]
    fetched: tuple[Descriptor, ...]
    present: tuple[Descriptor, ...]
    unpack: UnpackResult | None = None

    @property
    def fetched_bytes(self) -> int:
        return sum(d.size for d in self.fetched)


def pull(
    store: Store,
    ref: str,
    *,
    resolver: Resolver,
    on_event: EventSink,
    executor: Executor,
    unpack_executor: Executor,
    platforms: Sequence[Platform | str] = (),
    all_platforms: bool = False,
    unpack: bool = True,
    snapshotter: str | None = None,
    layer_labels: bool = False,
    applier: ApplyPool | None = None,
) -> PullResult:
    """Resolve ``ref``, fetch the image's blobs for the platforms, unpack them, record the image.

    Without ``platforms`` the host platform's best match is fetched; ``all_platforms`` fetches every
    one (only the best match for ``platforms``/the host is unpacked). With ``unpack`` (the default), layers
    stream from the registry into the snapshotter as they arrive. ``layer_labels`` adds the CRI per-layer
    target labels that remote snapshotters use.
    """
    reference = Reference.parse(ref)
    if unpack:
        (applier or shared_pool()).prestart()  # worker processes start while the image is resolved
    on_event(Event(action="resolve", status="running", item=str(reference)))
    with stages.timed("resolve"):
        _, target = resolver.resolve(reference)
    on_event(Event(action="resolve", status="done", item=str(reference), message=str(target.digest)))
    # A lease keeps what this pull writes safe from garbage collection until the image record exists.
    with store.leases.hold(labels={LEASE_PULL: str(reference)}) as lease:
        content = store.content.with_lease(lease.id)
        fetcher = resolver.fetcher(reference)
        matcher = images.matcher(platforms)
        fetched: list[Descriptor] = []
        present: list[Descriptor] = []
        manifests: list[Descriptor] = []
        deferred: dict[Descriptor, list[Descriptor]] = {}
        record = threading.Lock()
        source = source_label(reference)

        def fetch_one(desc: Descriptor, /, *, tap: BlobTap | None = None) -> bool:
            limit = store.config.max_layer_size
            if limit is not None and desc.size > limit and mt.is_layer(desc.media_type):
                raise LimitExceededError(
                    f"layer {desc.digest}: {desc.size} bytes is more than max_layer_size ({limit} bytes); "
                    "not fetched")
            was_fetched = fetch_blob_once(fetcher, desc, content, source, on_event, tap=tap)
            with record:
                # A layer is also asked for by the unpacker after the walk saw it: list each blob once.
                seen = fetched if was_fetched else present
                if desc not in seen:
                    seen.append(desc)
            return was_fetched

        def fetch(desc: Descriptor) -> Sequence[Descriptor]:
            fetch_one(desc)
            if kinds.is_runnable(desc):  # an attestation is fetched as content, not one of the image's manifests
                with record:
                    manifests.append(desc)
            return []

        walk: Handler = set_children_labels(content, children(content))
        if not all_platforms:
            walk = limit_manifests(filter_platforms(walk, matcher), matcher, 1)
        if unpack:
            walk = _defer_layers(_refuse_artifact(walk, content, target, str(reference)), deferred, record)
        dispatch(compose(fetch, walk), [target], executor=executor)

        unpack_result: UnpackResult | None = None
        if unpack:
            chosen = manifest_for(content, target, matcher)
            rest = [layer for m, layers in deferred.items() if m.digest != chosen.digest for layer in layers]
            if rest:  # other platforms' layers (--all-platforms): fetched, not unpacked
                dispatch(fetch, rest, executor=executor)
            resolved = resolve_manifest(content, chosen, matcher, name=str(reference))
            # Layer downloads run on the walk's pool (idle by now), never behind the layer tasks.
            unpacker = new_unpacker(store, snapshotter, fetch_one, content, on_event=on_event,
                                    executor=unpack_executor, lease=lease.id, applier=applier,
                                    download_executor=executor)
            unpack_result = unpacker.unpack(
                resolved, layer_labels=layer_labels_fn(str(reference), resolved) if layer_labels else None)

        image_name = str(reference)
        now = utcnow()
        image = store.images.put(Image(name=image_name, target=target, labels={}, created_at=now, updated_at=now))
        on_event(Event(action="pull", status="done", item=image_name, message=str(target.digest)))
    return PullResult(image=image, manifests=tuple(manifests), fetched=tuple(fetched), present=tuple(present),
                      unpack=unpack_result)


def _defer_layers(handler: Handler, deferred: dict[Descriptor, list[Descriptor]], lock: threading.Lock) -> Handler:
    """Keep manifests' layers out of the walk (the unpacker streams them) and note them by manifest."""

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        kids = handler(desc)
        if not mt.is_manifest(desc.media_type):
            return kids
        layers = [k for k in kids if mt.is_layer(k.media_type)]
        with lock:
            deferred[desc] = layers
        return [k for k in kids if not mt.is_layer(k.media_type)]

    return handle


def _refuse_artifact(handler: Handler, store: NamespacedStore, target: Descriptor, name: str) -> Handler:
    """Before walking below the target manifest, refuse an artifact: a pull that unpacks fetches nothing more
    of it and records no image (``resolve_manifest`` says the same for an artifact chosen from an index)."""

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        if desc.digest == target.digest and mt.is_manifest(desc.media_type):
            doc = read_manifest_or_index(store, desc)
            if isinstance(doc, Manifest) and not is_image(doc):
                raise UnsupportedMediaTypeError(not_runnable_message(name, doc))
        return handler(desc)

    return handle
