"""STUB (the lead's stand-in until wt-e lands): the ApplyPool API applied on the calling thread."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from cargohold.diff.apply import ApplyResult, ProgressFn, apply_layer
from cargohold.errors import CargoholdError
from cargohold.oci.digest import Digest


class FeedFailedError(CargoholdError):
    """The blob file an apply followed will not be completed."""


class Feed:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.size: int | None = None
        self.reason: str | None = None

    def end(self, size: int) -> None:
        with self._cond:
            self.size = size
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            self.reason = reason
            self._cond.notify_all()


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyRequest:
    root: str
    overlay: bool
    isolated: bool = False
    expected_diff_id: Digest | None = None
    expected_digest: Digest | None = None
    max_unpacked_size: int | None = None
    write_threads: int | None = None
    layer: Digest | None = None  # names the blob in messages (not hashed unless expected_digest)


class _Follow:
    def __init__(self, fd: int, feed: Feed | None) -> None:
        self.fd, self.feed, self.pos = fd, feed, 0

    def read(self, size: int = -1, /) -> bytes:
        n = size if size is not None and size > 0 else 1 << 20
        while True:
            feed = self.feed
            if feed is not None and feed.size is not None:
                n = min(n, feed.size - self.pos)
                if n <= 0:
                    return b""
            data = os.read(self.fd, n)
            if data or feed is None:
                self.pos += len(data)
                return data
            if feed.reason is not None:
                raise FeedFailedError(f"blob stream ended: {feed.reason}")
            if feed.size is not None and self.pos >= feed.size:
                return b""
            time.sleep(0.002)


class ApplyPool:
    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes

    def prestart(self) -> None:
        pass

    def apply(self, request: ApplyRequest, fd: int, *, feed: Feed | None = None,
              on_progress: ProgressFn | None = None) -> ApplyResult:
        try:
            return apply_layer(request.root, _Follow(fd, feed), expected_digest=request.expected_digest,
                               expected_diff_id=request.expected_diff_id, overlay=request.overlay,
                               isolated=request.isolated, on_progress=on_progress,
                               max_unpacked_size=request.max_unpacked_size, write_threads=request.write_threads,
                               layer=request.layer)
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


_shared: ApplyPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ApplyPool:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ApplyPool()
        return _shared
