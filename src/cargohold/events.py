"""Progress events. The library emits them to a callback; only the CLI renders them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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
