"""Apply one layer blob to a directory, verifying both of its digests while streaming.

The blob is read once: its bytes are hashed (the descriptor's digest), decompressed (gzip / zstd / none,
detected from magic bytes), the decompressed bytes hashed (the config's ``rootfs.diff_ids[i]``) and parsed as
a tar by our own reader, whose entries are written by an extractor that never leaves the root (see
``diff.paths``) — ``tarfile.extract*`` is never used. Everything after the tar's end-of-archive marker is
still read: it is part of the diffID.

A failed apply leaves the root dirty: entries written before the failure stay. The caller (the unpacker)
discards the snapshot; nothing here tries to roll back.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cargohold.diff.compression import Compression, Readable, decompress_stream
from cargohold.diff.extract import Extractor
from cargohold.diff.tarstream import TarReader
from cargohold.errors import DigestMismatchError, LimitExceededError, NotFoundError, is_no_space, no_space
from cargohold.oci.digest import Digest

# (compressed bytes read so far, uncompressed bytes produced so far)
ProgressFn = Callable[[int, int], None]

_CHUNK = 1 << 20
_PREFETCH_DEPTH = 8  # decompressed chunks buffered ahead of the extractor


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyResult:
    """What was applied: the blob's digest and size, and the uncompressed tar's digest (diffID) and size.

    ``digest`` is None when no ``expected_digest`` was given: the compressed bytes were then not hashed
    (their writer hashed them already)."""

    digest: Digest | None
    diff_id: Digest
    size_compressed: int
    size_uncompressed: int
    compression: Compression
    entries: int
    # Seconds per stage (``cargohold.stages``): wait (for bytes of the blob), inflate, hash, extract.
    stages: dict[str, float] = field(default_factory=dict, compare=False)


class _Hashing:
    """Passes ``read`` through, hashing and counting the bytes; times the reads and the hashing."""

    __slots__ = ("_src", "hash", "size", "_limit", "_what", "read_time", "hash_time")

    def __init__(self, src: Readable, algorithm: str, *, limit: int | None = None, what: str = "") -> None:
        self._src = src
        self.hash: Any = hashlib.new(algorithm)
        self.size = 0
        self._limit = limit
        self._what = what
        self.read_time = 0.0
        self.hash_time = 0.0

    def read(self, size: int = -1, /) -> bytes:
        t0 = time.perf_counter()
        data = self._src.read(size)
        t1 = time.perf_counter()
        self.read_time += t1 - t0
        if data:
            self.hash.update(data)
            self.hash_time += time.perf_counter() - t1
            self.size += len(data)
            # Checked as the bytes are produced, so an inflating layer stops at the limit, not at its end.
            if self._limit is not None and self.size > self._limit:
                raise LimitExceededError(
                    f"{self._what}: inflates past max_unpacked_size ({self._limit} bytes); stopped")
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> Digest:
        return Digest(self.hash.name, self.hash.hexdigest())


class _Counting:
    """Passes ``read`` through, counting the bytes: the compressed stream when no digest is asked for."""

    __slots__ = ("_src", "size", "read_time", "hash_time")

    def __init__(self, src: Readable) -> None:
        self._src = src
        self.size = 0
        self.read_time = 0.0
        self.hash_time = 0.0

    def read(self, size: int = -1, /) -> bytes:
        t0 = time.perf_counter()
        data = self._src.read(size)
        self.read_time += time.perf_counter() - t0
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _Prefetch:
    """Reads, hashes and decompresses on a helper thread, ``depth`` chunks ahead of the extractor.

    zlib/ISA-L, zstd and hashlib release the GIL on large buffers, so this overlaps their work with the
    extractor's system calls. The helper reads to the very end of the stream (the diffID needs every byte).
    """

    _END = object()

    def __init__(self, src: _Hashing, progress: Callable[[], None] | None) -> None:
        self._src = src
        self._progress = progress
        self._queue: queue.Queue[Any] = queue.Queue(_PREFETCH_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="layer-decompress", daemon=True)
        self._pending = b""
        self._done = False
        self.waited = 0.0  # the reading thread's time blocked on the helper
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._src.read(_CHUNK)
                if not chunk:
                    break
                self._put(chunk)
            self._put(self._END)
        except BaseException as exc:  # handed to the reading thread
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1, /) -> bytes:
        if self._pending:
            out = self._pending
            if 0 <= size < len(out):
                self._pending = out[size:]
                return out[:size]
            self._pending = b""
            return out
        if self._done:
            return b""
        t0 = time.perf_counter()
        item = self._queue.get()
        self.waited += time.perf_counter() - t0
        if item is self._END:
            self._done = True
            self._thread.join()
            return b""
        if isinstance(item, BaseException):
            self._done = True
            self._thread.join()
            raise item
        if self._progress is not None:
            self._progress()  # on the caller's thread, not the helper's
        if 0 <= size < len(item):
            self._pending = item[size:]
            return item[:size]  # type: ignore[no-any-return]
        return item  # type: ignore[no-any-return]

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def close(self) -> None:
        """Stop the helper (after an error the rest of the stream is not wanted)."""
        self._stop.set()
        self._thread.join()


def apply_layer(
    root: Path | str,
    compressed: Readable,
    *,
    expected_digest: Digest | None = None,
    expected_diff_id: Digest | None = None,
    overlay: bool = False,
    on_progress: ProgressFn | None = None,
    write_threads: int | None = None,
    isolated: bool = False,
    max_unpacked_size: int | None = None,
    layer: Digest | None = None,
) -> ApplyResult:
    """Decompress ``compressed`` (a blob stream, read to its end) and apply its tar under ``root``.

    ``overlay=False`` applies onto a directory holding the parent layers' merged tree (whiteouts delete);
    ``overlay=True`` applies the layer alone into an empty overlayfs upper dir (whiteouts become 0/0 char
    devices, opaque markers ``trusted.overlay.opaque=y``).

    Raises DigestMismatchError (expected and actual digest in the message) when the blob does not hash to
    ``expected_digest`` (without one the compressed bytes are not hashed at all and the result's ``digest``
    is None) or its uncompressed bytes to ``expected_diff_id``; UnsafePathError naming the entry
    for any attempt to write outside ``root``; InvalidArgumentError for a corrupt stream or tar. After any
    error ``root`` is dirty — partially written, possibly with a wrong layer — and must be discarded by the
    caller.
    ``on_progress(compressed_read, uncompressed_read)`` is called on the calling thread about once per MiB of
    uncompressed data. ``write_threads``: threads creating small files, to overlap the disk waits of inode
    creation — None: up to 8, used while timed samples show creates that wait (disk), not when they only
    cost CPU; N: always N; 0: every file written inline.
    ``isolated``: the layer is applied alone, its parents absent (parallel unpack into an empty upper dir).
    Rather than guess what the parents hold, an entry under a directory the layer does not create, or a
    hardlink to a file it does not hold, raises NeedsParentsError; the caller then applies it onto its parents.
    ``max_unpacked_size``: the uncompressed bytes the layer may produce; past it LimitExceededError (naming
    the layer and the limit) stops the apply. A full disk (ENOSPC, EDQUOT, EROFS) raises NoSpaceError naming
    the layer and ``root``. ``layer`` names the blob in messages when ``expected_digest`` is not given.
    """
    root_s = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root_s):
        raise NotFoundError(f"apply target {root_s}: not a directory")
    # The compressed bytes are hashed only when asked: a blob streamed from the store's writer was hashed there.
    raw: _Hashing | _Counting = (
        _Hashing(compressed, expected_digest.algorithm) if expected_digest is not None else _Counting(compressed))
    stream = decompress_stream(raw)
    named = expected_digest if expected_digest is not None else layer
    what = f"layer {named}" if named is not None else "layer"
    plain = _Hashing(stream, expected_diff_id.algorithm if expected_diff_id else "sha256",
                     limit=max_unpacked_size, what=what)
    progress = None if on_progress is None else (lambda: on_progress(raw.size, plain.size))
    extractor = Extractor(root_s, overlay=overlay, write_threads=write_threads, isolated=isolated)
    source = _Prefetch(plain, progress)
    started = time.perf_counter()
    try:
        tar = TarReader(source)
        for entry in tar.entries():
            try:
                extractor.apply(entry, tar)
            except OSError as exc:
                if is_no_space(exc):
                    raise no_space(exc, f"writing {what}", root_s) from exc
                exc.add_note(f"while applying tar entry {entry.name!r} under {root_s}")
                raise
        extractor.finish()
        source.drain()  # bytes after the end-of-archive marker are part of the diffID
    except OSError as exc:  # the writer threads' errors surface from finish()
        if is_no_space(exc):
            raise no_space(exc, f"writing {what}", root_s) from exc
        raise
    finally:
        extractor.close()
        source.close()
    raw.drain()  # and compressed bytes after the last member/frame are part of the blob digest
    digest = raw.digest() if isinstance(raw, _Hashing) else None
    diff_id = plain.digest()
    if expected_digest is not None and digest != expected_digest:
        raise DigestMismatchError(expected_digest, digest,
                                  what=f"layer blob (applied under {root_s}, now dirty)")
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise DigestMismatchError(
            expected_diff_id, diff_id,
            what=f"{what} uncompressed (diffID; applied under {root_s}, now dirty)",
        )
    # The helper thread reads (waiting for bytes: ``raw.read_time``), inflates and hashes; this thread parses
    # and writes (its time not spent waiting for the helper).
    stages = {"wait": raw.read_time, "inflate": max(0.0, plain.read_time - raw.read_time - raw.hash_time),
              "hash": raw.hash_time + plain.hash_time,
              "extract": max(0.0, time.perf_counter() - started - source.waited)}
    return ApplyResult(digest=digest, diff_id=diff_id, size_compressed=raw.size, size_uncompressed=plain.size,
                       compression=stream.compression, entries=extractor.entries, stages=stages)
