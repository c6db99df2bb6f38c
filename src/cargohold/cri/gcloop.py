"""A background gc for the CRI server: ``RemoveImage`` asks for one instead of collecting inline.

Requests coalesce: however many arrive while a gc runs, one more runs after it (it sees every removal made
before it started); at most one runs at a time, on one thread, stopped with the server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cargohold.errors import CargoholdError

log = logging.getLogger(__name__)


class GCScheduler:
    """Runs ``collect`` on its own thread whenever ``request`` was called since the last run started."""

    def __init__(self, collect: Callable[[], object]) -> None:
        self._collect = collect
        self._cond = threading.Condition()
        self._wanted = False
        self._running = False
        self._stopping = False
        self._runs = 0
        self._thread: threading.Thread | None = None

    @property
    def runs(self) -> int:
        """How many collections have finished."""
        with self._cond:
            return self._runs

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="cri-gc", daemon=True)
            self._thread.start()

    def request(self) -> None:
        """Ask for a gc soon; returns at once."""
        with self._cond:
            self._wanted = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no gc is wanted or running; False when ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._wanted and not self._running, timeout)

    def stop(self) -> None:
        """Stop the thread after the gc in progress (a pending request is dropped: the next gc does it)."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted or self._stopping)
                if self._stopping:
                    self._wanted = False
                    self._cond.notify_all()
                    return
                self._wanted, self._running = False, True
            try:
                self._collect()
            except CargoholdError as exc:
                log.warning("background gc failed (retried at the next request): %s", exc)
            except Exception:
                log.exception("background gc failed")
            finally:
                with self._cond:
                    self._running = False
                    self._runs += 1
                    self._cond.notify_all()
