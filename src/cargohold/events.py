"""Progress events. The library emits them to a callback; only the CLI renders them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from cargohold.errors import CancelledError


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Something happened to one item (a blob, a layer, a host) during a long operation.

    ``action``: resolve, fetch, apply, export, import, push, copy, mount, host.
    ``status``: waiting, running, done, exists, mounted (a cross-repository blob mount), skipped, error, info.
    """

    action: str
    status: str
    item: str = ""
    media_type: str = ""
    current: int = 0
    total: int = 0
    message: str = ""


EventSink = Callable[[Event], None]


def discard(_: Event) -> None:
    """An event sink that drops everything."""


class Cancel:
    """A cancellation token shared by an operation's threads: ``cancel()`` asks them to stop; ``check()`` raises
    ``CancelledError`` once asked. Long loops (a blob's chunks, a layer's entries) check it between steps."""

    __slots__ = ("_event", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise CancelledError(self.reason)


def cancellable(sink: EventSink, cancel: Cancel) -> EventSink:
    """``sink``, checking ``cancel`` before each event: every progress report (a fetched chunk, an applied MiB,
    a layer starting) is a point where a cancelled operation stops."""

    def emit(event: Event) -> None:
        if event.status != "error":  # the report of a failure (the cancellation included) still goes out
            cancel.check()
        sink(event)

    return emit
