"""Images unpacked lazily by a remote snapshotter: which blobs live only at their source, and fetching them.

A lazy image's config carries ``cargohold.io/lazy.<snapshotter>`` (set by the unpacker). Its layer blobs that
the content store lacks are *remote*, not missing: ``images check`` says so, and export, push and copy fetch
them from the image's source on demand (the image name's registry, then the repositories its target came
from).

Needs: a ``Store``, an event sink and, to fetch, a way to get the resolver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import replace

from cargohold.errors import (
    CargoholdError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedMediaTypeError,
)
from cargohold.events import EventSink
from cargohold.images.handlers import read_manifest_or_index
from cargohold.images.image import CheckResult
from cargohold.metadata.images import Image
from cargohold.metadata.labels import DISTRIBUTION_SOURCE, LABEL_LAZY
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import Manifest
from cargohold.remotes.resolver import Resolver
from cargohold.remotes.sources import FetchFn, registry_fetch_fn
from cargohold.store import Store


def lazy_layers(store: Store, manifests: Sequence[Descriptor]) -> set[Digest]:
    """The layer digests of those ``manifests`` whose config is labelled lazy (for any snapshotter)."""
    out: set[Digest] = set()
    for desc in manifests:
        try:
            doc = read_manifest_or_index(store.content, desc)
            if not isinstance(doc, Manifest):
                continue
            labels = store.content.info(doc.config.digest).labels
        except (NotFoundError, InvalidArgumentError, UnsupportedMediaTypeError):
            continue
        if any(key.startswith(LABEL_LAZY + ".") and value == "true" for key, value in labels.items()):
            out.update(layer.digest for layer in doc.layers)
    return out


def with_remote(store: Store, result: CheckResult) -> CheckResult:
    """``result`` with the missing layer blobs of lazily unpacked manifests moved to ``remote``."""
    if not result.missing:
        return result
    lazy = lazy_layers(store, result.manifests)
    if not lazy:
        return result
    remote = tuple(d for d in result.missing if d.digest in lazy)
    missing = tuple(d for d in result.missing if d.digest not in lazy)
    return replace(result, complete=not missing, missing=missing, remote=remote)


def fetchers_for(store: Store, image: Image, resolver: Callable[[], Resolver], on_event: EventSink
                 ) -> list[FetchFn]:
    """Fetch functions to try for blobs of ``image``: the image name's registry, then the repositories its
    target came from (``containerd.io/distribution.source.<host>`` labels)."""
    names = [image.name]
    with contextlib.suppress(NotFoundError):
        labels = store.content.info(image.target.digest).labels
        for key, repos in sorted(labels.items()):
            if key.startswith(DISTRIBUTION_SOURCE + "."):
                host = key[len(DISTRIBUTION_SOURCE) + 1:]
                names += [f"{host}/{repo}" for repo in repos.split(",") if repo]
    fns = [registry_fetch_fn(resolver, n, store.content, on_event) for n in dict.fromkeys(names)]
    return [fn for fn in fns if fn is not None]


def fetch_blobs(store: Store, wanted: Sequence[tuple[Image, Descriptor]], failures: list[str],
                resolver: Callable[[], Resolver], on_event: EventSink) -> list[Descriptor]:
    """Fetch each (image, blob) from the image's sources, the first that has it; the blobs fetched. What no
    source gave is appended to ``failures`` as ``<digest>: <error>``."""
    got: list[Descriptor] = []
    done: set[Digest] = set()
    for image, desc in wanted:
        if desc.digest in done:
            continue
        for fetch in fetchers_for(store, image, resolver, on_event):
            try:
                fetch(desc)
            except CargoholdError as exc:
                failures.append(f"{desc.digest}: {exc}")
                continue
            got.append(desc)
            done.add(desc.digest)
            break
    return got


def fetch_remote(store: Store, image: Image, result: CheckResult, resolver: Callable[[], Resolver],
                 on_event: EventSink, what: str) -> list[Descriptor]:
    """Fetch the ``remote`` blobs of ``result`` (a check of ``image``); FailedPreconditionError naming ``what``
    and each blob no source gave."""
    failures: list[str] = []
    got = fetch_blobs(store, [(image, d) for d in result.remote], failures, resolver, on_event)
    if len(got) < len({d.digest for d in result.remote}):
        raise FailedPreconditionError(
            f"{what}: image {image.name} was unpacked lazily and fetching its remote blobs failed: "
            + ("; ".join(failures) or "no registry to fetch from"))
    return got
