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
from cargohold.errors import CargoholdError, LimitExceededError, UnsupportedMediaTypeError
from cargohold.events import Event, EventSink
from cargohold.images.handlers import (
    Handler,
    children,
    compose,
    dispatch,
    filter_platforms,
    limit_manifests,
    manifest_children_labels,
    read_manifest_or_index,
    set_children_labels,
)
from cargohold.images.image import manifest_for, resolve_manifest
from cargohold.metadata.db import utcnow
from cargohold.metadata.images import Image
from cargohold.metadata.labels import LABEL_GC_REF_SNAPSHOT, LEASE_PULL
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
from cargohold.snapshots.base import Kind
from cargohold.store import Store
from cargohold.unpack.unpacker import LayerOutcome, UnpackResult


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


# -- the second pull: nothing to do ------------------------------------------------------------------------


class _NotPulled(Exception):
    """Something a full pull would fetch, label, unpack or record is not there: take the full pull."""


def already_pulled(
    store: Store,
    reference: Reference,
    target: Descriptor,
    *,
    on_event: EventSink,
    executor: Executor,
    platforms: Sequence[Platform | str] = (),
    all_platforms: bool = False,
    unpack: bool = True,
    snapshotter: str | None = None,
) -> PullResult | None:
    """The result of pulling ``reference`` (resolved to ``target``) when the store already holds everything a
    full pull would leave, else None (the caller then pulls).

    "Everything": the image record names ``target`` with no labels (a pull would replace them), every blob the
    pull walks is present with its GC children labels and this repository in its distribution-source label,
    no layer is over ``max_layer_size``, and (``unpack``) every layer's snapshot is committed in the (local)
    snapshotter and the config's ``gc.ref.snapshot`` label names the top one. Only the store is read (records,
    labels, manifests): nothing is fetched, applied or written, not even the image's ``updated_at``. Events and
    the result are those of a full pull that found everything: each blob "fetch exists", each layer "apply
    exists". Anything unexpected (an artifact, a missing manifest, a remote snapshotter) leaves the decision, and its
    error, to the full pull.
    """
    try:
        result, events = _already_pulled(store, reference, target, executor=executor, platforms=platforms,
                                         all_platforms=all_platforms, unpack=unpack, snapshotter=snapshotter)
    except (_NotPulled, CargoholdError):
        return None
    # Reported only now: a pull that falls through to the full one reports each blob once.
    for event in events:
        on_event(event)
    on_event(Event(action="pull", status="done", item=str(reference), message=str(target.digest)))
    return result


def _already_pulled(store: Store, reference: Reference, target: Descriptor, *, executor: Executor,
                    platforms: Sequence[Platform | str], all_platforms: bool, unpack: bool,
                    snapshotter: str | None) -> tuple[PullResult, list[Event]]:
    name = str(reference)
    image = store.images.get(name)  # NotFoundError: a first pull
    have = image.target  # as the record keeps it: a full pull would store the resolved target's same fields
    if (have.media_type, have.digest, have.size, dict(have.annotations)) != (
            target.media_type, target.digest, target.size, dict(target.annotations)) or image.labels:
        raise _NotPulled()
    content = store.content
    (source_key, repo), = source_label(reference).items()
    limit = store.config.max_layer_size
    events: list[Event] = []
    present: list[Descriptor] = []
    manifests: list[Descriptor] = []
    record = threading.Lock()

    def labels_of(desc: Descriptor) -> dict[str, str]:
        return dict(content.info(desc.digest).labels)  # NotFoundError: a blob to fetch

    def check(desc: Descriptor) -> Sequence[Descriptor]:
        labels = labels_of(desc)
        if repo not in labels.get(source_key, "").split(","):
            raise _NotPulled()
        if limit is not None and desc.size > limit and mt.is_layer(desc.media_type):
            raise _NotPulled()  # the full pull refuses it, naming the limit
        with record:
            present.append(desc)
            if kinds.is_runnable(desc):
                manifests.append(desc)
            events.append(Event(action="fetch", status="exists", item=str(desc.digest),
                                media_type=desc.media_type, current=desc.size, total=desc.size))
        return []

    def labelled(handler: Handler) -> Handler:
        def handle(desc: Descriptor) -> Sequence[Descriptor]:
            kids = handler(desc)
            want = manifest_children_labels(desc, kids)
            if want and not want.items() <= labels_of(desc).items():
                raise _NotPulled()
            return kids

        return handle

    matcher = images.matcher(platforms)
    walk: Handler = labelled(children(content))
    if not all_platforms:
        walk = limit_manifests(filter_platforms(walk, matcher), matcher, 1)
    if unpack:
        walk = _refuse_artifact(walk, content, target, name)
    dispatch(compose(check, walk), [target], executor=executor)

    unpack_result: UnpackResult | None = None
    if unpack:
        resolved = resolve_manifest(content, manifest_for(content, target, matcher), matcher, name=name)
        sn = store.snapshotter(snapshotter)
        chains = resolved.chain_ids
        if getattr(sn, "remote", False) or not chains:
            raise _NotPulled()  # a remote snapshotter's answers are its own; no layers is the unpacker's error
        layers = []
        for i, (layer, chain) in enumerate(zip(resolved.manifest.layers, chains, strict=True)):
            if sn.stat(str(chain)).kind != Kind.COMMITTED:  # NotFoundError: a layer to apply
                raise _NotPulled()
            layers.append(LayerOutcome(index=i, chain_id=chain, digest=layer.digest, status="exists",
                                       fetched=False))
            events.append(Event(action="apply", status="exists", item=str(layer.digest),
                                media_type=layer.media_type, message=f"snapshot {chain.short} exists"))
        config_labels = labels_of(resolved.manifest.config)
        if config_labels.get(f"{LABEL_GC_REF_SNAPSHOT}.{sn.name}") != str(chains[-1]):
            raise _NotPulled()
        unpack_result = UnpackResult(chain_id=chains[-1], snapshotter=sn.name, layers=tuple(layers))

    return PullResult(image=image, manifests=tuple(manifests), fetched=(), present=tuple(present),
                      unpack=unpack_result), events


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
    on_event(Event(action="resolve", status="running", item=str(reference)))
    with stages.timed("resolve"):
        _, target = resolver.resolve(reference)
    on_event(Event(action="resolve", status="done", item=str(reference), message=str(target.digest)))
    done = already_pulled(store, reference, target, on_event=on_event, executor=executor, platforms=platforms,
                          all_platforms=all_platforms, unpack=unpack, snapshotter=snapshotter)
    if done is not None:  # a second pull: everything is here already
        return done
    if unpack:
        (applier or shared_pool()).prestart()  # worker processes start while the manifests are fetched
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
