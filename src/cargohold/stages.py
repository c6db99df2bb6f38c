"""Where an operation's time goes: per-stage totals for ``cargohold pull --profile``.

Code marks its stages (``timed("fetch")``, ``record("inflate", seconds)``); while a ``Profile`` is active
(``profiling()``) they add up in it, otherwise marking costs a global read. Stages overlap — layers download
while others apply, applies run on several cores — so each total is the time spent in that stage summed over
blobs and layers, to be read beside the operation's wall time. The profile is process-wide: meant for one
command at a time (the CLI), not for a server running many operations at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

STAGES = ("resolve", "fetch", "prepare", "inflate", "hash", "extract", "wait", "commit")
"""In pipeline order. ``wait``: an apply waiting for bytes the download has not written yet."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StageTotal:
    seconds: float
    count: int
    bytes: int


class Profile:
    """Thread-safe per-stage totals, and the wall time since the profile started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, tuple[float, int, int]] = {}
        self.started = time.perf_counter()

    def add(self, stage: str, seconds: float, *, count: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            s, c, b = self._totals.get(stage, (0.0, 0, 0))
            self._totals[stage] = (s + seconds, c + count, b + nbytes)

    def totals(self) -> dict[str, StageTotal]:
        """The stages seen, in pipeline order (unknown ones last)."""
        with self._lock:
            items = dict(self._totals)
        order = [s for s in STAGES if s in items] + sorted(s for s in items if s not in STAGES)
        return {s: StageTotal(seconds=items[s][0], count=items[s][1], bytes=items[s][2]) for s in order}

    def wall(self) -> float:
        return time.perf_counter() - self.started


_current: Profile | None = None


def record(stage: str, seconds: float, *, count: int = 1, nbytes: int = 0) -> None:
    """Add ``seconds`` to ``stage`` of the active profile (nothing when none is active)."""
    profile = _current
    if profile is not None:
        profile.add(stage, seconds, count=count, nbytes=nbytes)


@contextlib.contextmanager
def timed(stage: str, *, nbytes: int = 0) -> Iterator[None]:
    """Time the block as ``stage`` (also when it raises)."""
    if _current is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        record(stage, time.perf_counter() - start, nbytes=nbytes)


@contextlib.contextmanager
def profiling() -> Iterator[Profile]:
    """Activate a fresh profile for the block."""
    global _current
    profile = Profile()
    previous, _current = _current, profile
    try:
        yield profile
    finally:
        _current = previous
