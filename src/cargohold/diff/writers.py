"""Small regular files written on a few threads, in batches, while the main thread reads the tar on.

Creating an inode on a real disk can wait on I/O (inode bitmap and table reads) far longer than Python's
per-file cost; ``open`` releases the GIL, so a handful of threads overlap those waits. Where creation is
cheap (tmpfs, warm caches) the threads only add GIL traffic, so writes stay inline until a timed sample
shows slow creates, and are sampled again now and then.

Only the creation of *new* small files is handed out: a file whose path exists comes back "deferred" for the
main thread to replace with full semantics, and the extractor calls ``flush()`` — a barrier — before
anything that could depend on order (removals, hardlinks, opaque markers, a path or parent already queued).

File data are memoryviews into the tar reader's buffers; those are immutable ``bytes`` the views keep alive,
so handing them to another thread needs no copy.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cargohold.diff.tarstream import TarEntry

# (absolute path, entry, data, chown needed); the writer returns False when the path already exists.
Item = tuple[str, TarEntry, memoryview, bool]
WriteFn = Callable[[str, TarEntry, memoryview, bool], bool]

_BATCH = 48  # files per task: amortises the executor's per-task cost
_MAX_BATCHES = 16  # queued batches before the reader waits: bounds memory held by views
_SAMPLE = 64  # inline writes timed per decision
_RESAMPLE_AFTER = 4096  # queued writes between two samples
_SLOW_CREATE = 150e-6  # seconds per inline file above which threads pay (tmpfs: ~15 µs; cold ext4: ~700 µs)


class FileWriters:
    """Queue ``submit``ted files to a thread pool; ``flush`` waits for all and returns the deferred ones."""

    def __init__(self, write: WriteFn, *, threads: int | None = None) -> None:
        """``threads`` None: up to 8, used only while timed samples show slow creates; N: always N threads."""
        self._write = write
        self._threads = threads or min(8, 4 * (os.cpu_count() or 1))
        self._adaptive = threads is None
        self._parallel = not self._adaptive
        self._sampling = False
        self._window_n = 0
        self._window_t = 0.0
        self._until_sample = _RESAMPLE_AFTER
        self._pool: ThreadPoolExecutor | None = None
        self._batch: list[Item] = []
        self._running: deque[Future[list[Item]]] = deque()
        self._deferred: list[Item] = []
        self.pending: set[str] = set()  # paths queued or being written, until the next flush

    def submit(self, path: str, e: TarEntry, data: memoryview, chown: bool) -> bool:
        """Write the file now or queue it. False: written inline, found its path taken, did nothing."""
        if self._parallel and not self._sampling:
            self._batch.append((path, e, data, chown))
            self.pending.add(path)
            if len(self._batch) >= _BATCH:
                self._dispatch()
            if self._adaptive:
                self._until_sample -= 1
                self._sampling = self._until_sample <= 0
            return True
        start = time.perf_counter()
        done = self._write(path, e, data, chown)
        self._window_t += time.perf_counter() - start
        self._window_n += 1
        if self._window_n >= _SAMPLE:
            self._parallel = self._window_t > _SAMPLE * _SLOW_CREATE
            self._window_n, self._window_t = 0, 0.0
            self._sampling = False
            self._until_sample = _RESAMPLE_AFTER
        return done

    def _dispatch(self) -> None:
        if not self._batch:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="layer-write")
        batch, self._batch = self._batch, []
        self._running.append(self._pool.submit(self._run, batch))
        while len(self._running) > _MAX_BATCHES:
            self._deferred.extend(self._running.popleft().result())

    def _run(self, batch: list[Item]) -> list[Item]:
        write = self._write
        return [item for item in batch if not write(*item)]

    def flush(self) -> list[Item]:
        """Wait for every queued file; the ones whose path existed are returned, in submission order.

        The first worker error is raised (after all others finished)."""
        self._dispatch()
        error: BaseException | None = None
        while self._running:
            fut = self._running.popleft()
            try:
                self._deferred.extend(fut.result())
            except BaseException as exc:  # keep waiting: no thread may still write after we return
                error = error or exc
        deferred, self._deferred = self._deferred, []
        self.pending.clear()
        if error is not None:
            raise error
        return deferred  # batches were collected in submission order, so these are too

    def close(self) -> None:
        """Wait for the threads and stop them (errors already reported or no longer wanted)."""
        for fut in self._running:
            fut.exception()
        self._running.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
