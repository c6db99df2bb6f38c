"""Platforms: parse ``os/arch[/variant]``, normalise, and match in containerd's best-first order."""

from __future__ import annotations

import platform as _stdplatform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cargohold.errors import InvalidArgumentError
from cargohold.oci.jsonfields import string, string_list

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "amd64": "amd64",
    "i386": "386",
    "i686": "386",
    "386": "386",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "arm": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64le": "mips64le",
    "loongarch64": "loong64",
    "loong64": "loong64",
}
_OS_ALIASES = {"macos": "darwin"}


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch = arch.lower()
    variant = variant.lower()
    raw = arch
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch == "amd64":
        if variant == "v1":
            variant = ""
    elif arch == "arm64":
        # arm64 without a variant means v8; v8 is the default and is dropped, as containerd does.
        if variant in ("8", "v8"):
            variant = ""
    elif arch == "arm":
        if raw == "armhf" and not variant:
            variant = "v7"
        elif raw == "armel" and not variant:
            variant = "v6"
        elif not variant or variant in ("7", "v7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return arch, variant


@dataclass(frozen=True, slots=True, kw_only=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = field(default=())

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` or ``arch`` (os taken as the host's) and normalise it."""
        parts = text.strip().split("/")
        if not text.strip() or any(not p for p in parts) or len(parts) > 3:
            raise InvalidArgumentError(f"invalid platform {text!r}: want os/arch[/variant]")
        if len(parts) == 1:
            word = parts[0].lower()
            if word in _ARCH_ALIASES:
                return cls(os=host_os(), architecture=word).normalized()
            return cls(os=word, architecture=host_platform().architecture,
                       variant=host_platform().variant).normalized()
        os_name = parts[0]
        arch = parts[1]
        variant = parts[2] if len(parts) == 3 else ""
        return cls(os=os_name, architecture=arch, variant=variant).normalized()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "platform") -> Platform:
        """A descriptor's ``platform`` object; wrong field types are InvalidArgumentError naming ``where``."""
        where = f"{where} platform" if where != "platform" else where
        return cls(
            os=string(data, "os", where),
            architecture=string(data, "architecture", where),
            variant=string(data, "variant", where),
            os_version=string(data, "os.version", where),
            os_features=tuple(string_list(data, "os.features", where)),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    def normalized(self) -> Platform:
        arch, variant = _normalize_arch(self.architecture, self.variant)
        os_name = _OS_ALIASES.get(self.os.lower(), self.os.lower())
        return Platform(os=os_name, architecture=arch, variant=variant,
                        os_version=self.os_version, os_features=self.os_features)

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        if self.variant:
            text += f"/{self.variant}"
        return text


def host_os() -> str:
    return "windows" if sys.platform.startswith("win") else ("darwin" if sys.platform == "darwin" else "linux")


def host_platform() -> Platform:
    machine = _stdplatform.machine() or "amd64"
    variant = ""
    if machine.startswith("armv"):
        variant = "v" + machine[4]
        machine = "arm"
    return Platform(os=host_os(), architecture=machine, variant=variant).normalized()


def _compatible_variants(arch: str, variant: str) -> list[str]:
    """Variants a host of (arch, variant) runs, best first."""
    if arch == "arm":
        order = ["v8", "v7", "v6", "v5"]
        if variant in order:
            return order[order.index(variant):]
        return [variant]
    if arch == "arm64":
        return ["", "v8"] if not variant else [variant, ""]
    if arch == "amd64":
        levels = ["v4", "v3", "v2", ""]
        if variant in levels:
            return levels[levels.index(variant):]
    return [variant]


class PlatformMatcher:
    """Matches platforms against a set of wanted ones, and ranks the matches.

    ``rank(p)`` is smaller for better matches; None means no match. With several wanted platforms, the earlier
    one in the list wins ties, like containerd's ``platforms.Ordered``.
    """

    def __init__(self, wanted: Sequence[Platform]) -> None:
        if not wanted:
            raise InvalidArgumentError("platform matcher needs at least one platform")
        self.wanted = [w.normalized() for w in wanted]

    def rank(self, candidate: Platform | None) -> int | None:
        if candidate is None:
            return None
        c = candidate.normalized()
        for i, want in enumerate(self.wanted):
            if c.os != want.os or c.architecture != want.architecture:
                continue
            variants = _compatible_variants(want.architecture, want.variant)
            if c.variant in variants:
                return i * 100 + variants.index(c.variant)
        return None

    def match(self, candidate: Platform | None) -> bool:
        return self.rank(candidate) is not None

    def best(self, candidates: Iterable[Platform | None]) -> int | None:
        """Index of the best candidate, or None."""
        best_i: int | None = None
        best_rank: int | None = None
        for i, cand in enumerate(candidates):
            r = self.rank(cand)
            if r is not None and (best_rank is None or r < best_rank):
                best_i, best_rank = i, r
        return best_i

    def __str__(self) -> str:
        return ",".join(str(w) for w in self.wanted)


def default_matcher() -> PlatformMatcher:
    return PlatformMatcher([host_platform()])
