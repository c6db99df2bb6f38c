"""Small regular files written on a few threads, in batches, while the main thread reads the tar on.

Creating an inode on a real disk can wait on I/O (inode bitmap and table reads) far longer than Python's
per-file cost; ``open`` releases the GIL, so a handful of threads overlap those waits. Where creation does
not wait (tmpfs, warm caches, a fresh filesystem whose metadata is all in memory) the threads only add
work — GIL hand-offs cost futex calls and context switches, about a fifth more CPU per file measured on a
fresh ext4 — so writes stay inline unless a sample of inline writes shows them *waiting*: the median, over the
sample, of each write's wall time minus its CPU time. Time spent in the kernel is CPU time and does not
count, and a median ignores the writes the scheduler happened to preempt on a busy machine. A sample is taken
every few thousand files, after the queued writes landed (their GIL hand-offs would look like waits).

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
_RESAMPLE_AFTER = 4096  # writes between two samples
# Median wait (wall minus CPU) of an inline write above which threads pay. Measured on tmpfs and a fresh
# loop-mounted ext4: 0-5 µs (the create is all CPU, 30-40 µs of it); a create on a cold disk reads inode
# tables and bitmaps, milliseconds each.
_SLOW_WAIT = 100e-6


class FileWriters:
    """Queue ``submit``ted files to a thread pool; ``flush`` waits for all and returns the deferred ones."""

    def __init__(self, write: WriteFn, *, threads: int | None = None) -> None:
        """``threads`` None: up to 8, used only while timed samples show slow creates; N: always N threads."""
        self._write = write
        self._threads = threads or min(8, 4 * (os.cpu_count() or 1))
        self._adaptive = threads is None
        self._parallel = not self._adaptive
        self._sampling = self._adaptive  # the first files are a sample
        self._waits: list[float] = []
        self._until_sample = _RESAMPLE_AFTER
        self._pool: ThreadPoolExecutor | None = None
        self._batch: list[Item] = []
        self._running: deque[Future[list[Item]]] = deque()
        self._deferred: list[Item] = []
        self.pending: set[str] = set()  # paths queued or being written, until the next flush

    def submit(self, path: str, e: TarEntry, data: memoryview, chown: bool) -> bool:
        """Write the file now or queue it. False: written inline, found its path taken, did nothing."""
        if self._sampling:
            return self._sample(path, e, data, chown)
        if self._adaptive:
            self._until_sample -= 1
            if self._until_sample <= 0:
                self._sampling = True
                self._drain()
        if not self._parallel:
            return self._write(path, e, data, chown)
        self._batch.append((path, e, data, chown))
        self.pending.add(path)
        if len(self._batch) >= _BATCH:
            self._dispatch()
        return True

    def _sample(self, path: str, e: TarEntry, data: memoryview, chown: bool) -> bool:
        """One timed inline write; after ``_SAMPLE`` of them, decide whether threads pay."""
        wall, cpu = time.perf_counter(), time.thread_time()
        done = self._write(path, e, data, chown)
        self._waits.append((time.perf_counter() - wall) - (time.thread_time() - cpu))
        if len(self._waits) >= _SAMPLE:
            self._waits.sort()
            self._parallel = self._waits[_SAMPLE // 2] > _SLOW_WAIT
            self._waits.clear()
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

    def _drain(self) -> None:
        """Wait for the queued writes (the ones that found their path taken are kept for ``flush``)."""
        self._dispatch()
        while self._running:
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
