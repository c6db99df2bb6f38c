"""Layer compression: detect it from magic bytes, decompress as a stream, compress for tests and exports.

Detection looks at the bytes, never only at the media type: registries serve gzip blobs under "tar" media
types and the reverse often enough. gzip goes through ISA-L (``isal``) when importable — about three times
zlib's inflate speed — and falls back to ``zlib``; zstd through ``zstandard``. Both readers handle
multi-member / multi-frame streams, as ``pigz`` / ``zstd --long`` outputs and concatenated blobs have them.
"""

from __future__ import annotations

import enum
import io
import types
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

import zstandard

from cargohold.errors import InvalidArgumentError

_inflate_mod: types.ModuleType
try:  # ISA-L's inflate is much faster; its decompressobj speaks zlib's API.
    from isal import isal_zlib as _inflate_mod
except ImportError:  # pragma: no cover - isal is a declared dependency
    _inflate_mod = zlib
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (zlib.error, _inflate_mod.error)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK_SIZE = 1 << 20
# Compressed bytes fed to the inflater per call: small enough that max_length bounds memory.
_FEED_SIZE = 256 << 10


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class Readable(Protocol):
    """What the decompressors read from: anything with ``read(n)``."""

    def read(self, size: int = -1, /) -> bytes: ...


def detect_compression(head: bytes) -> Compression:
    """The compression of a stream starting with ``head`` (at least 4 bytes unless the stream is shorter)."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC) or (len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18"):
        return Compression.ZSTD  # a frame, or a skippable frame (0x184D2A5?) leading a zstd stream
    return Compression.NONE


class DecompressReader:
    """A read-only binary stream of decompressed bytes. ``read(n)`` returns at most ``n`` bytes; b"" at end.

    ``compression`` tells what was detected. Corrupt input raises InvalidArgumentError.
    """

    compression: Compression

    def read(self, size: int = -1, /) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release: the caller owns the underlying stream."""

    def __enter__(self) -> DecompressReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Plain(DecompressReader):
    compression = Compression.NONE

    def __init__(self, head: bytes, raw: Readable) -> None:
        self._head = head
        self._raw = raw

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            return self._head + _read_all(self._raw)
        if self._head:
            out, self._head = self._head[:size], self._head[size:]
            return out
        return self._raw.read(size)


class _Gzip(DecompressReader):
    """Inflates gzip members one after another until the input ends.

    Like GNU gzip, NUL padding after the last member is ignored; any other trailing bytes are an error (Go's
    multistream reader, which containerd uses, refuses them too).
    """

    compression = Compression.GZIP

    def __init__(self, head: bytes, raw: Readable) -> None:
        self._raw = raw
        self._input = head  # compressed bytes read but not yet given to the inflater
        self._inflater: Any = None  # None between members
        self._done = False

    def _start_member(self) -> bool:
        """Position at the next member's magic; False at the clean end of the stream."""
        while True:
            self._input = self._input.lstrip(b"\0")
            if len(self._input) >= 2:
                break
            more = self._raw.read(_FEED_SIZE)
            if not more:
                if self._input:
                    raise InvalidArgumentError("gzip stream: trailing garbage after the last member")
                return False
            self._input += more
        if not self._input.startswith(GZIP_MAGIC):
            raise InvalidArgumentError("gzip stream: trailing garbage after the last member")
        self._inflater = _inflate_mod.decompressobj(wbits=31)
        return True

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            return _read_all(self)
        while size and not self._done:
            if self._inflater is None and not self._start_member():
                self._done = True
                break
            data = self._inflater.unconsumed_tail
            if not data:
                data, self._input = self._input or self._raw.read(_FEED_SIZE), b""
                if not data:
                    raise InvalidArgumentError("gzip stream truncated: input ended inside a member")
            try:
                out = self._inflater.decompress(data, size)
            except _INFLATE_ERRORS as exc:
                raise InvalidArgumentError(f"gzip stream corrupt: {exc}") from exc
            if self._inflater.eof:
                self._input = self._inflater.unused_data + self._input
                self._inflater = None
            if out:
                return out  # type: ignore[no-any-return]
        return b""


class _Zstd(DecompressReader):
    compression = Compression.ZSTD

    def __init__(self, head: bytes, raw: Readable) -> None:
        src = _Prefixed(head, raw)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            src, read_size=_FEED_SIZE, read_across_frames=True, closefd=False  # type: ignore[arg-type]
        )

    def read(self, size: int = -1, /) -> bytes:
        try:
            if size is None or size < 0:
                return self._reader.readall()
            return self._reader.read(size)
        except zstandard.ZstdError as exc:
            raise InvalidArgumentError(f"zstd stream corrupt: {exc}") from exc


class _Prefixed(io.RawIOBase):
    """``head`` then the rest of ``raw``: gives back the magic bytes read for detection."""

    def __init__(self, head: bytes, raw: Readable) -> None:
        self._head = head
        self._raw = raw

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            if size is None or size < 0:
                out, self._head = self._head + _read_all(self._raw), b""
                return out
            out, self._head = self._head[:size], self._head[size:]
            return out
        if size is None or size < 0:
            return _read_all(self._raw)
        return self._raw.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_all(src: Readable) -> bytes:
    parts = []
    while chunk := src.read(CHUNK_SIZE):
        parts.append(chunk)
    return b"".join(parts)


def _read_head(raw: Readable, n: int = 4) -> bytes:
    head = b""
    while len(head) < n:
        chunk = raw.read(n - len(head))
        if not chunk:
            break
        head += chunk
    return head


def decompress_stream(raw: Readable) -> DecompressReader:
    """A reader of ``raw``'s decompressed bytes, compression detected from its first bytes.

    Reads lazily; the caller keeps ownership of ``raw``. Uncompressed input is passed through.
    """
    head = _read_head(raw)
    kind = detect_compression(head)
    if kind is Compression.GZIP:
        return _Gzip(head, raw)
    if kind is Compression.ZSTD:
        return _Zstd(head, raw)
    return _Plain(head, raw)


# -- compressing ---------------------------------------------------------------------------------------------

Source = bytes | bytearray | memoryview | BinaryIO


def _chunks(src: Source) -> Any:
    if isinstance(src, bytes | bytearray | memoryview):
        yield src
        return
    while chunk := src.read(CHUNK_SIZE):
        yield chunk


def compress_gzip(src: Source, level: int = 6) -> bytes:
    """One gzip member of ``src`` (bytes or a readable stream) at zlib level 0-9.

    Always zlib, never ISA-L, so the same input and level give the same bytes on every machine (header
    mtime 0).
    """
    out = io.BytesIO()
    write_gzip(src, out, level)
    return out.getvalue()


def write_gzip(src: Source, dst: BinaryIO, level: int = 6) -> int:
    """Stream ``src`` gzip-compressed into ``dst``; returns the compressed byte count."""
    if not 0 <= level <= 9:
        raise InvalidArgumentError(f"gzip level {level}: want 0-9")
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return _pump(src, dst, comp.compress, comp.flush)


def compress_zstd(src: Source, level: int = 3) -> bytes:
    """One zstd frame of ``src`` (bytes or a readable stream) at the given level (1-22, negative = fast)."""
    out = io.BytesIO()
    write_zstd(src, out, level)
    return out.getvalue()


def write_zstd(src: Source, dst: BinaryIO, level: int = 3) -> int:
    """Stream ``src`` zstd-compressed into ``dst``; returns the compressed byte count."""
    try:
        comp = zstandard.ZstdCompressor(level=level).compressobj()
    except zstandard.ZstdError as exc:
        raise InvalidArgumentError(f"zstd level {level}: {exc}") from exc
    return _pump(src, dst, comp.compress, comp.flush)


def _pump(src: Source, dst: BinaryIO, compress: Callable[[Any], bytes], flush: Callable[[], bytes]) -> int:
    total = 0
    for chunk in _chunks(src):
        out = compress(chunk)
        if out:
            dst.write(out)
            total += len(out)
    out = flush()
    dst.write(out)
    return total + len(out)


def compress(src: Source, compression: Compression, level: int | None = None) -> bytes:
    """``src`` compressed as asked (Compression.NONE returns the bytes unchanged)."""
    if compression is Compression.GZIP:
        return compress_gzip(src, 6 if level is None else level)
    if compression is Compression.ZSTD:
        return compress_zstd(src, 3 if level is None else level)
    return b"".join(bytes(c) for c in _chunks(src))
