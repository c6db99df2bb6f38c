"""Copy images between registries, archive files and the local store, in the spirit of ``skopeo copy``.

Locations: ``registry://REF`` (or ``docker://REF``, or a bare reference) is a registry; ``oci-archive:PATH[:NAME]``
and ``docker-archive:PATH[:NAME]`` are archive files; ``oci:DIR[:REF]`` is an OCI layout directory (skopeo's
``oci:`` transport: REF is the ``org.opencontainers.image.ref.name`` of its entry); ``local:NAME`` is an image of
this store.

Content always passes through the local content store, under a lease. Only a ``local:`` destination records
an image; copying between two other ends leaves no image record behind, and what it fetched or read is
unreferenced once the copy ends (``cargohold gc`` frees it; blobs that other images use stay, of course).
Archives are read and written with the functions ``services.archive`` uses (``images.archive_load``,
``images.archive_export``) rather than its ``import_archive`` and ``export``, which record images (import)
or read image records (export). Both archive kinds are read whatever their format; both are written the same
way, as an OCI layout with Docker's ``manifest.json`` (what ``export`` writes). ``NAME`` picks an archive's
image by full name or by its ``org.opencontainers.image.ref.name``; without it the archive must hold one.

Platforms: without ``platforms`` the whole image is copied (every manifest of an index, like
``skopeo copy --all``). With ``platforms``, the matching manifests are fetched and the destination gets
what ``push`` makes of them (the index when all of its manifests match, else the best-matching manifest).

Needs: a ``Store``, a resolver, an event sink and the executor walking a registry image's graph.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cargohold.content.namespaced import NamespacedStore
from cargohold.errors import InvalidArgumentError, NotFoundError
from cargohold.events import Event, EventSink
from cargohold.images.archive import (
    ANNOTATION_REF_NAME,
    ArchiveImage,
    normalize_name,
    require_complete,
    select,
    wanted_platforms,
)
from cargohold.images.archive_export import atomic_output, write_archive
from cargohold.images.archive_load import load_archive
from cargohold.images.handlers import (
    Handler,
    children,
    compose,
    dispatch,
    filter_platforms,
    label_children,
    set_children_labels,
)
from cargohold.images.layoutdir import ingest_blob, layout_images, write_layout
from cargohold.metadata.db import utcnow
from cargohold.metadata.images import Image
from cargohold.metadata.labels import LEASE_COPY
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.platform import Platform, PlatformMatcher
from cargohold.oci.reference import Reference
from cargohold.remotes.resolver import Resolver
from cargohold.remotes.sources import fetch_one, source_label
from cargohold.services import images
from cargohold.services.lazy import fetch_remote
from cargohold.services.push import PushOptions, PushResult, push_target
from cargohold.store import Store

REGISTRY = "registry"
LOCAL = "local"
OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
OCI_DIR = "oci"
_WANT = "want registry://REF, oci-archive:PATH[:NAME], docker-archive:PATH[:NAME], oci:DIR[:REF] or local:NAME"
_REGISTRY_PREFIXES = ("registry://", "docker://")


@dataclass(frozen=True, slots=True, kw_only=True)
class Location:
    """One end of a copy: ``kind`` (registry, local, oci-archive, docker-archive), the image ``name`` (a
    reference for a registry; may be empty for an archive) and the archive ``path``."""

    kind: str
    name: str = ""
    path: Path | None = None

    @property
    def registry_host(self) -> str:
        """The registry's host for a registry location, else ``""``."""
        return Reference.parse(self.name).domain if self.kind == REGISTRY else ""

    def __str__(self) -> str:
        if self.kind == REGISTRY:
            return f"registry://{self.name}"
        if self.kind == LOCAL:
            return f"local:{self.name}"
        return f"{self.kind}:{self.path}" + (f":{self.name}" if self.name else "")


def parse_location(text: str) -> Location:
    """Read a copy location; InvalidArgumentError names what is wrong with it."""
    for prefix in _REGISTRY_PREFIXES:
        if text.startswith(prefix):
            return Location(kind=REGISTRY, name=str(Reference.parse(text[len(prefix):])))
    if text.startswith(f"{LOCAL}:"):
        name = text[len(LOCAL) + 1:]
        if not name:
            raise InvalidArgumentError(f"copy location {text!r}: local: needs an image name")
        return Location(kind=LOCAL, name=name)
    for kind in (OCI_ARCHIVE, DOCKER_ARCHIVE, OCI_DIR):
        if text.startswith(f"{kind}:"):
            # PATH ends at the first colon, as skopeo reads it: NAME may hold colons (host:port, tag).
            path, _, name = text[len(kind) + 1:].partition(":")
            if not path:
                raise InvalidArgumentError(f"copy location {text!r}: {kind}: needs a "
                                       f"{'directory' if kind == OCI_DIR else 'file'} path")
            return Location(kind=kind, name=name, path=Path(path))
    if "://" in text:
        raise InvalidArgumentError(f"copy location {text!r}: unknown transport {text.split('://', 1)[0]!r} ({_WANT})")
    try:
        return Location(kind=REGISTRY, name=str(Reference.parse(text)))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"copy location {text!r}: not a reference ({exc}); {_WANT}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyResult:
    """A finished copy. ``target`` is what the destination holds now; ``fetched`` what came from a source
    registry, ``present`` what the store had; ``push`` is set for a registry destination, ``image`` for a
    local one, ``archive`` for an archive file."""

    source: str
    destination: str
    target: Descriptor
    fetched: tuple[Descriptor, ...] = ()
    present: tuple[Descriptor, ...] = ()
    push: PushResult | None = None
    image: Image | None = None
    archive: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--output json`` document."""
        return {
            "source": self.source,
            "destination": self.destination,
            "digest": str(self.target.digest),
            "media_type": self.target.media_type,
            "fetched": [str(d.digest) for d in self.fetched],
            "present": [str(d.digest) for d in self.present],
            "pushed": [str(d.digest) for d in self.push.pushed] if self.push else [],
            "mounted": [str(d.digest) for d in self.push.mounted] if self.push else [],
            "existing": [str(d.digest) for d in self.push.existing] if self.push else [],
            "image": self.image.name if self.image else None,
            "archive": str(self.archive) if self.archive else None,
        }

    def summary(self) -> str:
        """One line for people."""
        parts = [f"{self.source} -> {self.destination}: {self.target.digest}"]
        if self.fetched or self.present:
            parts.append(f"{len(self.fetched)} fetched, {len(self.present)} present")
        if self.push is not None:
            parts.append(f"{len(self.push.pushed)} pushed, {len(self.push.mounted)} mounted, "
                         f"{len(self.push.existing)} already there")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Source:
    """The image a copy reads, once it is in the store: its root descriptor and a name hint."""

    root: Descriptor
    name: str
    fetched: tuple[Descriptor, ...] = ()
    present: tuple[Descriptor, ...] = ()


def copy(
    store: Store,
    src: str,
    dst: str,
    *,
    resolver: Resolver,
    on_event: EventSink,
    executor: Executor,
    platforms: Sequence[Platform | str] = (),
    all_platforms: bool = False,
) -> CopyResult:
    """Copy the image at ``src`` to ``dst`` (see the module docstring for locations and platforms).

    Errors: InvalidArgumentError for a location that does not parse; NotFoundError for a source image
    (or archive file, or name in an archive) that is not there; FailedPreconditionError naming every
    blob a source lacks.
    """
    source, dest = parse_location(src), parse_location(dst)
    wanted = [] if all_platforms else [p if isinstance(p, Platform) else Platform.parse(p) for p in platforms]
    what = f"{source} -> {dest}"
    on_event(Event(action="copy", status="running", item=what))
    with store.leases.hold(labels={LEASE_COPY: what[-200:]}) as lease:
        content = store.content.with_lease(lease.id)
        if source.kind == REGISTRY:
            got = _fetch_content(Reference.parse(source.name), content, wanted, resolver, on_event, executor)
        elif source.kind == LOCAL:
            image = images.image(store, source.name)
            check = images.check(store, image.name, platforms=wanted, all_platforms=not wanted)
            if check.remote:  # lazily unpacked: its remote layer blobs come from its source first
                fetch_remote(store, image, check, lambda: resolver, on_event, f"cannot copy {what}")
            got = _Source(root=image.target, name=image.name)
        elif source.kind == OCI_DIR:
            got = _read_layout_source(source, content, wanted, on_event, executor)
        else:
            got = _read_archive_source(source, content, wanted, on_event)
        result = _write_dest(store, source, dest, got, content, wanted, resolver, on_event)
    on_event(Event(action="copy", status="done", item=what, message=str(result.target.digest)))
    return result


# -- sources -----------------------------------------------------------------------------------------------


def _fetch_content(reference: Reference, content: NamespacedStore, wanted: Sequence[Platform], resolver: Resolver,
                   on_event: EventSink, executor: Executor) -> _Source:
    """Fetch the image's content (an index's manifests for ``wanted``, else all) into ``content``; no image
    record is written."""
    on_event(Event(action="resolve", status="running", item=str(reference)))
    _, target = resolver.resolve(reference)
    on_event(Event(action="resolve", status="done", item=str(reference), message=str(target.digest)))
    fetcher = resolver.fetcher(reference)
    labels = source_label(reference)
    fetched: list[Descriptor] = []
    present: list[Descriptor] = []
    lock = threading.Lock()

    def fetch(desc: Descriptor) -> Sequence[Descriptor]:
        was_fetched = fetch_one(fetcher, desc, content, labels, on_event)
        with lock:
            (fetched if was_fetched else present).append(desc)
        return []

    matcher = PlatformMatcher(list(wanted)) if wanted else None
    walk: Handler = filter_platforms(set_children_labels(content, children(content)), matcher)
    dispatch(compose(fetch, walk), [target], executor=executor)
    return _Source(root=target, name=str(reference), fetched=tuple(fetched), present=tuple(present))


def _read_archive_source(source: Location, content: NamespacedStore, wanted: Sequence[Platform],
                         on_event: EventSink) -> _Source:
    """Read an archive file into ``content`` (no image record) and pick its image: the one named, or the
    only one."""
    assert source.path is not None
    archive = load_archive(content, source.path, base_name=None, digests=False, today=utcnow().date(),
                           on_event=on_event)
    chosen = _pick(archive.images, source)
    target = Descriptor(media_type=chosen.target.media_type, digest=chosen.target.digest, size=chosen.target.size)
    selection = select(content, target, _platforms(wanted), not wanted)
    require_complete(f"archive {source.path} is incomplete", [(f"image {chosen.names[0]}", selection)])
    label_children(content, selection.required)
    return _Source(root=target, name=chosen.names[0])


def _read_layout_source(source: Location, content: NamespacedStore, wanted: Sequence[Platform],
                        on_event: EventSink, executor: Executor) -> _Source:
    """Read the chosen image of an OCI layout directory into ``content``: only the blobs it needs (an index's
    manifests for ``wanted``, else all), each verified; no image record."""
    assert source.path is not None
    directory = source.path
    chosen = _pick(layout_images(directory, utcnow().date()), source)
    target = Descriptor(media_type=chosen.target.media_type, digest=chosen.target.digest, size=chosen.target.size)
    present: list[Descriptor] = []
    lock = threading.Lock()

    def take(desc: Descriptor) -> Sequence[Descriptor]:
        if not ingest_blob(content, directory, desc, on_event):
            with lock:
                present.append(desc)
        return []

    matcher = PlatformMatcher(list(wanted)) if wanted else None
    dispatch(compose(take, filter_platforms(set_children_labels(content, children(content)), matcher)), [target],
             executor=executor)
    selection = select(content, target, _platforms(wanted), not wanted)
    require_complete(f"OCI layout {directory} is incomplete", [(f"image {chosen.names[0]}", selection)])
    return _Source(root=target, name=chosen.names[0], present=tuple(present))


# -- destinations ------------------------------------------------------------------------------------------


def _write_dest(store: Store, source: Location, dest: Location, got: _Source, content: NamespacedStore,
                wanted: Sequence[Platform], resolver: Resolver, on_event: EventSink) -> CopyResult:
    push: PushResult | None = None
    image: Image | None = None
    archive: Path | None = None
    target = got.root
    if dest.kind == REGISTRY:
        push = push_target(Reference.parse(dest.name), got.root, content, resolver=resolver, on_event=on_event,
                           what=str(source), options=PushOptions(platforms=tuple(wanted)))
        target = push.target
    elif dest.kind == LOCAL:
        now = utcnow()
        image = store.images.put(Image(name=normalize_name(dest.name), target=got.root, labels={},
                                       created_at=now, updated_at=now))
    elif dest.kind == OCI_DIR:
        assert dest.path is not None
        selection = select(content, got.root, _platforms(wanted), not wanted)
        require_complete(f"copy to {dest}", [(f"image {got.name}", selection)])
        write_layout(content, dest.path, got.root, selection.required, dest.name, on_event)
        archive = dest.path
    else:
        archive = _write_archive_dest(dest, got, content, wanted, on_event)
    return CopyResult(source=str(source), destination=str(dest), target=target, fetched=got.fetched,
                      present=got.present, push=push, image=image, archive=archive)


def _write_archive_dest(dest: Location, got: _Source, content: NamespacedStore, wanted: Sequence[Platform],
                        on_event: EventSink) -> Path:
    """Write the image as an archive (OCI layout + docker manifest.json, for either archive kind), named
    ``dest.name`` or the source's name. The image record is built in memory, never stored."""
    assert dest.path is not None
    image = Image(name=normalize_name(dest.name or got.name), target=got.root)
    platforms = _platforms(wanted)
    selection = select(content, got.root, platforms, not wanted)
    require_complete(f"copy to {dest}", [(f"image {got.name}", selection)])
    with atomic_output(dest.path) as out:
        write_archive(content, [image], [selection], platforms, out, on_event=on_event)
    return dest.path


def _platforms(wanted: Sequence[Platform]) -> list[Platform]:
    """What the archive functions take: the platforms asked for, the host's when none (all are then taken)."""
    return wanted_platforms(list(wanted))


def _pick(images: Sequence[ArchiveImage], source: Location) -> ArchiveImage:
    """The archive's image called ``source.name`` (a full name or the ref name annotation), or its only one.
    A layout directory's images are listed by their ref names (REF), as skopeo's ``oci:DIR:REF`` names them."""
    where = f"OCI layout {source.path}" if source.kind == OCI_DIR else f"archive {source.path}"

    def shown(img: ArchiveImage, every: bool) -> list[str]:
        if source.kind == OCI_DIR:
            return [img.target.annotations.get(ANNOTATION_REF_NAME) or f"@{img.target.digest}"]
        return list(img.names if every else img.names[:1])

    if not source.name:
        if len(images) == 1:
            return images[0]
        names = ", ".join(n for img in images for n in shown(img, False))
        raise InvalidArgumentError(f"{where} holds {len(images)} images ({names}): name one "
                                   f"({source.kind}:{source.path}:{'REF' if source.kind == OCI_DIR else 'NAME'})")
    wanted = normalize_name(source.name)
    for img in images:
        if wanted in img.names or img.target.annotations.get(ANNOTATION_REF_NAME) == source.name:
            return img
    names = ", ".join(n for img in images for n in shown(img, True)) or "none"
    raise NotFoundError(f"{where}: no image {source.name!r} (it holds {names})")
