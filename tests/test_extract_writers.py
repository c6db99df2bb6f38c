"""diff.writers: small files go to threads only when creates wait (a slow disk), not when they only cost CPU."""

from __future__ import annotations

import threading
import time

from cargohold.diff.tarstream import REG, TarEntry
from cargohold.diff.writers import FileWriters

FILES = 400


def entry(i: int) -> TarEntry:
    return TarEntry(f"f{i}", REG, 0o644, 0, 0, 1, 0, None, "", 0, 0, None)


def run(cost: str) -> dict[str, str]:
    """Submit FILES writes that each wait (sleep: a disk) or burn CPU for 300 µs; where did each run?"""
    where: dict[str, str] = {}
    lock = threading.Lock()

    def write(path: str, e: TarEntry, data: memoryview, chown: bool) -> bool:
        end = time.perf_counter() + 300e-6
        if cost == "wait":
            time.sleep(300e-6)
        else:
            while time.perf_counter() < end:
                pass
        with lock:
            where[path] = threading.current_thread().name
        return not path.endswith("7")  # "exists already": handed back by flush, in order

    writers = FileWriters(write)
    inline_refused = []
    try:
        for i in range(FILES):
            if not writers.submit(f"f{i}", entry(i), memoryview(b"x"), False):
                inline_refused.append(f"f{i}")
        deferred = [item[0] for item in writers.flush()]
    finally:
        writers.close()
    assert sorted(inline_refused + deferred, key=lambda p: int(p[1:])) == [
        f"f{i}" for i in range(FILES) if str(i).endswith("7")]
    assert deferred == sorted(deferred, key=lambda p: int(p[1:]))
    assert len(where) == FILES
    return where


def test_creates_that_wait_go_to_threads() -> None:
    where = run("wait")
    main = threading.current_thread().name
    assert all(where[f"f{i}"] == main for i in range(64))  # the first files are the timed sample
    assert sum(1 for name in where.values() if name.startswith("layer-write")) >= FILES - 64


def test_creates_that_only_cost_cpu_stay_inline() -> None:
    where = run("cpu")
    assert set(where.values()) == {threading.current_thread().name}


def test_writes_come_back_inline_when_the_waits_stop() -> None:
    # A disk whose creates waited at first (caches cold), then no longer: the next sample, taken after the
    # queued writes landed, brings the writes back to the main thread.
    main = threading.current_thread().name
    where: dict[int, str] = {}
    lock = threading.Lock()

    def write(path: str, e: TarEntry, data: memoryview, chown: bool) -> bool:
        i = int(path)
        if i < 1000:
            time.sleep(300e-6)
        else:
            end = time.perf_counter() + 20e-6
            while time.perf_counter() < end:
                pass
        with lock:
            where[i] = threading.current_thread().name
        return True

    writers = FileWriters(write)
    total = 64 + 4096 + 64 + 500
    try:
        for i in range(total):
            assert writers.submit(str(i), entry(i), memoryview(b"x"), False)
        assert writers.flush() == []
    finally:
        writers.close()
    assert len(where) == total
    assert any(where[i] != main for i in range(64, 1000))  # waits: threads
    assert all(where[i] == main for i in range(64 + 4096 + 1, total))  # the sample, then inline again
