"""Content digests (``algorithm:hex``) with a strict format check."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cargohold.errors import InvalidArgumentError

_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"^[a-f0-9]+$")


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest such as ``sha256:e3b0c4...``. Immutable and hashable; ``str()`` gives the wire form."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        want = _HEX_LENGTHS.get(self.algorithm)
        if want is None:
            raise InvalidArgumentError(f"invalid digest {self.algorithm}:{self.hex}: unsupported algorithm")
        if len(self.hex) != want or not _HEX_RE.match(self.hex):
            raise InvalidArgumentError(
                f"invalid digest {self.algorithm}:{self.hex}: want {want} lowercase hex characters"
            )

    @classmethod
    def parse(cls, value: str | Digest) -> Digest:
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str) or ":" not in value:
            raise InvalidArgumentError(f"invalid digest {value!r}: want algorithm:hex")
        algorithm, _, hexpart = value.partition(":")
        return cls(algorithm, hexpart)

    @classmethod
    def from_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        """A fresh hashlib object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return self.hex[:12]


class Verifier:
    """Hashes bytes as they stream and tells whether they match an expected digest."""

    def __init__(self, expected: Digest) -> None:
        self.expected = expected
        self._hash = expected.hasher()
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest(self.expected.algorithm, self._hash.hexdigest())

    def verified(self) -> bool:
        return self.digest() == self.expected
