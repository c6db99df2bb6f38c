"""File metadata from tar entries: owner, xattrs, mode, times — in the order that keeps them all.

chown first (it clears setuid/setgid bits and ``security.capability``), then xattrs, then chmod, then times.
``trusted.*`` xattrs are never taken from a layer: they steer overlayfs (opaque, redirect, metacopy).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading

from cargohold.diff.tarstream import TarEntry

log = logging.getLogger(__name__)

_MAX_NS = (1 << 63) - 1
_XATTR_SKIPPABLE = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
# Not the layer's to remove: overlayfs' own (trusted.*) and the security module's label.
_XATTRS_KEPT = ("trusted.", "security.selinux")


def read_umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777  # unknown: makes every mode get an explicit chmod


def entry_times(e: TarEntry) -> tuple[int, int]:
    """(atime, mtime) in ns. containerd's bounds: times before the epoch or past the range become the epoch;
    atime is the later of the two."""
    mtime = e.mtime_ns if 0 <= e.mtime_ns <= _MAX_NS else 0
    atime = mtime if e.atime_ns is None else max(e.atime_ns, mtime)
    return (atime if atime <= _MAX_NS else mtime), mtime


# Local filesystems where a new inode gets the creator's fsuid, and its fsgid unless the directory is setgid
# (then the directory's gid): POSIX/System V semantics. Elsewhere (NFS squashing, FUSE, vfat...) what a create
# gives is the server's business, so every owner is set explicitly.
_SYSV_OWNER_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "overlay", "zfs",
                            "bcachefs"})
_OCTAL = re.compile(r"\\([0-7]{3})")
_BSD_GROUPS = frozenset({"grpid", "bsdgroups"})  # new inodes always take the directory's gid


def create_owner_rule(path: str) -> str | None:
    """How the filesystem holding ``path`` gives new inodes their group: ``"sysv"`` (the creator's gid, the
    directory's when it is setgid), ``"bsd"`` (always the directory's: the grpid mount option), or None when
    unknown — then nothing may be assumed about a new inode's owner."""
    real = os.path.realpath(path)
    best: tuple[int, str, set[str]] | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                try:
                    dash = fields.index("-", 6)
                except ValueError:
                    continue
                point = fields[4].encode().decode("unicode_escape")  # \040 and friends
                if not (real == point or real.startswith(point.rstrip("/") + "/")):
                    continue
                if best is None or len(point) >= best[0]:  # the longest, and the last (top) one mounted there
                    options = set(fields[5].split(",")) | set(fields[dash + 3].split(","))
                    best = (len(point), fields[dash + 1], options)
    except (OSError, IndexError):
        return None
    if best is None or best[1] not in _SYSV_OWNER_FS:
        return None
    return "bsd" if best[2] & _BSD_GROUPS else "sysv"


# Set once a process warned that owners were not applied: one line per process, not per layer.
_OWNERS_WARNED = threading.Event()


class Owners:
    """chown as the entry says. Not root: owners other than ours cannot be set (files stay ours, as in
    containerd's rootless mode); warn once per process and go on."""

    def __init__(self) -> None:
        self.privileged = os.geteuid() == 0

    def apply(self, target: int | str, e: TarEntry, *, follow: bool = False) -> None:
        try:
            if isinstance(target, int):
                os.fchown(target, e.uid, e.gid)
            else:
                os.chown(target, e.uid, e.gid, follow_symlinks=follow)
        except PermissionError:
            if self.privileged:
                raise
            if not _OWNERS_WARNED.is_set():
                _OWNERS_WARNED.set()
                log.warning("not root: tar owners not applied, files stay the user's (first: %r %d:%d)",
                            e.name, e.uid, e.gid)


def set_xattrs(target: int | str, e: TarEntry, *, symlink: bool = False) -> None:
    """The entry's xattrs on an fd or (not followed) path. Unsupported ones are skipped with a warning."""
    assert e.xattrs is not None
    for key, value in e.xattrs.items():
        if key.startswith("trusted."):
            log.warning("tar entry %r: xattr %s ignored (trusted.* is never taken from a layer)", e.name, key)
            continue
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as exc:
            # Filesystems without xattrs; user.* on symlinks; security.* an LSM refuses.
            skippable = exc.errno in _XATTR_SKIPPABLE or (
                exc.errno == errno.EPERM and (symlink or key.startswith("security.")))
            if not skippable:
                raise
            log.warning("tar entry %r: xattr %s not applied: %s", e.name, key, exc.strerror)


def drop_stale_xattrs(path: str, e: TarEntry) -> None:
    """An existing directory keeps only the entry's xattrs, as an overlay upper directory would show it."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    wanted = e.xattrs or {}
    for key in names:
        if key not in wanted and not key.startswith(_XATTRS_KEPT):
            os.removexattr(path, key, follow_symlinks=False)
