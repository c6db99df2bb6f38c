"""The image model over the content store: which manifest serves a platform, its config, diffIDs, chainIDs,
and whether every blob the image needs is present."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cargohold.content.store import Provider
from cargohold.errors import InvalidArgumentError, NotFoundError, UnsupportedMediaTypeError
from cargohold.images.handlers import read_manifest_or_index
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.artifact import is_image, not_runnable_message
from cargohold.oci.config import ImageConfig, chain_ids
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.kinds import Kind
from cargohold.oci.limits import check_index_depth
from cargohold.oci.manifest import Index, Manifest
from cargohold.oci.platform import PlatformMatcher


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedManifest:
    """One platform's manifest of an image, with its parsed config."""

    descriptor: Descriptor
    manifest: Manifest
    config: ImageConfig

    @property
    def diff_ids(self) -> tuple[Digest, ...]:
        return self.config.diff_ids

    @property
    def chain_ids(self) -> list[Digest]:
        return chain_ids(self.config.diff_ids)

    @property
    def size(self) -> int:
        """Manifest + config + compressed layers, as ``ctr images ls`` reports."""
        return self.descriptor.size + self.manifest.config.size + sum(layer.size for layer in self.manifest.layers)


def manifest_for(provider: Provider, target: Descriptor, matcher: PlatformMatcher) -> Descriptor:
    """The descriptor of the best manifest for ``matcher`` below ``target`` (itself when it is a manifest)."""
    if mt.is_manifest(target.media_type):
        return target
    doc = read_manifest_or_index(provider, target)
    if isinstance(doc, Manifest):
        return target
    return _best_in_index(provider, doc, matcher, target)


def _best_in_index(provider: Provider, index: Index, matcher: PlatformMatcher, where: Descriptor) -> Descriptor:
    return _ranked_in_index(provider, index, matcher, where)[1]


def _ranked_in_index(provider: Provider, index: Index, matcher: PlatformMatcher, where: Descriptor,
                     level: int = 1) -> tuple[int, Descriptor, Descriptor]:
    """The best runnable manifest for ``matcher`` and its rank, nested indexes followed (a nested index's
    best competes with the outer entries by its own rank). Attestations and other non-runnable manifests are
    never candidates, whatever the matcher accepts. Returns (rank, manifest, the entry of ``index`` leading
    to it)."""
    candidates: list[tuple[int, int, Descriptor, Descriptor]] = []
    for i, desc in enumerate(index.manifests):
        kind = kinds.classify(desc)
        if kind is Kind.INDEX:
            check_index_depth(level + 1, desc.digest)
            try:
                doc = read_manifest_or_index(provider, desc)
                if isinstance(doc, Index):
                    inner_rank, inner, _ = _ranked_in_index(provider, doc, matcher, desc, level + 1)
                    candidates.append((inner_rank, i, inner, desc))
            except NotFoundError:
                continue
            continue
        if kind not in (Kind.IMAGE, Kind.SCHEMA1):  # a chosen schema 1 entry fails clearly when read
            continue
        rank = matcher.rank(desc.platform) if desc.platform is not None else None
        if rank is not None:
            candidates.append((rank, i, desc, desc))
    if not candidates:
        available = ", ".join(str(d.platform) for d in index.manifests
                              if d.platform is not None and kinds.is_runnable(d)) or "none"
        raise NotFoundError(
            f"index {where.digest}: no manifest for platform {matcher} (available: {available})"
        )
    candidates.sort(key=lambda t: (t[0], t[1]))
    return candidates[0][0], candidates[0][2], candidates[0][3]


def resolve_manifest(provider: Provider, target: Descriptor, matcher: PlatformMatcher, *, name: str = ""
                     ) -> ResolvedManifest:
    """Read the platform's manifest and config. Configs of ``application/octet-stream`` parse as any other.

    An artifact (a manifest whose config is no image config) is an UnsupportedMediaTypeError saying it is
    not a runnable image, naming ``name`` (the image or reference) or else the manifest's digest; so is an
    image with a layer of an unknown media type, naming the layer.
    """
    desc = manifest_for(provider, target, matcher)
    doc = read_manifest_or_index(provider, desc)
    if not isinstance(doc, Manifest):
        raise InvalidArgumentError(f"{desc.describe()}: expected a manifest, found an index")
    what = name or f"manifest {desc.digest}"
    if not is_image(doc):
        raise UnsupportedMediaTypeError(not_runnable_message(what, doc))
    for layer in doc.layers:
        # children() passes unknown media types as opaque blobs (they can be fetched and copied); an image
        # cannot be unpacked with one.
        if not mt.is_layer(layer.media_type):
            raise UnsupportedMediaTypeError(f"{what}: layer {layer.describe()}: unsupported layer media type")
    config = read_config(provider, doc.config)
    if len(config.diff_ids) != len(doc.layers):
        raise InvalidArgumentError(
            f"manifest {desc.digest}: {len(doc.layers)} layers but config {doc.config.digest} lists "
            f"{len(config.diff_ids)} diff_ids"
        )
    return ResolvedManifest(descriptor=desc, manifest=doc, config=config)


def read_config(provider: Provider, desc: Descriptor) -> ImageConfig:
    if not mt.is_config(desc.media_type):
        raise InvalidArgumentError(f"{desc.describe()}: media type is not an image config")
    raw = provider.read_all(desc.digest)
    return ImageConfig.parse(raw, where=f"config {desc.digest} ({desc.media_type})")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """What ``images check`` reports: required blobs, which are present, which are missing, and which of
    those live only at the image's source because a remote snapshotter unpacked it lazily (``remote``: not
    missing, ``complete`` ignores them)."""

    complete: bool
    required: tuple[Descriptor, ...]
    missing: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]
    remote: tuple[Descriptor, ...] = ()


ChooseChildren = Callable[[Index, Descriptor], Sequence[Descriptor]]
"""Which children of an index (at the given descriptor) an image walk follows."""


def walk_required(provider: Provider, target: Descriptor, matcher: PlatformMatcher | None, *,
                  choose: ChooseChildren | None = None) -> CheckResult:
    """Every blob the image needs for ``matcher`` (all platforms when None), and which are missing.

    The target and an index's chosen manifests are required; an index's other platforms are not. ``choose``
    replaces the matcher's choice of an index's children. A missing manifest or index is listed and its
    children, unknown, are not.
    """
    required: list[Descriptor] = []
    missing: list[Descriptor] = []
    manifests: list[Descriptor] = []
    seen: set[Digest] = set()

    def by_matcher(index: Index, where: Descriptor) -> Sequence[Descriptor]:
        if matcher is None:
            return index.manifests
        if not _has_match(index, matcher):
            return []
        return [_ranked_in_index(provider, index, matcher, where)[2]]  # a nested index is walked in turn

    pick = choose or by_matcher

    def visit(desc: Descriptor, level: int = 0) -> None:
        if desc.digest in seen:
            return
        if mt.is_index(desc.media_type):
            level += 1
            check_index_depth(level, desc.digest)
        seen.add(desc.digest)
        required.append(desc)
        if not provider_has(provider, desc.digest):
            missing.append(desc)
            return
        if not (mt.is_index(desc.media_type) or mt.is_manifest(desc.media_type)):
            return
        doc = read_manifest_or_index(provider, desc)
        if isinstance(doc, Index):
            for kid in pick(doc, desc):
                visit(kid, level)
        else:
            if kinds.is_runnable(desc):  # an attestation is required content, not one of the image's manifests
                manifests.append(desc)
            visit(doc.config)
            for layer in doc.layers:
                visit(layer)

    visit(target)
    return CheckResult(complete=not missing, required=tuple(required), missing=tuple(missing),
                       manifests=tuple(manifests))


def _has_match(index: Index, matcher: PlatformMatcher) -> bool:
    return any(mt.is_index(d.media_type) or (kinds.classify(d) in (Kind.IMAGE, Kind.SCHEMA1)
                                             and matcher.match(d.platform)) for d in index.manifests)


def provider_has(provider: Provider, digest: Digest) -> bool:
    exists = getattr(provider, "exists", None)
    if exists is not None:
        return bool(exists(digest))
    try:
        provider.reader_at(digest).close()
    except NotFoundError:
        return False
    return True
