"""How the command line ends: signals, exit statuses and the one error line.

Exit status (README, "Exit status"): 0 success; 1 the operation failed; 2 bad input (usage, reference, platform,
archive contents, unsupported media type); 130 interrupted by Ctrl-C, 143 by SIGTERM (128 + the signal, as
shells report it).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import NoReturn

import click

from cargohold.errors import CargoholdError, InvalidArgumentError
from cargohold.events import Cancel

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

# How long an interrupted command waits for its worker threads to notice the cancellation and unwind (discard
# their active snapshots, close their ingests) before it exits anyway.
UNWIND_SECONDS = 1.5


@dataclass(slots=True, kw_only=True)
class Signals:
    """The signals received so far and the token they cancelled."""

    cancel: Cancel
    received: list[int] = field(default_factory=list)
    # Called on interruption, before waiting for the threads: each client's ``stop`` (drop queued work).
    stoppers: list[Callable[[], None]] = field(default_factory=list)
    # Called when the command has ended without interruption: each client's ``close`` (pools, database).
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def status(self) -> int:
        return EXIT_TERMINATED if self.received and self.received[0] == signal.SIGTERM else EXIT_INTERRUPTED


def install_signal_handlers(cancel: Cancel) -> Signals:
    """SIGINT and SIGTERM cancel ``cancel`` and interrupt the main thread (a KeyboardInterrupt, even in a
    blocking read); a second one exits at once."""
    signals = Signals(cancel=cancel)

    def handle(signum: int, _: FrameType | None) -> None:
        if signals.received:
            os._exit(EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED)
        signals.received.append(signum)
        cancel.cancel(signal.Signals(signum).name)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return signals


def finish_interrupted(signals: Signals) -> NoReturn:
    """Exit after an interruption: stop the workers (cancel), give them ``UNWIND_SECONDS`` to unwind, exit."""
    signals.cancel.cancel("interrupted")
    for stop in signals.stoppers:
        stop()
    deadline = time.monotonic() + UNWIND_SECONDS
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    status = signals.status
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        # A worker stuck in a read the cancellation cannot reach: what it wrote stays resumable (ingests keep
        # their data), and it has recorded nothing, so leaving now loses nothing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def usage_message(exc: click.ClickException) -> str:
    """Click's message for a usage error, with where to get help."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def describe_error(exc: BaseException) -> tuple[str, int]:
    """The one line (without the ``cargohold: error:`` prefix) and exit status for a failure."""
    if isinstance(exc, InvalidArgumentError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, CargoholdError):
        return str(exc), EXIT_FAILED
    if isinstance(exc, OSError):
        return _os_error(exc), EXIT_FAILED
    if isinstance(exc, sqlite3.Error):
        return (f"metadata database: {exc}: check that the data root is writable and not on a read-only or "
                "full file system", EXIT_FAILED)
    # A bug: say so in one line; --debug shows where.
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        traceback.print_exception(exc, file=sys.stderr)
    return f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", EXIT_FAILED


def _os_error(exc: OSError) -> str:
    path = exc.filename if exc.filename is not None else ""
    where = f"{path}: " if path else ""
    if isinstance(exc, PermissionError):
        return f"{where}permission denied: run as a user allowed to use it, or choose another --root"
    if exc.errno == errno.EROFS:
        return f"{where}read-only file system: choose a writable --root (or $CARGOHOLD_ROOT)"
    if exc.errno == errno.ENOSPC:
        return f"{where}no space left on device: free some space (cargohold gc) or choose another --root"
    if isinstance(exc, FileNotFoundError):
        return f"{where}no such file or directory"
    return f"{where}{exc.strerror or exc}"
