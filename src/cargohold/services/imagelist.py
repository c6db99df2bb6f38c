"""What ``images ls`` shows of each image (sizes, platforms, created), its ``--filter``, and ``images prune``.

Needs: a ``Store``. Sizes come from what the store holds: an image whose host manifest or config is absent
has no blob size, and one not unpacked in the snapshotter has no unpacked size (None: shown as ``-``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cargohold.errors import CargoholdError, InvalidArgumentError, NotFoundError
from cargohold.images.entries import summarize
from cargohold.metadata.images import Image
from cargohold.metadata.labels import IMAGE_LABEL
from cargohold.oci.reference import Reference
from cargohold.services import images
from cargohold.snapshots import available_snapshotters
from cargohold.snapshots.base import Kind
from cargohold.snapshots.filters import Filter, map_field, parse_filters
from cargohold.store import Store


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageRow:
    """One image as ``images ls`` lists it.

    ``blob_size``: manifest + config + compressed layers of the host platform's manifest (as ``ctr images
    ls``). ``unpacked_size``: disk used by the snapshots of its layer chain in ``snapshotter`` (None when
    the chain is not committed there). ``created``: the config's ``created``.
    """

    image: Image
    platforms: tuple[str, ...]
    attestations: int
    blob_size: int | None
    unpacked_size: int | None
    snapshotter: str
    created: str


def image_filter(filters: Sequence[str]) -> Filter:
    """Parse ``--filter`` strings in containerd's syntax (``name==…``, ``name~=regex``, ``labels."k"==v``,
    ``target.digest==…``, ``target.mediatype==…``); alternatives OR, comma-separated selectors AND."""
    return parse_filters(filters)


def _matches(flt: Filter, image: Image) -> bool:
    def adapt(path: tuple[str, ...]) -> tuple[str, bool]:
        head, rest = path[0], path[1:]
        if head == "name" and not rest:
            return image.name, True
        if head == "labels":
            return map_field(image.labels, rest)
        if head == "target" and rest == ("digest",):
            return str(image.target.digest), True
        if head == "target" and rest in (("mediatype",), ("media_type",)):
            return image.target.media_type, True
        return "", False

    return flt.match(adapt)


def list_images(store: Store, filters: Sequence[str] = ()) -> list[Image]:
    """The images matching any of ``filters`` (all without), by name."""
    flt = image_filter(filters)
    return [i for i in store.images.list() if _matches(flt, i)]


def image_row(store: Store, image: Image, snapshotter: str | None = None) -> ImageRow:
    """Sizes, platforms and created time of ``image`` (host platform; ``snapshotter``: the default)."""
    name = snapshotter or store.default_snapshotter
    summary = summarize(store.content, image.target)
    try:
        resolved = images.resolve_manifest(store, image.name)
    except CargoholdError:  # not pulled for this host, an artifact, or content missing
        return ImageRow(image=image, platforms=summary.platforms, attestations=summary.attestations,
                        blob_size=None, unpacked_size=None, snapshotter=name, created="")
    unpacked: int | None = None
    chain = [str(c) for c in resolved.chain_ids]
    if chain:
        sn = store.snapshotter(name)
        try:
            if sn.stat(chain[-1]).kind is Kind.COMMITTED:
                unpacked = sum(sn.usage(key).size for key in chain)
        except NotFoundError:
            unpacked = None
    return ImageRow(image=image, platforms=summary.platforms, attestations=summary.attestations,
                    blob_size=resolved.size, unpacked_size=unpacked, snapshotter=name,
                    created=resolved.config.created)


def is_dangling(name: str) -> bool:
    """Whether an image name is only a digest (``repo@sha256:…`` without a tag, as an import of an untagged
    manifest records it): what ``ctr``/nerdctl call dangling."""
    try:
        ref = Reference.parse(name)
    except InvalidArgumentError:
        repo, sep, digest = name.rpartition("@")
        return bool(sep and repo and digest.startswith("sha256:") and ":" not in repo.rsplit("/", 1)[-1])
    return ref.digest is not None and not ref.tag


def images_in_use(store: Store) -> set[str]:
    """Names of the images a container's rootfs snapshot was prepared from (label ``cargohold.io/image``),
    in every snapshotter usable on this root (and the default one, a configured proxy included)."""
    names = {*available_snapshotters(store.root), store.default_snapshotter}
    used: set[str] = set()
    for sn_name in sorted(names):
        for info in store.snapshotter(sn_name).walk(f'labels."{IMAGE_LABEL}"'):
            used.add(info.labels[IMAGE_LABEL])
    return used


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneResult:
    """Image records ``prune`` removed (or would remove) and the ones it kept because a container uses them."""

    removed: tuple[str, ...]
    in_use: tuple[str, ...]


def prune(store: Store, *, all_images: bool = False, dry_run: bool = False) -> PruneResult:
    """Remove the dangling image records (``all_images``: every image no container rootfs snapshot was
    prepared from). Content and snapshots stay until ``gc``."""
    used = images_in_use(store)
    candidates = [i.name for i in store.images.list() if all_images or is_dangling(i.name)]
    removed = tuple(n for n in candidates if n not in used)
    if not dry_run:
        for name in removed:
            try:
                store.images.delete(name)
            except NotFoundError:
                pass  # removed meanwhile by someone else: the outcome is the same
    return PruneResult(removed=removed, in_use=tuple(n for n in candidates if n in used))
