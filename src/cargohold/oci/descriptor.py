"""Descriptors: the (media type, digest, size) triple that points at content."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cargohold.errors import InvalidArgumentError
from cargohold.oci.digest import Digest
from cargohold.oci.jsonfields import string, string_list, string_map
from cargohold.oci.platform import Platform


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str = ""

    def __hash__(self) -> int:
        return hash((self.media_type, self.digest, self.size))

    @classmethod
    def from_dict(cls, data: Any, where: str = "descriptor") -> Descriptor:
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"{where}: not an object")
        try:
            media_type = data.get("mediaType", "")
            digest_text = data["digest"]
            size = data["size"]
        except KeyError as exc:
            raise InvalidArgumentError(f"{where}: missing field {exc.args[0]}") from None
        if not isinstance(digest_text, str):
            raise InvalidArgumentError(f"{where}: digest must be a string, not {type(digest_text).__name__}")
        digest = Digest.parse(digest_text)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgumentError(f"{where} {digest}: invalid size {size!r}")
        if not isinstance(media_type, str):
            raise InvalidArgumentError(f"{where} {digest}: invalid mediaType {media_type!r}")
        plat = data.get("platform")
        named = f"{where} {digest}"
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            urls=tuple(string_list(data, "urls", named)),
            annotations=string_map(data, "annotations", named),
            platform=Platform.from_dict(plat, named) if isinstance(plat, dict) else None,
            artifact_type=string(data, "artifactType", named),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_dict()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    def describe(self) -> str:
        """A short human name for errors: ``<mediaType> <digest>``."""
        return f"{self.media_type or '(no media type)'} {self.digest}"
