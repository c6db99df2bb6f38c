"""Plan and walk a push: the image graph read from a content store (children, platform choice, what is
missing), then pushed in dependency order by a ``Pusher``: blobs first, a few at a time (skipped when present,
mounted from another repository of the same registry when their source label names one), then manifests, the
tagged target last.

>>> outcome = push_image(pusher, store, plan_push(store, image.target), tag="v1")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from cargohold.errors import (
    FailedPreconditionError,
    NotFoundError,
    UnsupportedMediaTypeError,
)
from cargohold.events import Event, EventSink, discard
from cargohold.images.handlers import dispatch, read_manifest_or_index
from cargohold.images.image import manifest_for
from cargohold.metadata.labels import DISTRIBUTION_SOURCE
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.kinds import Kind
from cargohold.oci.manifest import Index
from cargohold.oci.platform import PlatformMatcher
from cargohold.remotes.push import (
    DEFAULT_CONCURRENCY,
    Pusher,
    PushSource,
    Upload,
    is_manifest_like,
)
from cargohold.remotes.referrers import after_manifest_push

log = logging.getLogger(__name__)


# -- planning ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PushPlan:
    """What a push sends, in order: ``levels[0]`` are the blobs, then manifests, then indexes; the last
    level holds only ``target``, the descriptor the tag will point at.

    ``missing`` are descriptors the store lacks (a push cannot start until it is empty); ``skipped`` are
    non-distributable layers that are not uploaded. ``whole`` is False when a platform choice replaced an
    index by one of its manifests.
    """

    root: Descriptor
    target: Descriptor
    levels: tuple[tuple[Descriptor, ...], ...]
    missing: tuple[Descriptor, ...] = ()
    skipped: tuple[Descriptor, ...] = ()

    @property
    def whole(self) -> bool:
        return self.target.digest == self.root.digest

    @property
    def descriptors(self) -> tuple[Descriptor, ...]:
        return tuple(d for level in self.levels for d in level)


def plan_push(
    source: PushSource,
    root: Descriptor,
    *,
    matcher: PlatformMatcher | None = None,
    allow_nondistributable: bool = False,
) -> PushPlan:
    """Read the graph under ``root`` from ``source`` and order it for pushing.

    Without ``matcher`` everything under ``root`` is pushed. With one and an index ``root``: when every
    manifest of the index matches, the index is pushed whole; otherwise only the best-matching manifest is,
    and it becomes the target (what ``ctr push --platform`` does). NotFoundError when none matches.
    """
    target = root
    if matcher is not None and mt.is_index(root.media_type) and source.exists(root.digest):
        target = _choose(source, root, matcher)
    heights: dict[Digest, int] = {}
    order: list[Descriptor] = []
    missing: list[Descriptor] = []
    skipped: list[Descriptor] = []

    def visit(desc: Descriptor, parent: Descriptor | None) -> int:
        known = heights.get(desc.digest)
        if known is not None:
            return known
        if is_manifest_like(desc.media_type):
            if not source.exists(desc.digest):
                missing.append(desc)
                height = 2 if mt.is_index(desc.media_type) else 1
            else:
                kids = _children(source, desc)
                height = 1 + max((visit(k, desc) for k in kids), default=0)
        elif parent is not None and mt.is_index(parent.media_type):
            if kinds.classify(desc) is Kind.SCHEMA1:
                raise kinds.schema1_error(f"index {parent.digest}: entry {desc.digest}")
            raise UnsupportedMediaTypeError(
                f"index {parent.digest}: entry {desc.describe()} is neither a manifest nor an index"
            )
        elif desc.media_type in mt.NON_DISTRIBUTABLE and not allow_nondistributable:
            skipped.append(desc)
            heights[desc.digest] = -1
            return 0
        else:
            if not source.exists(desc.digest):
                missing.append(desc)
            height = 0
        heights[desc.digest] = height
        order.append(desc)
        return height

    visit(target, None)
    top = max(heights.values(), default=0)
    levels = [tuple(d for d in order if heights[d.digest] == h and d.digest != target.digest)
              for h in range(top + 1)]
    levels = [level for level in levels if level]
    levels.append((target,))
    return PushPlan(root=root, target=target, levels=tuple(levels), missing=tuple(missing), skipped=tuple(skipped))


def _children(source: PushSource, desc: Descriptor) -> list[Descriptor]:
    doc = read_manifest_or_index(source, desc)
    if isinstance(doc, Index):
        return list(doc.manifests)
    return [doc.config, *doc.layers]


def _choose(source: PushSource, root: Descriptor, matcher: PlatformMatcher) -> Descriptor:
    """The index whole when every runnable manifest in it matches (attestations ride along), else the best
    matching manifest (through nested indexes)."""
    index = Index.parse(source.read_all(root.digest), root.media_type, where=root.describe())
    entries = list(index.manifests)
    runnable = [m for m in entries if kinds.is_runnable(m)]
    if runnable and len(runnable) + sum(kinds.is_attestation(m) for m in entries) == len(entries) and all(
            matcher.rank(m.platform) is not None for m in runnable):
        return root
    return manifest_for(source, root, matcher)


# -- the walk ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PushOutcome:
    """What a push did: ``target`` is what the tag points at; every descriptor of the plan is in exactly one
    of ``pushed`` (uploaded or PUT), ``mounted`` (cross-repository mount) and ``existing`` (already there)."""

    target: Descriptor
    pushed: tuple[Descriptor, ...]
    mounted: tuple[Descriptor, ...]
    existing: tuple[Descriptor, ...]


def mount_candidates(source: PushSource, desc: Descriptor, pusher: Pusher) -> list[str]:
    """Repositories of the destination registry that hold ``desc``, from its distribution-source label."""
    try:
        labels = source.info(desc.digest).labels
    except NotFoundError:
        return []
    value = labels.get(f"{DISTRIBUTION_SOURCE}.{pusher.domain}", "")
    return [repo for repo in dict.fromkeys(r.strip() for r in value.split(",")) if repo and repo != pusher.repository]


def push_image(
    pusher: Pusher,
    source: PushSource,
    plan: PushPlan,
    *,
    tag: str = "",
    concurrency: int = DEFAULT_CONCURRENCY,
    on_event: EventSink | None = None,
) -> PushOutcome:
    """Push a plan: each level after the one before, ``concurrency`` at a time; the target under ``tag``
    (or its digest). A blob the repository has is skipped (HEAD); one whose distribution-source label names
    another repository of the same registry is mounted from there. Events: action ``push``, status
    running/done/exists/mounted/error, item the digest (the target's ``done`` names the tag in its message).
    """
    if plan.missing:
        raise FailedPreconditionError(
            f"push to {pusher.name}: missing content: {', '.join(str(d.digest) for d in plan.missing)}"
        )
    emit = on_event or discard
    lock = threading.Lock()
    results: dict[str, list[Descriptor]] = {"pushed": [], "mounted": [], "existing": []}

    def note(kind: str, desc: Descriptor) -> None:
        with lock:
            results[kind].append(desc)

    def event(status: str, desc: Descriptor, current: int = 0, message: str = "") -> None:
        emit(Event(action="push", status=status, item=str(desc.digest), media_type=desc.media_type,
                   current=current, total=desc.size, message=message))

    def one_blob(desc: Descriptor) -> None:
        if pusher.exists(desc):
            event("exists", desc, desc.size)
            note("existing", desc)
            return
        upload: Upload | None = None
        candidates = mount_candidates(source, desc, pusher)
        for i, repo in enumerate(candidates):
            upload = pusher.mount(desc, repo)
            if upload is None:
                event("mounted", desc, desc.size, f"from {repo}")
                note("mounted", desc)
                return
            if i + 1 < len(candidates):
                pusher.cancel(upload)
                upload = None
        event("running", desc)
        with source.reader_at(desc.digest) as reader:
            pusher.push_blob(desc, reader, upload=upload, progress=lambda sent: event("running", desc, sent))
        event("done", desc, desc.size)
        note("pushed", desc)

    def one_manifest(desc: Descriptor) -> None:
        is_target = desc.digest == plan.target.digest
        where = tag if is_target and tag else ""
        present = pusher.manifest_digest(where) == desc.digest if where else pusher.exists(desc)
        if present:
            event("exists", desc, desc.size)
            note("existing", desc)
            return
        event("running", desc)
        raw = source.read_all(desc.digest)
        oci_subject = pusher.push_manifest(desc, raw, tag=where)
        # A manifest with a subject must be listed among the subject's referrers: by the registry when it
        # says so (OCI-Subject), else in the referrers tag schema's fallback tag.
        after_manifest_push(pusher, desc, raw, oci_subject)
        event("done", desc, desc.size, f"{pusher.name}:{where}" if where else "")
        note("pushed", desc)

    def one(desc: Descriptor) -> None:
        try:
            if is_manifest_like(desc.media_type):
                one_manifest(desc)
            else:
                one_blob(desc)
        except Exception as exc:
            event("error", desc, message=str(exc))
            raise

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        one(desc)
        return ()  # the plan's levels say what comes next, not the graph

    for level in plan.levels:
        # The first error stops what has not started and is raised.
        dispatch(handle, level, concurrency=concurrency)
    return PushOutcome(target=plan.target, pushed=tuple(results["pushed"]), mounted=tuple(results["mounted"]),
                       existing=tuple(results["existing"]))
