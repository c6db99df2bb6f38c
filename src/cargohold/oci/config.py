"""Image configs: the part of ``config.json`` cargohold needs (rootfs.diff_ids, platform, history)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cargohold.errors import InvalidArgumentError
from cargohold.oci.digest import Digest
from cargohold.oci.limits import MAX_CONFIG_SIZE
from cargohold.oci.platform import Platform


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    created: str = ""
    created_by: str = ""
    comment: str = ""
    empty_layer: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageConfig:
    """An image config. Works for OCI, Docker, and docker <= 1.10's ``application/octet-stream`` configs."""

    architecture: str
    os: str
    variant: str = ""
    diff_ids: tuple[Digest, ...]
    history: tuple[HistoryEntry, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    raw: bytes = b""

    @property
    def platform(self) -> Platform:
        return Platform(os=self.os or "linux", architecture=self.architecture or "amd64", variant=self.variant)

    @classmethod
    def parse(cls, raw: bytes, where: str = "config") -> ImageConfig:
        if len(raw) > MAX_CONFIG_SIZE:
            raise InvalidArgumentError(f"{where}: {len(raw)} bytes is over the {MAX_CONFIG_SIZE}-byte config limit")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise InvalidArgumentError(f"{where}: not an image config (invalid JSON: {reason})") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"{where}: not an image config (not a JSON object)")
        rootfs = data.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise InvalidArgumentError(f"{where}: not an image config (no rootfs.diff_ids)")
        if rootfs.get("type", "layers") != "layers":
            raise InvalidArgumentError(f"{where}: rootfs type {rootfs.get('type')!r} is not 'layers'")
        if not all(isinstance(d, str) for d in rootfs["diff_ids"]):
            raise InvalidArgumentError(f"{where}: rootfs.diff_ids must be a list of digests")
        diff_ids = tuple(Digest.parse(d) for d in rootfs["diff_ids"])
        inner = data.get("config")
        if inner is not None and not isinstance(inner, dict):
            raise InvalidArgumentError(f"{where}: config must be an object")
        entries = data.get("history") or []
        if not isinstance(entries, list):
            raise InvalidArgumentError(f"{where}: history must be a list")
        history = tuple(
            HistoryEntry(
                created=str(h.get("created", "") or ""),
                created_by=str(h.get("created_by", "") or ""),
                comment=str(h.get("comment", "") or ""),
                empty_layer=bool(h.get("empty_layer", False)),
            )
            for h in entries
            if isinstance(h, dict)
        )
        return cls(
            architecture=str(data.get("architecture", "") or ""),
            os=str(data.get("os", "") or ""),
            variant=str(data.get("variant", "") or ""),
            diff_ids=diff_ids,
            history=history,
            config=dict(inner or {}),
            created=str(data.get("created", "") or ""),
            raw=bytes(raw),
        )


def looks_like_image_config(raw: bytes) -> bool:
    """True when bytes parse as an image config; used for ``application/octet-stream`` configs."""
    try:
        ImageConfig.parse(raw)
    except InvalidArgumentError:
        return False
    return True


def chain_ids(diff_ids: tuple[Digest, ...] | list[Digest]) -> list[Digest]:
    """ChainIDs as in the OCI image spec: chain(0)=diff(0); chain(n)=sha256(chain(n-1) + " " + diff(n))."""
    out: list[Digest] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append(Digest.from_bytes(f"{out[-1]} {diff_id}".encode()))
    return out
