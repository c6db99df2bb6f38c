"""What an image's index holds, entry by entry, for ``images ls`` and ``images inspect``: runnable images
with their platforms, attestations (for which manifest, which predicate types), nested indexes (followed),
and entries of media types not understood. Content that is absent (a platform not pulled) is described from
the index's descriptor alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cargohold.content.store import Provider
from cargohold.errors import CargoholdError
from cargohold.images.handlers import read_manifest_or_index
from cargohold.images.image import read_config
from cargohold.oci import kinds
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.kinds import Kind
from cargohold.oci.limits import check_index_depth
from cargohold.oci.manifest import Index, Manifest


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One entry of an index. ``depth`` is 0 for the target's own entries, 1 inside a nested index, ..."""

    descriptor: Descriptor
    kind: Kind
    depth: int = 0
    attests: str = ""
    predicate_types: tuple[str, ...] = ()

    @property
    def platform(self) -> str:
        return str(self.descriptor.platform) if self.descriptor.platform is not None else ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": str(self.descriptor.digest), "media_type": self.descriptor.media_type,
                               "size": self.descriptor.size, "kind": self.kind.value, "depth": self.depth}
        if self.platform:
            out["platform"] = self.platform
        if self.kind is Kind.ATTESTATION:
            out["attests"] = self.attests
            out["predicate_types"] = list(self.predicate_types)
        return out

    def describe(self) -> str:
        """One line, e.g. ``image linux/amd64`` or ``attestation for sha256:… (https://spdx.dev/Document)``."""
        if self.kind is Kind.IMAGE:
            return f"image {self.platform or '(no platform)'}"
        if self.kind is Kind.ATTESTATION:
            types = f" ({', '.join(self.predicate_types)})" if self.predicate_types else ""
            return f"attestation for {self.attests or '(unknown manifest)'}{types}"
        if self.kind is Kind.INDEX:
            return "nested index"
        if self.kind is Kind.SCHEMA1:
            return "Docker schema 1 manifest (not supported)"
        if self.kind is Kind.ARTIFACT:
            return f"artifact {self.descriptor.artifact_type or self.descriptor.media_type}"
        return f"unknown media type {self.descriptor.media_type!r}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """An image's runnable platforms (in index order, nested indexes followed) and its attestation count."""

    platforms: tuple[str, ...]
    attestations: int


def _read(provider: Provider, desc: Descriptor) -> Manifest | Index | None:
    try:
        return read_manifest_or_index(provider, desc)
    except CargoholdError:
        return None  # absent (not pulled) or unreadable: described from the descriptor alone


def index_entries(provider: Provider, target: Descriptor) -> list[Entry]:
    """Every entry of ``target`` (an index; none for a manifest), nested indexes' entries after theirs."""
    out: list[Entry] = []
    seen: set[str] = set()

    def walk(index: Index, depth: int) -> None:
        for desc in index.manifests:
            kind = kinds.classify(desc)
            predicate_types: tuple[str, ...] = ()
            if kind is Kind.ATTESTATION:
                doc = _read(provider, desc)
                if isinstance(doc, Manifest):
                    predicate_types = tuple(p for layer in doc.layers
                                            if (p := layer.annotations.get(kinds.PREDICATE_TYPE)))
            out.append(Entry(descriptor=desc, kind=kind, depth=depth, attests=kinds.attests(desc),
                             predicate_types=predicate_types))
            if kind is Kind.INDEX and str(desc.digest) not in seen:
                check_index_depth(depth + 2, desc.digest)  # ``depth`` 0 is the target, index level 1
                seen.add(str(desc.digest))
                inner = _read(provider, desc)
                if isinstance(inner, Index):
                    walk(inner, depth + 1)

    doc = _read(provider, target) if kinds.classify(target) is Kind.INDEX else None
    if isinstance(doc, Index):
        walk(doc, 0)
    return out


def summarize(provider: Provider, target: Descriptor, entries: Sequence[Entry] | None = None) -> Summary:
    """Runnable platforms and attestation count; a single manifest's platform comes from its config."""
    if kinds.classify(target) is not Kind.INDEX:
        doc = _read(provider, target)
        if not isinstance(doc, Manifest):
            return Summary(platforms=(), attestations=0)
        try:
            return Summary(platforms=(str(read_config(provider, doc.config).platform),), attestations=0)
        except CargoholdError:
            return Summary(platforms=(), attestations=0)
    entries = index_entries(provider, target) if entries is None else entries
    platforms: list[str] = []
    for e in entries:
        if e.kind is Kind.IMAGE and e.platform and e.platform not in platforms:
            platforms.append(e.platform)
    return Summary(platforms=tuple(platforms),
                   attestations=sum(1 for e in entries if e.kind is Kind.ATTESTATION))
