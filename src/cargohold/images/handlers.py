"""Handlers walk the descriptor graph, as containerd's images.Handler does.

A handler takes a descriptor and returns the children to visit next. Decorators filter platforms, keep the
best manifests, and set GC labels; ``dispatch`` walks the graph with bounded concurrency.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack

from cargohold.content.store import ContentStore, Provider
from cargohold.errors import CargoholdError
from cargohold.metadata.labels import LABEL_GC_REF_CONTENT
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.kinds import Kind
from cargohold.oci.limits import check_index_depth
from cargohold.oci.manifest import Index, Manifest, parse_manifest_or_index
from cargohold.oci.platform import PlatformMatcher

log = logging.getLogger(__name__)

Handler = Callable[[Descriptor], Sequence[Descriptor]]


class StopWalk(Exception):
    """Raised by a handler to stop descending below a descriptor without failing the walk."""


def read_manifest_or_index(provider: Provider, desc: Descriptor) -> Manifest | Index:
    raw = provider.read_all(desc.digest)
    return parse_manifest_or_index(raw, desc.media_type, where=f"{desc.media_type} {desc.digest}")


def children(provider: Provider) -> Handler:
    """Children of a descriptor read from the store: an index's manifests, a manifest's config and layers.

    Configs, layers and media types not understood (in-toto statements, artifact blobs) have no children,
    as containerd's images.Children: they are carried as opaque blobs. Schema 1 is an error naming it.
    """

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        if mt.is_index(desc.media_type) or mt.is_manifest(desc.media_type):
            doc = read_manifest_or_index(provider, desc)
            if isinstance(doc, Index):
                return list(doc.manifests)
            return [doc.config, *doc.layers]
        if desc.media_type in mt.SCHEMA1_TYPES:
            raise kinds.schema1_error(desc.describe())
        return []

    return handle


def manifest_children_labels(desc: Descriptor, kids: Sequence[Descriptor]) -> dict[str, str]:
    """containerd's GC reference labels for a parent's children: ``.m.<i>``, ``.config``, ``.l.<i>``."""
    labels: dict[str, str] = {}
    if mt.is_index(desc.media_type):
        for i, kid in enumerate(kids):
            labels[f"{LABEL_GC_REF_CONTENT}.m.{i}"] = str(kid.digest)
    elif mt.is_manifest(desc.media_type):
        layer = 0
        for kid in kids:
            if mt.is_config(kid.media_type) and f"{LABEL_GC_REF_CONTENT}.config" not in labels:
                labels[f"{LABEL_GC_REF_CONTENT}.config"] = str(kid.digest)
            else:
                labels[f"{LABEL_GC_REF_CONTENT}.l.{layer}"] = str(kid.digest)
                layer += 1
    return labels


def set_children_labels(store: ContentStore, handler: Handler) -> Handler:
    """After ``handler`` lists a parent's children, label the parent so GC keeps the children."""

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        kids = handler(desc)
        labels = manifest_children_labels(desc, kids)
        if labels:
            store.update(desc.digest, dict(labels))
        return kids

    return handle


def label_children(store: ContentStore, descs: Iterable[Descriptor]) -> None:
    """Set the GC reference labels on every index and manifest of ``descs``, so what they reference stays
    (import, export --fetch-missing and copy from an archive, where nothing walked the graph with labels)."""
    label = set_children_labels(store, children(store))
    for desc in descs:
        if mt.is_index(desc.media_type) or mt.is_manifest(desc.media_type):
            label(desc)


def filter_platforms(handler: Handler, matcher: PlatformMatcher | None) -> Handler:
    """Keep an index's children that match the platforms (those without a platform are kept). Attestations
    and other non-runnable manifests are dropped: a platform never selects them."""

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        kids = handler(desc)
        if matcher is None or not mt.is_index(desc.media_type):
            return kids
        return [k for k in kids if kinds.classify(k) in (Kind.IMAGE, Kind.INDEX, Kind.SCHEMA1)
                and (k.platform is None or matcher.match(k.platform))]

    return handle


def limit_manifests(handler: Handler, matcher: PlatformMatcher, limit: int = 1) -> Handler:
    """Of an index's manifests, keep the ``limit`` best platform matches (nested indexes pass through;
    attestations and other non-runnable manifests are dropped)."""

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        kids = handler(desc)
        if not mt.is_index(desc.media_type):
            return kids
        ranked = []
        others = []
        for i, kid in enumerate(kids):
            kind = kinds.classify(kid)
            if kind in (Kind.IMAGE, Kind.SCHEMA1):  # a chosen schema 1 entry fails clearly when read
                rank = matcher.rank(kid.platform)
                if rank is not None:
                    ranked.append((rank, i, kid))
            elif kind is Kind.INDEX:
                others.append(kid)
        ranked.sort(key=lambda t: (t[0], t[1]))
        return [k for _, _, k in ranked[:limit]] + others

    return handle


def compose(*handlers: Handler) -> Handler:
    """Run handlers in order on each descriptor; children are the concatenation of what they return."""

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        out: list[Descriptor] = []
        for h in handlers:
            out.extend(h(desc))
        return out

    return handle


def dispatch(handler: Handler, roots: Iterable[Descriptor], *, executor: Executor | None = None,
             concurrency: int = 3) -> None:
    """Walk the graph from ``roots``, calling ``handler`` on every descriptor in ``executor`` (the caller's
    pool; without one, a pool of ``concurrency`` threads made and shut down here).

    Handlers must not wait on work of the same executor: this call waits from the calling thread only.

    A descriptor reached twice (shared layer, shared config) is handled once. The first error stops new
    work from being scheduled, waits for what is running, and is raised. Indexes nested deeper than
    MAX_INDEX_DEPTH are refused before they are handled (fetched), so a hostile nesting costs a few blobs.
    """
    seen: set[tuple[str, str]] = set()
    seen_lock = threading.Lock()
    errors: list[BaseException] = []
    pending: dict[Future[Sequence[Descriptor]], int] = {}  # -> index nesting level of its descriptor

    with ExitStack() as stack:
        pool = executor if executor is not None else stack.enter_context(
            ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="dispatch"))

        def submit(descs: Iterable[Descriptor], parent_level: int) -> None:
            for d in descs:
                key = (str(d.digest), d.media_type)
                with seen_lock:
                    if key in seen:
                        continue
                    seen.add(key)
                level = parent_level + 1 if mt.is_index(d.media_type) else parent_level
                try:
                    check_index_depth(level, d.digest)
                except CargoholdError as exc:
                    errors.append(exc)
                    return
                pending[pool.submit(_run, handler, d)] = level

        submit(roots, 0)
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                level = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    errors.append(exc)
                    continue
                if not errors:
                    submit(fut.result(), level)
            if errors:
                for fut in pending:
                    fut.cancel()
                wait(pending)
                pending.clear()
    if errors:
        raise errors[0]


def _run(handler: Handler, desc: Descriptor) -> Sequence[Descriptor]:
    try:
        return handler(desc)
    except StopWalk:
        return []
