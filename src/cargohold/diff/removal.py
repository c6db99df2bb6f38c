"""Removing a tree that may hold read-only directories, as their (unprivileged) owner can.

``rm -rf`` and ``shutil.rmtree`` fail on a directory without the owner's write bit when not root (images ship
``usr/bin`` 0555). Here a removal that fails with EACCES/EPERM opens the directory up (u+rwx, which its owner
may always do) and tries again. Symlinks are never followed: everything goes through directory fds opened with
O_NOFOLLOW (a directory swapped for a symlink meanwhile fails to open and is reported). With
``one_filesystem`` a directory on another device (a mount below the tree) is refused instead of emptied.
As root nothing is ever denied, so nothing is ever opened up.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from cargohold.errors import FailedPreconditionError

T = TypeVar("T")

# (path, error) of something that could not be removed; the default raises.
OnError = Callable[[str, OSError], None]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DENIED = (errno.EACCES, errno.EPERM)


def _raise(path: str, exc: OSError) -> None:
    # Operations are relative to directory fds: name the whole path instead of the last component.
    raise type(exc)(exc.errno, exc.strerror, path) from exc


def remove_tree(path: str | os.PathLike[str], *, on_error: OnError | None = None,
                one_filesystem: bool = False) -> None:
    """Delete ``path`` and everything below it (a symlink or file at ``path`` is just unlinked).

    A missing ``path`` (or entry vanishing meanwhile) is not an error. Other failures go to ``on_error``
    (which may raise), else are raised; with ``one_filesystem`` a directory on another filesystem than
    ``path`` raises FailedPreconditionError naming it.
    """
    full = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(full)
    pfd = os.open(parent or "/", _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        # The parent is not ours to open up: dev=None marks the top entry.
        _Remover(on_error or _raise, one_filesystem).entry(pfd, parent, name, None, None)
    finally:
        os.close(pfd)


class _Remover:
    def __init__(self, on_error: OnError, one_filesystem: bool) -> None:
        self.on_error = on_error
        self.one_filesystem = one_filesystem

    def entry(self, dfd: int, dpath: str, name: str, dev: int | None, is_dir: bool | None) -> None:
        """Remove ``name`` in ``dfd``; ``dev`` is its parent's device (None: the top, whose parent is not
        ours to open up); ``is_dir`` from the directory listing (None: look)."""
        path = f"{dpath}/{name}"
        inside = dev is not None
        try:
            if is_dir is None:
                is_dir = stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode)
            if is_dir:
                self._empty(dfd, name, path, dev)
                self._retry(dfd, partial(os.rmdir, name, dir_fd=dfd), inside)
            else:
                self._retry(dfd, partial(os.unlink, name, dir_fd=dfd), inside)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.on_error(path, exc)

    def _empty(self, dfd: int, name: str, path: str, dev: int | None) -> None:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)  # O_NOFOLLOW: a symlink swapped in fails, never followed
        except PermissionError:
            if dev is not None:
                _open_up(dfd)
            _open_up_by_name(dfd, name)
            fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            own = os.fstat(fd).st_dev
            if self.one_filesystem and dev is not None and own != dev:
                raise FailedPreconditionError(f"{path}: another filesystem is mounted there; not removing it")
            with os.scandir(fd) as it:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for child, child_is_dir in children:
                self.entry(fd, path, child, own, child_is_dir)
        finally:
            os.close(fd)

    @staticmethod
    def _retry(dfd: int, op: Callable[[], T], inside: bool) -> T:
        """``op`` on an entry of ``dfd``; if denied and ``dfd`` is inside the tree, give that directory u+rwx
        (its owner may) and retry once."""
        try:
            return op()
        except OSError as exc:
            if not inside or exc.errno not in _DENIED or not _open_up(dfd):
                raise
        return op()


def _open_up(dfd: int) -> bool:
    """Give the directory behind ``dfd`` u+rwx; False when it had it already or we may not."""
    mode = stat.S_IMODE(os.fstat(dfd).st_mode)
    if mode & 0o700 == 0o700:
        return False
    try:
        os.fchmod(dfd, mode | 0o700)
    except PermissionError:
        return False
    return True


def _open_up_by_name(dfd: int, name: str) -> None:
    """u+rwx on directory ``name`` that we cannot open for reading: through an O_PATH fd (never a symlink)."""
    fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        # fchmod refuses O_PATH fds; the /proc link reaches the very inode the fd holds.
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(os.fstat(fd).st_mode) | 0o700)
    finally:
        os.close(fd)
