"""Push images from the store to a registry.

Platforms: without ``platforms`` (or with ``all_platforms``) the whole image is pushed, every manifest of
an index included, as containerd and docker do; a blob missing from the store is then an error naming every
missing digest. With ``platforms`` and an index: if every manifest of the index matches, the index is pushed
whole; otherwise only the best-matching manifest is pushed, under the tag, as ``ctr push --platform`` does
(the index itself is not pushed: it would name manifests the registry lacks).

Needs: a ``Store``, a resolver and an event sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cargohold.content.namespaced import NamespacedStore
from cargohold.errors import FailedPreconditionError, InvalidArgumentError
from cargohold.events import Event, EventSink
from cargohold.metadata.labels import LEASE_PUSH
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.platform import Platform, PlatformMatcher
from cargohold.oci.reference import Reference
from cargohold.remotes.push import DEFAULT_CHUNK_THRESHOLD, DEFAULT_CONCURRENCY, Pusher
from cargohold.remotes.pushplan import PushPlan, plan_push, push_image
from cargohold.remotes.resolver import Resolver
from cargohold.remotes.sources import add_source_label, source_label
from cargohold.services import images
from cargohold.services.lazy import fetch_remote
from cargohold.store import Store


@dataclass(frozen=True, slots=True, kw_only=True)
class PushResult:
    """A finished push: ``name`` is the destination reference, ``target`` what its tag points at now (the
    image's target, or the chosen manifest of an index). Each pushed descriptor is in one of ``pushed``,
    ``mounted`` (cross-repository mount) or ``existing`` (the registry had it)."""

    name: str
    target: Descriptor
    pushed: tuple[Descriptor, ...]
    mounted: tuple[Descriptor, ...]
    existing: tuple[Descriptor, ...]
    skipped: tuple[Descriptor, ...] = ()

    @property
    def digest(self) -> Digest:
        return self.target.digest

    @property
    def pushed_bytes(self) -> int:
        return sum(d.size for d in self.pushed)


@dataclass(frozen=True, slots=True, kw_only=True)
class PushOptions:
    """How to push: the platforms of an index (see the module docstring), PATCH chunks above
    ``chunk_threshold`` bytes (``chunk_size`` each), ``concurrency`` blobs at a time, and whether
    non-distributable layers are uploaded too."""

    platforms: tuple[Platform | str, ...] = ()
    all_platforms: bool = False
    chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD
    chunk_size: int | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    allow_nondistributable: bool = False


def push(store: Store, ref: str, local: str | None = None, *, resolver: Resolver, on_event: EventSink,
         options: PushOptions = PushOptions()) -> PushResult:
    """Push the image ``local`` (default: the image named ``ref``) to the registry reference ``ref``.

    Blobs the repository has are skipped, blobs labelled with another repository of the same registry
    (``containerd.io/distribution.source.<host>``) are mounted, the rest uploaded, then manifests, the target
    last under the tag (see ``PushOptions``). Raises FailedPreconditionError naming every missing digest before
    pushing anything.
    """
    reference = Reference.parse(ref)
    image = images.image(store, local or ref)
    # A lazily unpacked image's remote layer blobs come from its source first (the push needs their bytes).
    check = images.check(store, image.name, platforms=options.platforms,
                         all_platforms=options.all_platforms or not options.platforms)
    if check.remote:
        fetch_remote(store, image, check, lambda: resolver, on_event, f"cannot push image {image.name}")
    # A lease: every blob the push reads is held before it is read, so removing the image meanwhile and a
    # gc cannot pull blobs out from under the upload.
    with store.leases.hold(labels={LEASE_PUSH: str(reference)[-200:]}) as lease:
        return push_target(reference, image.target, store.content.with_lease(lease.id), resolver=resolver,
                           on_event=on_event, what=f"image {image.name}", options=options)


def push_target(reference: Reference, root: Descriptor, content: NamespacedStore, *, resolver: Resolver,
                on_event: EventSink, what: str, options: PushOptions = PushOptions()) -> PushResult:
    """Push the graph under ``root`` from ``content`` to ``reference`` (``push`` and ``copy`` share it);
    ``what`` names the source in errors."""
    matcher = _push_matcher(options.platforms, options.all_platforms)
    plan = plan_push(content, root, matcher=matcher, allow_nondistributable=options.allow_nondistributable)
    if reference.digest is not None and reference.digest != plan.target.digest:
        raise InvalidArgumentError(f"cannot push {what} to {reference}: it is {plan.target.digest}, not "
                                   f"{reference.digest}")
    _check_complete(plan, what, reference, matcher is not None)
    pusher = Pusher(resolver, reference, chunk_threshold=options.chunk_threshold, chunk_size=options.chunk_size)
    item = str(reference)
    on_event(Event(action="push", status="info", item=item, message=f"to {pusher.host.describe()}"))
    outcome = push_image(pusher, content, plan, tag=reference.tag, concurrency=options.concurrency,
                         on_event=on_event)
    # Note the blobs' new home, so a later push to another repository of that registry can mount them.
    source = source_label(reference)
    for desc in [*outcome.pushed, *outcome.mounted, *outcome.existing]:
        add_source_label(content, desc, source)
    name = str(reference.with_tag(reference.tag)) if reference.tag else f"{reference.name}@{plan.target.digest}"
    on_event(Event(action="push", status="done", item=name, message=str(plan.target.digest)))
    return PushResult(name=name, target=plan.target, pushed=outcome.pushed, mounted=outcome.mounted,
                      existing=outcome.existing, skipped=plan.skipped)


def _push_matcher(platforms: Sequence[Platform | str], all_platforms: bool) -> PlatformMatcher | None:
    if all_platforms or not platforms:
        return None
    return PlatformMatcher([p if isinstance(p, Platform) else Platform.parse(p) for p in platforms])


def _check_complete(plan: PushPlan, what: str, reference: Reference, filtered: bool) -> None:
    if not plan.missing:
        return
    digests = ", ".join(str(d.digest) for d in plan.missing)
    hint = "" if filtered else (
        "; push one platform with --platform, or fetch every platform first (pull --all-platforms)"
    )
    raise FailedPreconditionError(
        f"cannot push {what} to {reference}: {len(plan.missing)} blob(s) missing from the store: {digests}{hint}"
    )
