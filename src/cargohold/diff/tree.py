"""Walk a directory tree into a comparable manifest: path -> type, mode, owner, size, content hash, link,
rdev, xattrs, hardlink group. For tests (applied layers against expectations, overlay views against plain
ones) and for commands that describe a rootfs.

Nothing is followed: symlinks are recorded, not entered. Paths are relative, ``/``-separated, root excluded.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
FIFO = "fifo"
CHAR = "char"
BLOCK = "block"
SOCKET = "socket"


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeEntry:
    """One path of a tree. ``mode`` holds permission bits only (incl. setuid/setgid/sticky, 0o7777).

    ``hardlink_group`` is, for a non-directory sharing its inode with other paths of the same tree, the
    smallest of those paths (so groups compare across trees); empty otherwise. ``mtime_ns`` is recorded but
    left out of equality (implicitly created directories get the time of the apply).
    """

    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str = ""
    link: str = ""
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    hardlink_group: str = ""
    mtime_ns: int = field(default=0, compare=False)

    def describe(self) -> str:
        parts = [self.kind, f"{self.mode:04o}", f"{self.uid}:{self.gid}"]
        if self.kind == FILE:
            parts.append(f"{self.size}B sha256:{self.sha256[:12]}")
        if self.link:
            parts.append(f"-> {self.link}")
        if self.rdev is not None:
            parts.append(f"dev {self.rdev[0]}:{self.rdev[1]}")
        if self.xattrs:
            parts.append("xattrs " + ",".join(f"{k}={v!r}" for k, v in self.xattrs))
        if self.hardlink_group:
            parts.append(f"linked with {self.hardlink_group}")
        return " ".join(parts)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISLNK(mode):
        return SYMLINK
    if stat.S_ISFIFO(mode):
        return FIFO
    if stat.S_ISCHR(mode):
        return CHAR
    if stat.S_ISBLK(mode):
        return BLOCK
    return SOCKET


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def _walk(top: str, rel: str) -> Iterator[tuple[str, str, os.stat_result]]:
    with os.scandir(top) as it:
        children = sorted(it, key=lambda d: d.name)
    for child in children:
        crel = f"{rel}/{child.name}" if rel else child.name
        try:
            st = child.stat(follow_symlinks=False)
        except FileNotFoundError:
            # Gone meanwhile, or an overlayfs whiteout listed by a directory that merges with nothing below
            # (readdir passes such directories through; lookups of the whiteout fail).
            continue
        yield crel, child.path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(child.path, crel)


def snapshot_tree(
    root: Path | str, *, include_xattrs: bool = True, hash_content: bool = True
) -> dict[str, TreeEntry]:
    """Every path under ``root`` with its type, mode, owner, content hash (unless ``hash_content`` is False),
    link target, device, xattrs (when ``include_xattrs``) and hardlink group.

    Deterministic order: depth first, each directory's children by name. Never follows symlinks and never
    opens anything but regular files."""
    top = os.fspath(root)
    entries: dict[str, TreeEntry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for rel, path, st in _walk(top, ""):
        kind = _kind(st.st_mode)
        sha = ""
        if kind == FILE and hash_content:
            with open(path, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
        entries[rel] = TreeEntry(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == FILE else 0,
            sha256=sha,
            link=os.readlink(path) if kind == SYMLINK else "",
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in (CHAR, BLOCK) else None,
            xattrs=_xattrs(path) if include_xattrs else (),
            mtime_ns=st.st_mtime_ns,
        )
        if kind != DIR and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for paths in inodes.values():
        if len(paths) > 1:
            group = min(paths)
            for rel in paths:
                entries[rel] = replace(entries[rel], hardlink_group=group)
    return entries


def compare_trees(expected: Mapping[str, TreeEntry], actual: Mapping[str, TreeEntry]) -> list[str]:
    """Human-readable differences, one line per path (empty when the trees are equal)."""
    out = []
    for path in sorted(set(expected) | set(actual)):
        want, got = expected.get(path), actual.get(path)
        if want == got:
            continue
        if want is None:
            assert got is not None
            out.append(f"{path}: unexpected {got.describe()}")
        elif got is None:
            out.append(f"{path}: missing, want {want.describe()}")
        else:
            out.append(f"{path}: want {want.describe()}, got {got.describe()}")
    return out
