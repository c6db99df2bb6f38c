"""Manifests and indexes (Docker schema2 and OCI), parsed from raw bytes that are kept as received."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cargohold.errors import InvalidArgumentError, UnsupportedMediaTypeError
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.jsonfields import array, load_object, string, string_map
from cargohold.oci.kinds import schema1_error
from cargohold.oci.limits import MAX_INDEX_MANIFESTS, MAX_LAYERS, MAX_MANIFEST_SIZE

__all__ = ["MAX_MANIFEST_SIZE", "Index", "Manifest", "parse_manifest_or_index"]


def _load_json(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_SIZE:
        raise InvalidArgumentError(f"{what}: {len(raw)} bytes is over the {MAX_MANIFEST_SIZE}-byte manifest limit")
    return load_object(raw, what)


def _subject(data: dict[str, Any], where: str) -> Descriptor | None:
    subject = data.get("subject")
    return Descriptor.from_dict(subject, f"{where} subject") if isinstance(subject, dict) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """An image manifest: one config and ordered layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str = ""
    raw: bytes = b""

    @property
    def digest(self) -> Digest:
        return Digest.from_bytes(self.raw)

    @classmethod
    def parse(cls, raw: bytes, media_type: str = "", where: str = "manifest") -> Manifest:
        data = _load_json(raw, where)
        media_type = _check_type(data, media_type, mt.MANIFEST_TYPES, where)
        if "config" not in data:
            raise InvalidArgumentError(f"{where}: missing config")
        config = Descriptor.from_dict(data["config"], f"{where} config")
        layers = tuple(
            Descriptor.from_dict(layer, f"{where} layer {i}")
            for i, layer in enumerate(array(data, "layers", where, cap=MAX_LAYERS, what="layers"))
        )
        return cls(
            media_type=media_type,
            config=config,
            layers=layers,
            annotations=string_map(data, "annotations", where),
            subject=_subject(data, where),
            artifact_type=string(data, "artifactType", where),
            raw=bytes(raw),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Index:
    """An image index / manifest list: manifests for several platforms (and attestations)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    raw: bytes = b""

    @property
    def digest(self) -> Digest:
        return Digest.from_bytes(self.raw)

    @classmethod
    def parse(cls, raw: bytes, media_type: str = "", where: str = "index") -> Index:
        data = _load_json(raw, where)
        media_type = _check_type(data, media_type, mt.INDEX_TYPES, where)
        manifests = tuple(
            Descriptor.from_dict(m, f"{where} manifest {i}")
            for i, m in enumerate(array(data, "manifests", where, cap=MAX_INDEX_MANIFESTS, what="manifests"))
        )
        return cls(
            media_type=media_type,
            manifests=manifests,
            annotations=string_map(data, "annotations", where),
            subject=_subject(data, where),
            raw=bytes(raw),
        )


def _check_type(data: dict[str, Any], declared: str, allowed: frozenset[str], where: str) -> str:
    inner = string(data, "mediaType", where)
    if data.get("schemaVersion") == 1 or inner in mt.SCHEMA1_TYPES or declared in mt.SCHEMA1_TYPES:
        raise schema1_error(where)
    media_type = declared or inner
    if not media_type:
        # OCI allows omitting mediaType; decide from the shape.
        if "manifests" in data and mt.OCI_INDEX in allowed:
            return mt.OCI_INDEX
        if "config" in data and mt.OCI_MANIFEST in allowed:
            return mt.OCI_MANIFEST
    if media_type not in allowed:
        raise UnsupportedMediaTypeError(f"{where}: unexpected media type {media_type!r}")
    if inner and declared and inner != declared:
        raise InvalidArgumentError(f"{where}: mediaType {inner!r} in body differs from descriptor's {declared!r}")
    return media_type


def parse_manifest_or_index(raw: bytes, media_type: str = "", where: str = "manifest") -> Manifest | Index:
    """Parse raw bytes as whichever of manifest or index they are (by media type, then by shape)."""
    if media_type in mt.INDEX_TYPES:
        return Index.parse(raw, media_type, where)
    if media_type in mt.MANIFEST_TYPES:
        return Manifest.parse(raw, media_type, where)
    data = _load_json(raw, where)
    inner = string(data, "mediaType", where)
    if media_type in mt.SCHEMA1_TYPES or inner in mt.SCHEMA1_TYPES or data.get("schemaVersion") == 1:
        return Manifest.parse(raw, mt.DOCKER_MANIFEST_SCHEMA1, where)  # raises the schema1 error
    if inner in mt.INDEX_TYPES or (not inner and "manifests" in data):
        return Index.parse(raw, "" if media_type in ("", mt.OCTET_STREAM) else media_type, where)
    if inner in mt.MANIFEST_TYPES or (not inner and "config" in data):
        return Manifest.parse(raw, "" if media_type in ("", mt.OCTET_STREAM) else media_type, where)
    raise UnsupportedMediaTypeError(f"{where}: media type {media_type or inner!r} is neither a manifest nor an index")
