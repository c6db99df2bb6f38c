"""Scratch directories (flock-held while in use), quiet tree removal and disk usage."""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import stat
from pathlib import Path

from cargohold.diff.removal import remove_tree
from cargohold.snapshots.base import Usage

log = logging.getLogger(__name__)


class Scratch:
    """A directory under construction or destruction, held with flock until ``close``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    @classmethod
    def create(cls, parent: Path, prefix: str) -> Scratch:
        """A new, locked, empty directory ``parent/<prefix>-<random hex>``."""
        path = parent / f"{prefix}-{secrets.token_hex(8)}"
        path.mkdir(mode=0o700)
        scratch = cls(path)
        fcntl.flock(scratch.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return scratch

    @classmethod
    def try_lock(cls, path: Path) -> Scratch | None:
        """The scratch directory at ``path`` if nobody holds it (its owner died), else None."""
        try:
            scratch = cls(path)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(scratch.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            scratch.close()
            return None
        return scratch

    def remove(self) -> None:
        rmtree_quiet(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def rmtree_quiet(path: Path) -> None:
    """Delete a tree, logging (not raising) what could not be removed; cleanup retries on the next open.

    Read-only directories inside (images made by an ordinary user keep ``usr/bin`` 0555) are opened up."""

    def report(failed: str, exc: OSError) -> None:
        log.warning("removing %s: %s", failed, exc)

    remove_tree(path, on_error=report)


def disk_usage(path: Path, *, one_filesystem: bool = False) -> Usage:
    """Allocated bytes and distinct inodes under ``path`` (hard links once), as containerd's DiskUsage.

    Entries removed while walking are skipped (a live tree changes under us); with ``one_filesystem``, other
    filesystems mounted inside the tree are not entered or counted.
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Usage()
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    stack = [os.fspath(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                est = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if one_filesystem and est.st_dev != st.st_dev:
                continue
            ident = (est.st_dev, est.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            size += est.st_blocks * 512
            if stat.S_ISDIR(est.st_mode):
                stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))
