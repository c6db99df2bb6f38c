"""Fetching one descriptor into a namespaced store, labelled with the repository it came from.

Pull, unpack (missing blobs), export (``--fetch-missing``), copy and push all note where a blob lives with
containerd's ``containerd.io/distribution.source.<host>`` label; this module is the one place that writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from cargohold.content.namespaced import NamespacedStore
from cargohold.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cargohold.events import Event, EventSink
from cargohold.metadata.labels import DISTRIBUTION_SOURCE
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.reference import Reference
from cargohold.remotes.fetch import BlobFetcher, BlobTap, fetch_blob
from cargohold.remotes.resolver import Fetcher, Resolver


class FetchFn(Protocol):
    """Fetches one blob into the store unless present; True when it was fetched. ``tap`` follows the bytes
    while they are written."""

    def __call__(self, desc: Descriptor, /, *, tap: BlobTap | None = None) -> bool: ...


def source_label(reference: Reference) -> dict[str, str]:
    """The distribution-source label of a blob of ``reference``'s repository."""
    return {f"{DISTRIBUTION_SOURCE}.{reference.domain}": reference.path}


def add_source_label(store: NamespacedStore, desc: Descriptor, source: Mapping[str, str]) -> None:
    """Add the repositories of ``source`` to the blob's distribution-source labels (a blob not in the store is
    left alone)."""
    # One transaction: concurrent pulls and pushes adding repositories to the same label lose none.
    with store.db.transaction():
        try:
            info = store.info(desc.digest)
        except NotFoundError:
            return
        update: dict[str, str | None] = {}
        for key, repo in source.items():
            have = info.labels.get(key, "")
            repos = [r for r in have.split(",") if r]
            if repo not in repos:
                update[key] = ",".join([*repos, repo])
        if update:
            store.update(desc.digest, update)


def fetch_one(fetcher: BlobFetcher, desc: Descriptor, store: NamespacedStore, source: Mapping[str, str],
              on_event: EventSink, *, tap: BlobTap | None = None) -> bool:
    """Fetch one blob unless present; label it with its distribution source. True when fetched.

    ``tap`` follows the bytes while they are written (it hears nothing when the blob was present)."""
    item = str(desc.digest)
    if store.exists(desc.digest):
        add_source_label(store, desc, source)
        on_event(Event(action="fetch", status="exists", item=item, media_type=desc.media_type,
                       current=desc.size, total=desc.size))
        return False
    on_event(Event(action="fetch", status="running", item=item, media_type=desc.media_type, total=desc.size))

    def progress(current: int, total: int) -> None:
        on_event(Event(action="fetch", status="running", item=item, media_type=desc.media_type,
                       current=current, total=total))

    try:
        fetch_blob(fetcher, store, desc, labels=dict(source), progress=progress, tap=tap)
    except AlreadyExistsError:
        add_source_label(store, desc, source)
    except Exception as exc:
        on_event(Event(action="fetch", status="error", item=item, media_type=desc.media_type, message=str(exc)))
        raise
    on_event(Event(action="fetch", status="done", item=item, media_type=desc.media_type,
                   current=desc.size, total=desc.size))
    return True


def registry_fetch_fn(resolver: Callable[[], Resolver], image_name: str, store: NamespacedStore,
                      on_event: EventSink) -> FetchFn | None:
    """A fetch function for blobs of the image called ``image_name`` from its registry (None when the name is
    not a registry reference). ``resolver`` is asked for the resolver only when a blob is first fetched."""
    try:
        reference = Reference.parse(image_name)
    except InvalidArgumentError:
        return None
    source = source_label(reference)
    fetcher: list[Fetcher] = []

    def fetch(desc: Descriptor, /, *, tap: BlobTap | None = None) -> bool:
        if not fetcher:
            fetcher.append(resolver().fetcher(reference))
        return fetch_one(fetcher[0], desc, store, source, on_event, tap=tap)

    return fetch
