"""Image archives: what export and import share.

An archive is one tar holding an OCI image layout (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``) and,
for ``docker load``, a Docker ``manifest.json``, as containerd's archive exporter writes it. Each entry of
``index.json`` is one image: its target descriptor annotated with ``io.containerd.image.name`` (the full
name) and ``org.opencontainers.image.ref.name`` (the tag).

This module holds the names, the platform selection both directions apply, and the result types;
``archive_export`` writes archives, ``archive_import`` reads them (``dockerarchive`` builds manifests for
``docker save`` archives).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TypeVar

from cargohold.content.store import Provider
from cargohold.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cargohold.images.image import walk_required
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.kinds import Kind
from cargohold.oci.manifest import Index
from cargohold.oci.platform import Platform, PlatformMatcher, host_platform
from cargohold.oci.reference import Reference
from cargohold.oci.reference import normalize_name as normalize_name  # re-exported: archives name images so

ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"
INDEX_FILE = "index.json"
DOCKER_MANIFEST_FILE = "manifest.json"
T = TypeVar("T")


def blob_path(digest: Digest) -> str:
    """The path of a blob inside an OCI layout: ``blobs/<algorithm>/<hex>``."""
    return f"blobs/{digest.algorithm}/{digest.hex}"


def oci_ref_name(name: str) -> str:
    """The ``org.opencontainers.image.ref.name`` of an image name: its tag (``tag@digest`` when both), as
    containerd's ``ociReferenceName``; the name itself when it does not parse as a reference."""
    try:
        ref = Reference.parse(name)
    except InvalidArgumentError:
        return name
    if ref.digest is not None:
        return f"{ref.tag}@{ref.digest}" if ref.tag else f"@{ref.digest}"
    return ref.tag


def repo_tag(name: str) -> str | None:
    """The docker ``RepoTags`` form of an image name (``alpine:latest``), None for names without a tag."""
    try:
        ref = Reference.parse(name)
    except InvalidArgumentError:
        return None
    if not ref.tag:
        return None
    return ref.with_tag(ref.tag).familiar()


def image_names(desc: Descriptor, *, base_name: str | None, digests: bool, today: date) -> tuple[str, ...]:
    """The names an archive's index entry is recorded under, as ``ctr images import`` gives them.

    ``io.containerd.image.name`` when set; else ``org.opencontainers.image.ref.name``: kept when it is a
    full reference, else a bare tag joined to ``base_name`` (default ``import-<YYYY-MM-DD>``). ``digests``
    adds ``<base>@<digest>``; an entry with no name at all gets that digest name too, so it is kept.
    """
    base = base_name or f"import-{today.isoformat()}"
    names: list[str] = []
    name = desc.annotations.get(ANNOTATION_IMAGE_NAME, "")
    if not name:
        ref = desc.annotations.get(ANNOTATION_REF_NAME, "")
        if ref:
            name = ref if any(c in ref for c in "/:@") else f"{base}:{ref}"
    if name:
        names.append(normalize_name(name))
    if digests or not names:
        names.append(normalize_name(f"{base}@{desc.digest}"))
    return tuple(dict.fromkeys(names))


def archive_images(index: Index, *, base_name: str | None, digests: bool, today: date) -> list[ArchiveImage]:
    """The images of an archive's index, each with its names."""
    return [ArchiveImage(names=image_names(d, base_name=base_name, digests=digests, today=today),
                         target=Descriptor(media_type=d.media_type, digest=d.digest, size=d.size,
                                           annotations=dict(d.annotations)))
            for d in index.manifests]


def wanted_platforms(platforms: Sequence[Platform | str]) -> list[Platform]:
    """The parsed platforms, or the host's when none are given."""
    out = [p if isinstance(p, Platform) else Platform.parse(p) for p in platforms if p]
    return out or [host_platform()]


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """What an image needs for the chosen platforms: every blob (the target, indexes whole, the chosen
    manifests, their configs and layers), which are missing from the store, and the chosen manifests."""

    target: Descriptor
    required: tuple[Descriptor, ...]
    missing: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]

    @property
    def complete(self) -> bool:
        return not self.missing


def choose_children(index: Index, where: Descriptor, platforms: Sequence[Platform], all_platforms: bool
                    ) -> list[Descriptor]:
    """An index's children to keep: all of them with ``all_platforms``; else, for each platform, its best
    manifest, plus nested indexes (attestations and other non-runnable manifests are never chosen by a
    platform). NotFoundError names a platform no manifest serves."""
    if all_platforms:
        return list(index.manifests)
    kept: list[Descriptor] = [d for d in index.manifests if mt.is_index(d.media_type)]
    manifests = [d for d in index.manifests if kinds.classify(d) in (Kind.IMAGE, Kind.SCHEMA1)]
    if manifests and all(d.platform is None for d in manifests):
        return kept + manifests  # a list without platforms: nothing to choose by
    for wanted in platforms:
        matcher = PlatformMatcher([wanted])
        ranked = sorted((rank, i) for i, d in enumerate(manifests)
                        if (rank := matcher.rank(d.platform)) is not None)
        if not ranked:
            if kept:
                continue  # a nested index may serve it
            available = ", ".join(str(d.platform) for d in manifests if d.platform is not None) or "none"
            raise NotFoundError(f"index {where.digest}: no manifest for platform {wanted} (available: {available})")
        best = manifests[ranked[0][1]]
        if best not in kept:
            kept.append(best)
    return kept


def select(provider: Provider, target: Descriptor, platforms: Sequence[Platform], all_platforms: bool
           ) -> Selection:
    """Walk ``target`` for the platforms (all with ``all_platforms``); a missing manifest or index is listed
    and its children, unknown, are not."""
    walked = walk_required(provider, target, None,
                           choose=lambda index, where: choose_children(index, where, platforms, all_platforms))
    return Selection(target=target, required=walked.required, missing=walked.missing, manifests=walked.manifests)


def missing_message(what: str, missing: Sequence[tuple[str, Descriptor]]) -> str:
    """``<what>: N blobs missing: <digest> (<media type>, image <name>), ...``: every one, not the first."""
    parts = [f"{d.digest} ({d.media_type or 'unknown media type'}, {owner})" for owner, d in missing]
    return f"{what}: {len(parts)} blob{'s' if len(parts) != 1 else ''} missing: {', '.join(parts)}"


def missing_blobs(owned: Iterable[tuple[T, Selection]]) -> list[tuple[T, Descriptor]]:
    """Every blob the selections miss, once, with the first owner that needs it."""
    out: dict[Digest, tuple[T, Descriptor]] = {}
    for owner, sel in owned:
        for desc in sel.missing:
            out.setdefault(desc.digest, (owner, desc))
    return list(out.values())


def require_complete(what: str, owned: Iterable[tuple[str, Selection]]) -> None:
    """FailedPreconditionError listing every blob the selections miss (see ``missing_message``)."""
    missing = missing_blobs(owned)
    if missing:
        raise FailedPreconditionError(missing_message(what, missing))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportedImage:
    """One image written into an archive: its name, target and the manifests included."""

    name: str
    target: Descriptor
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportResult:
    """What ``export`` wrote: the images, every blob (sorted by path), the archive's size in bytes, and
    the blobs fetched from a registry first (``fetch_missing``)."""

    path: str
    images: tuple[ExportedImage, ...]
    blobs: tuple[Descriptor, ...]
    size: int
    fetched: tuple[Descriptor, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchiveImage:
    """One image an archive names: the names it is recorded under and its target."""

    names: tuple[str, ...]
    target: Descriptor


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadArchive:
    """An archive read into the store: its format (``oci`` or ``docker``), its index (``index.json`` or the
    one built for a docker archive, as raw bytes), the images, and the blobs newly stored, already present,
    and docker layer tars replaced by a stored compressed blob."""

    format: str
    index: Descriptor
    index_raw: bytes
    images: tuple[ArchiveImage, ...]
    committed: tuple[Digest, ...] = ()
    present: tuple[Digest, ...] = ()
    reused: tuple[Digest, ...] = ()  # docker layer tars matched to a stored compressed blob
