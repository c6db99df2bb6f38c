"""Mounting ``Mount`` lists with mount(2) through ctypes (no ``mount`` subprocess: faster, exact errors).

Options are split as containerd's mount_linux.go does: known flag words (ro, rbind, nosuid, ...) become
MS_* flags, propagation words (rprivate, ...) a second call, everything else the filesystem's data string.
A read-only bind needs a second, remount call because the kernel ignores MS_RDONLY on the initial bind.

The kernel copies at most one page of mount data. Overlay mounts with many layers can exceed it, so like
containerd we then rewrite ``lowerdir`` relative to the lower dirs' common parent and mount from a thread
whose working directory (unshared from the rest of the process with CLONE_FS) is that parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cargohold.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError, UnsafePathError
from cargohold.snapshots.base import Mount

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
CLONE_FS = 0x200

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# word -> (clears the flag?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int


@dataclass(frozen=True, slots=True)
class MountOptions:
    """``Mount.options`` split into MS_* flags, propagation flags and the filesystem data words."""

    flags: int
    propagation: int
    data: tuple[str, ...]


def parse_options(options: Sequence[str]) -> MountOptions:
    flags = 0
    propagation = 0
    data: list[str] = []
    for word in options:
        if word in _FLAGS:
            clear, flag = _FLAGS[word]
            flags = flags & ~flag if clear else flags | flag
        elif word in _PROPAGATION:
            propagation |= _PROPAGATION[word]
        else:
            data.append(word)
    return MountOptions(flags, propagation, tuple(data))


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(
        os.fsencode(source) if source else None,
        os.fsencode(target),
        os.fsencode(fstype) if fstype else None,
        flags,
        os.fsencode(data) if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _sys_mount_in(cwd: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) with relative paths in ``data`` resolved against ``cwd``, without changing our own cwd."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            # After unshare(CLONE_FS) this thread's cwd is its own; other threads keep theirs.
            if _libc.unshare(CLONE_FS) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_FS): {os.strerror(err)}")
            os.chdir(cwd)
            _sys_mount(source, target, fstype, flags, data)
        except BaseException as exc:  # handed to the calling thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="cargohold-mount")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


def _compact_lowerdir(data: str, target: str) -> tuple[str, str]:
    """Rewrite ``lowerdir=`` relative to the lower dirs' common parent; returns (data, that parent)."""
    words = data.split(",")
    index = next((i for i, word in enumerate(words) if word.startswith("lowerdir=")), -1)
    if index < 0:
        raise InvalidArgumentError(f"mount at {target}: {len(data)} bytes of overlay options, over the limit")
    lowers = words[index][len("lowerdir=") :].split(":")
    common = os.path.commonpath(lowers) if len(lowers) > 1 else os.path.dirname(lowers[0])
    words[index] = "lowerdir=" + ":".join(os.path.relpath(d, common) for d in lowers)
    compact = ",".join(words)
    if len(compact.encode()) + 1 > PAGE_SIZE:
        raise InvalidArgumentError(
            f"mount at {target}: overlay options are {len(compact.encode())} bytes even with lowerdir "
            f"relative to {common} ({len(lowers)} layers); the kernel takes at most {PAGE_SIZE - 1}"
        )
    return compact, common


def _describe(m: Mount, target: str) -> str:
    return f"mount -t {m.type} -o {','.join(m.options)} {m.source} {target}"


def mount_one(m: Mount, target: str | Path) -> None:
    """Mount one record exactly at ``target`` (``m.target`` is not applied here)."""
    dest = os.path.abspath(target)
    opts = parse_options(m.options)
    if m.type == "bind" and not opts.flags & MS_BIND:  # "bind" without bind options still means a bind
        opts = MountOptions(opts.flags | MS_BIND, opts.propagation, opts.data)
    data = ",".join(opts.data)
    cwd = ""
    if len(data.encode()) + 1 > PAGE_SIZE:
        if m.type != "overlay":
            raise InvalidArgumentError(f"{_describe(m, dest)}: {len(data)} bytes of options, over the limit")
        data, cwd = _compact_lowerdir(data, dest)
    try:
        if not opts.flags & MS_REMOUNT or data:
            if cwd:
                _sys_mount_in(cwd, m.source, dest, m.type, opts.flags, data)
            else:
                _sys_mount(m.source, dest, m.type, opts.flags, data)
        if opts.propagation:
            _sys_mount("", dest, "", opts.propagation, "")
        if opts.flags & MS_BIND and opts.flags & MS_RDONLY:
            # The kernel ignores MS_RDONLY when creating a bind mount; apply it with a remount.
            try:
                _sys_mount("", dest, "", opts.flags | MS_REMOUNT, "")
            except OSError:
                unmount(dest, lazy=True)
                raise
    except OSError as exc:
        if exc.errno == errno.EPERM and os.geteuid() != 0:  # an ordinary user: say so, in one line
            raise FailedPreconditionError(
                f"mount {m.type} {m.source} at {dest} needs root (as uid {os.geteuid()}: {exc.strerror})"
            ) from exc
        raise FailedPreconditionError(f"{_describe(m, dest)}: {exc.strerror}") from exc


def _join_target(base: str, sub: str) -> str:
    if not sub:
        return base
    dest = os.path.normpath(os.path.join(base, sub.lstrip("/")))
    if dest != base and not dest.startswith(base.rstrip("/") + "/"):
        raise UnsafePathError(f"mount target {sub!r} leaves {base}")
    return dest


def mount_all(mounts: Sequence[Mount], target: str | Path) -> None:
    """Mount every record in order at ``target`` (plus each ``Mount.target``); all or nothing."""
    base = os.path.abspath(target)
    done: list[str] = []
    try:
        for m in mounts:
            dest = _join_target(base, m.target)
            mount_one(m, dest)
            done.append(dest)
    except BaseException:
        for dest in reversed(done):
            unmount(dest, lazy=True)
        raise


def _mount_points() -> Iterator[str]:
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            raw = line.split(b" ")[4]
            yield os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw))


def _mounts_below(path: str) -> list[str]:
    """Mount points strictly below ``path``, deepest first."""
    prefix = path.rstrip("/") + "/"
    return sorted({p for p in _mount_points() if p.startswith(prefix)}, key=len, reverse=True)


def mounts_at_or_below(path: str | Path) -> list[str]:
    """Mount points at ``path`` or below it, deepest first."""
    top = os.path.abspath(path)
    prefix = top.rstrip("/") + "/"
    return sorted({p for p in _mount_points() if p == top or p.startswith(prefix)}, key=len, reverse=True)


def unmount(target: str | Path, *, lazy: bool = False) -> None:
    """Unmount everything mounted at or below ``target``; nothing mounted there is not an error.

    EBUSY is retried for about 2.5 s (a process may still be leaving the tree) before UnavailableError;
    ``lazy=True`` detaches instead (MNT_DETACH) and never waits.
    """
    top = os.path.abspath(target)
    for below in _mounts_below(top):
        _unmount_stack(below, lazy)
    _unmount_stack(top, lazy)


def _unmount_stack(target: str, lazy: bool) -> None:
    path = os.fsencode(target)
    flags = MNT_DETACH if lazy else 0
    busy = 0
    for _ in range(1000):
        if _libc.umount2(path, flags) == 0:
            continue  # something else may be stacked underneath
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
            return
        if err == errno.EBUSY and busy < 50:
            busy += 1
            time.sleep(0.05)
            continue
        if err == errno.EBUSY:
            raise UnavailableError(f"unmount {os.fsdecode(path)}: {os.strerror(err)}")
        raise FailedPreconditionError(f"unmount {os.fsdecode(path)}: {os.strerror(err)}")
    raise FailedPreconditionError(f"unmount {os.fsdecode(path)}: still mounted after 1000 unmounts")


@contextmanager
def with_temp_mount(mounts: Sequence[Mount], *, root: str | Path | None = None) -> Iterator[Path]:
    """Mount ``mounts`` on a fresh directory (under ``root`` or the system temp dir) for the with-block."""
    if root is not None:
        os.makedirs(root, exist_ok=True)
    mountpoint = Path(tempfile.mkdtemp(prefix="cargohold-mount-", dir=root))
    try:
        mount_all(mounts, mountpoint)
    except BaseException:
        mountpoint.rmdir()
        raise
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
        mountpoint.rmdir()
