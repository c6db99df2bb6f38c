"""Exclusive hold of one ingest ref, across threads and processes.

Processes exclude each other with ``flock`` on ``<ingest dir>/lock``. ``flock`` belongs to an open file
description, so two threads that each open the file are excluded too; a process-wide table of held ingest
directories is kept anyway so threads wait on a condition (no polling) and the error can say the holder
is this very process.

The lock file lives in the ingest directory, which is removed when the ingest is committed or aborted.
A waiter may therefore win the ``flock`` of a file that has just been unlinked; after locking, the path is
checked to still name the locked inode, and the acquisition is retried otherwise. The remover unlinks the
lock file last, while still holding it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path

from cargohold.errors import LockedError

LOCK_FILE = "lock"

_guard = threading.Condition()
_held: set[str] = set()


def _reset_after_fork() -> None:
    # A forked child starts with no holds of its own: the parent's writers are the parent's (the child's new
    # open file descriptions still conflict with the parent's flock, so processes stay excluded).
    global _guard, _held
    _guard = threading.Condition()
    _held = set()


os.register_at_fork(after_in_child=_reset_after_fork)


class IngestLock:
    """A held ingest ref. Create with ``IngestLock.acquire``; ``release`` exactly once."""

    def __init__(self, directory: Path, ref: str, fd: int) -> None:
        self.directory = directory
        self.ref = ref
        self._fd: int | None = fd
        self._pid = os.getpid()

    @classmethod
    def acquire(
        cls, directory: Path, ref: str, *, wait: bool = True, timeout: float | None = None
    ) -> IngestLock:
        """Hold ``directory`` (created if missing) for ``ref``. LockedError when held elsewhere and
        ``wait`` is false, or when ``timeout`` seconds pass while waiting."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        key = os.path.abspath(directory)
        with _guard:
            while key in _held:
                remaining = _remaining(deadline)
                if not wait or (remaining is not None and remaining <= 0):
                    raise LockedError(ref, f"another writer in this process (pid {os.getpid()})")
                _guard.wait(remaining)
            _held.add(key)
        try:
            fd = _flock(directory, ref, wait=wait, deadline=deadline)
        except BaseException:
            _forget(key)
            raise
        return cls(directory, ref, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, remove: bool = False) -> None:
        """Let go of the ref. With ``remove``, delete the ingest directory first (lock file last)."""
        fd = self._fd
        if fd is None:
            return
        self._fd = None
        if os.getpid() != self._pid:
            # A forked child dropping its copy: the lock (a shared open file description) is the parent's.
            os.close(fd)
            return
        try:
            if remove:
                _remove_dir_keeping_lock_last(self.directory)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            _forget(os.path.abspath(self.directory))


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _forget(key: str) -> None:
    with _guard:
        _held.discard(key)
        _guard.notify_all()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return text or "another process"


def _flock(directory: Path, ref: str, *, wait: bool, deadline: float | None) -> int:
    path = directory / LOCK_FILE
    delay = 0.002
    while True:
        # Racing a remover: the directory may vanish between mkdir and open (then go round again).
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o755)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            remaining = _remaining(deadline)
            if not wait or (remaining is not None and remaining <= 0):
                raise LockedError(ref, _holder(path)) from None
            time.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(delay * 2, 0.05)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            # We locked a lock file its previous holder unlinked when it removed the ingest: start over.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        return fd


def _remove_dir_keeping_lock_last(directory: Path) -> None:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name != LOCK_FILE:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / LOCK_FILE)
    # A waiter may already have created a fresh lock file here; then the directory is its to keep.
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(directory)


def lock_holder(directory: Path) -> str | None:
    """Who holds the ingest lock of ``directory`` (the holder's text, e.g. ``pid 123``), None when nobody does.
    Only looks: creates nothing, and a lock it takes for the look is let go at once."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(directory / LOCK_FILE)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
