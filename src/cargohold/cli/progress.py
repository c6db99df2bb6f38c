"""Render library events: rich progress bars on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

import click

from cargohold.cli.output import human_size
from cargohold.events import Event

if TYPE_CHECKING:  # rich is imported only when a terminal shows bars: plain lines and --quiet never load it
    from rich.progress import Progress, TaskID

_KIND_NAMES = {
    "manifest": "manifest",
    "index": "index",
    "config": "config",
    "layer": "layer",
}


def kind_of(media_type: str) -> str:
    if "manifest.list" in media_type or "index" in media_type:
        return "index"
    if "manifest" in media_type:
        return "manifest"
    if "config" in media_type or media_type == "application/octet-stream":
        return "config"
    return "layer" if media_type else ""


# Actions whose events carry byte counts: bars on a terminal, one line per state change otherwise.
_BAR_ACTIONS = ("fetch", "apply", "push", "export", "import")
# Without a terminal, a transfer still running says how far it got this often (seconds).
PERIODIC_SECONDS = 10.0
QUIET_KEY = "cargohold.quiet"
"""``click.Context.meta`` key set by the global ``--quiet``: every renderer of the command is silent."""


def short_digest(item: str) -> str:
    """``sha256:0123456789ab`` for a digest (12 hex digits, as docker shows), anything else as it is."""
    algorithm, sep, rest = item.partition(":")
    if sep and algorithm in ("sha256", "sha384", "sha512") and len(rest) > 12 and "/" not in rest:
        return f"{algorithm}:{rest[:12]}"
    return item


def _bars(stream: TextIO) -> Progress:
    """The rich progress display of a terminal (rich loaded here, on first use)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class BinarySpeedColumn(ProgressColumn):
        """Transfer speed in the binary units every other size uses (rich's own column is decimal)."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{human_size(int(speed))}/s", style="progress.data.speed")

    return Progress(
        TextColumn("{task.fields[action]:<7} {task.fields[kind]:<8} {task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        BinarySpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=stream),
        transient=False,
    )


def _quiet_from_context() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(QUIET_KEY))


class ProgressRenderer:
    """An event sink. ``quiet`` drops everything (``--output json``, the global ``--quiet``).

    On a terminal: a bar per blob. Otherwise one line per state change of an item, with the short digest
    and the time since the command started, and a line every ``PERIODIC_SECONDS`` for a transfer still
    running.
    """

    def __init__(self, *, stream: TextIO | None = None, quiet: bool = False, force_plain: bool = False,
                 clock: Callable[[], float] = time.monotonic, periodic: float = PERIODIC_SECONDS) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet or _quiet_from_context()
        self.tty = self.stream.isatty() and not force_plain
        self._clock = clock
        self._start = clock()
        self._periodic = periodic
        self._last_line: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._progress: Progress | None = None
        if self.tty and not self.quiet:
            self._progress = _bars(self.stream)

    def __enter__(self) -> ProgressRenderer:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        with self._lock:
            if self._progress is not None and event.total and event.action in _BAR_ACTIONS:
                self._bar(event)
            else:
                self._line(event)

    def _bar(self, event: Event) -> None:
        assert self._progress is not None
        key = (event.action, event.item)
        task = self._tasks.get(key)
        short = short_digest(event.item)
        if task is None:
            task = self._progress.add_task(short, total=event.total or None, action=event.action,
                                           kind=kind_of(event.media_type))
            self._tasks[key] = task
        completed = event.total if event.status in ("done", "exists", "mounted") else event.current
        self._progress.update(task, completed=completed, total=event.total or None)
        if event.status in ("exists", "mounted"):
            self._progress.update(task, description=f"{short} ({event.status})")
        if event.status == "error":
            self._progress.update(task, description=f"{short} ERROR")

    def _line(self, event: Event) -> None:
        if event.action == "host" or event.status == "error":
            # Which host answered is in the --debug log; a failure ends the command, which prints it once (a
            # host that failed before another answered is in the --debug log too).
            return
        now = self._clock()
        key = (event.action, event.item)
        if event.status == "running" and event.action in _BAR_ACTIONS and event.current:
            # Plain output: a line per item state, and one now and then while a long transfer runs.
            if now - self._last_line.get(key, self._start) < self._periodic:
                return
        self._last_line[key] = now
        parts = [f"[{now - self._start:6.1f}s]", event.action, event.status]
        kind = kind_of(event.media_type)
        if kind:
            parts.append(kind)
        if event.item:
            parts.append(short_digest(event.item))
        if event.status == "running" and event.current and event.total:
            parts.append(f"{human_size(event.current)} of {human_size(event.total)} "
                         f"({event.current * 100 // event.total}%)")
        elif event.total and event.status in ("done", "exists", "mounted"):
            parts.append(human_size(event.total))
        if event.message:
            parts.append(event.message)
        line = " ".join(parts)
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)
