"""Render library events: rich progress bars on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cargohold.events import Event

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


class ProgressRenderer:
    """An event sink. ``quiet`` drops everything (used with ``--output json``)."""

    def __init__(self, *, stream: TextIO | None = None, quiet: bool = False, force_plain: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty() and not force_plain
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._progress: Progress | None = None
        if self.tty and not quiet:
            self._progress = Progress(
                TextColumn("{task.fields[action]:<7} {task.fields[kind]:<8} {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )

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
        short = event.item.split(":")[-1][:12] if ":" in event.item else event.item
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
        if event.action == "host" and event.status != "error":
            return  # which registry host answered: --debug logs it
        if event.status == "error":
            # A failure ends the command, which prints it once; a host that failed before another answered
            # is in the --debug log.
            return
        if event.status == "running" and event.action in _BAR_ACTIONS and event.current:
            return  # plain output: one line per item state, not per chunk
        parts = [event.action, event.status]
        kind = kind_of(event.media_type)
        if kind:
            parts.append(kind)
        if event.item:
            parts.append(event.item)
        if event.total and event.status in ("done", "exists", "mounted"):
            parts.append(f"{event.total} bytes")
        if event.message:
            parts.append(event.message)
        line = " ".join(parts)
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)
