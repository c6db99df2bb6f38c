"""The bench's tree checks: a reference listing per layer read from the layer tar (independently of cargohold's
extractor), the listing of a real directory, and a file-by-file comparison naming every difference.

A node is (type, mode, uid, gid, size, sha256, link target, xattrs, hard link count of a regular file).
Three views of a layer tar:

* ``raw``: entries as ``tar -x`` leaves them (whiteout files stay plain empty files);
* ``overlay``: as an overlayfs snapshotter's upper dir holds them (``.wh.NAME`` -> a 0/0 character device
  NAME, ``.wh..wh..opq`` -> ``trusted.overlay.opaque=y`` on its directory);
* ``merge``: the layers applied in order with OCI whiteout semantics (a native snapshot's full tree).

Hardlinks become nodes equal to their target's, with the link count of the group (the bench images never
white out one name of a hardlinked file, so ``merge`` keeps the counts). Modification times are not compared
(tools differ on directory mtimes by design). Compared xattrs: ``user.*`` and ``trusted.overlay.opaque``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


class Node(NamedTuple):
    kind: str  # file, dir, symlink, whiteout, fifo, char, block
    mode: int | None  # permission bits incl. setuid/sticky; None for symlinks and whiteouts
    uid: int | None
    gid: int | None
    size: int | None  # regular files only
    sha256: str | None  # regular files only
    link: str | None  # symlink target
    xattrs: tuple[tuple[str, bytes], ...] = ()
    nlink: int | None = None  # regular files: names of the inode (a hardlink kept as a link, not a copy)


Listing = dict[str, Node]


def _kept_xattr(name: str) -> bool:
    return name.startswith("user.") or name == OPAQUE_XATTR


def _hash_stream(f: object) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    read = f.read  # type: ignore[attr-defined]
    while chunk := read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file's bytes."""
    with open(path, "rb") as f:
        return _hash_stream(f)


def _norm(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def layer_listing(tar_path: Path, view: str = "raw") -> Listing:
    """The nodes of one layer tar (gzip or plain) in the ``raw`` or ``overlay`` view."""
    if view not in ("raw", "overlay"):
        raise ValueError(f"unknown view {view!r}")
    out: Listing = {}
    links: dict[str, list[str]] = {}
    with tarfile.open(tar_path, "r|*") as tar:
        for m in tar:
            path = _norm(m.name)
            if not path:
                continue
            parent, _, base = path.rpartition("/")
            xattrs = tuple(sorted((k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
                                  for k, v in m.pax_headers.items()
                                  if k.startswith("SCHILY.xattr.") and _kept_xattr(k[len("SCHILY.xattr."):])))
            if view == "overlay" and base == OPAQUE:
                d = out[parent]
                out[parent] = d._replace(xattrs=tuple(sorted((*d.xattrs, (OPAQUE_XATTR, b"y")))))
                continue
            if view == "overlay" and base.startswith(WHITEOUT):
                out[(parent + "/" if parent else "") + base[len(WHITEOUT):]] = Node(
                    "whiteout", None, None, None, None, None, None)
                continue
            mode = m.mode & 0o7777
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                size, digest = _hash_stream(f)
                out[path] = Node("file", mode, m.uid, m.gid, size, digest, None, xattrs, 1)
            elif m.islnk():
                target = _norm(m.linkname)
                links.setdefault(target, []).append(path)
                out[path] = out[target]
            elif m.isdir():
                out[path] = Node("dir", mode, m.uid, m.gid, None, None, None, xattrs)
            elif m.issym():
                out[path] = Node("symlink", None, m.uid, m.gid, None, None, m.linkname, xattrs)
            elif m.isfifo():
                out[path] = Node("fifo", mode, m.uid, m.gid, None, None, None, xattrs)
            else:
                raise ValueError(f"{tar_path}: entry {m.name!r}: type {m.type!r} is not in the bench images")
    for target, names in links.items():
        for name in (target, *names):
            out[name] = out[name]._replace(nlink=len(names) + 1)
    return out


def merge(layers: Sequence[Listing]) -> Listing:
    """Raw layer listings applied in order with OCI whiteout semantics: the flattened tree."""
    tree: Listing = {}
    for layer in layers:
        created: set[str] = set()
        for path, node in layer.items():  # tar order: parents before children
            parent, _, base = path.rpartition("/")
            prefix = parent + "/" if parent else ""
            if base == OPAQUE:
                for p in [p for p in tree if p.startswith(prefix) and p not in created]:
                    del tree[p]
                continue
            if base.startswith(WHITEOUT):
                victim = prefix + base[len(WHITEOUT):]
                for p in [p for p in tree if p == victim or p.startswith(victim + "/")]:
                    del tree[p]
                continue
            if node.kind != "dir":
                for p in [p for p in tree if p.startswith(path + "/")]:
                    del tree[p]
            tree[path] = node
            created.add(path)
    return tree


def read_tree(root: Path, *, skip: Iterable[str] = ()) -> Listing:
    """The real tree under ``root`` as nodes (0/0 character devices are whiteouts); ``skip``: top-level names
    to leave out. A file's ``nlink`` is the number of its names *in this tree* (a native snapshot shares inodes
    with the snapshots below it: what matters is which names of the image are one file)."""
    out: Listing = {}
    inodes: dict[str, tuple[int, int]] = {}
    skipped = set(skip)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for e in it:
                path = f"{rel}/{e.name}" if rel else e.name
                if not rel and e.name in skipped:
                    continue
                st = e.stat(follow_symlinks=False)
                mode = stat.S_IMODE(st.st_mode)
                xattrs: tuple[tuple[str, bytes], ...] = ()
                if not stat.S_ISLNK(st.st_mode):
                    names = sorted(n for n in os.listxattr(e.path, follow_symlinks=False) if _kept_xattr(n))
                    xattrs = tuple((n, os.getxattr(e.path, n, follow_symlinks=False)) for n in names)
                if stat.S_ISDIR(st.st_mode):
                    out[path] = Node("dir", mode, st.st_uid, st.st_gid, None, None, None, xattrs)
                    stack.append(path)
                elif stat.S_ISREG(st.st_mode):
                    with open(e.path, "rb") as f:
                        size, digest = _hash_stream(f)
                    out[path] = Node("file", mode, st.st_uid, st.st_gid, size, digest, None, xattrs, 1)
                    inodes[path] = (st.st_dev, st.st_ino)
                elif stat.S_ISLNK(st.st_mode):
                    out[path] = Node("symlink", None, st.st_uid, st.st_gid, None, None, os.readlink(e.path))
                elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    out[path] = Node("whiteout", None, None, None, None, None, None)
                elif stat.S_ISFIFO(st.st_mode):
                    out[path] = Node("fifo", mode, st.st_uid, st.st_gid, None, None, None, xattrs)
                else:
                    out[path] = Node("other", mode, st.st_uid, st.st_gid, None, None, None, xattrs)
    count: dict[tuple[int, int], int] = {}
    for key in inodes.values():
        count[key] = count.get(key, 0) + 1
    for path, key in inodes.items():
        if count[key] > 1:
            out[path] = out[path]._replace(nlink=count[key])
    return out


def compare(expected: Listing, actual: Listing, *, limit: int = 10) -> list[str]:
    """Differences, one line each naming the path and the field ("missing", "unexpected", "mode 0644 != 0600").
    At most ``limit`` lines plus a count of the rest."""
    problems: list[str] = []
    for path in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(path), actual.get(path)
        if got is None:
            problems.append(f"{path}: missing")
        elif want is None:
            problems.append(f"{path}: unexpected {got.kind}")
        elif want != got:
            diffs = []
            for field in Node._fields:
                w, g = getattr(want, field), getattr(got, field)
                if w != g:
                    if field == "mode" and w is not None and g is not None:
                        diffs.append(f"mode {w:04o} != {g:04o}")
                    else:
                        diffs.append(f"{field} {w!r} != {g!r}")
            problems.append(f"{path}: " + ", ".join(diffs) + " (expected != found)")
    if len(problems) > limit:
        return [*problems[:limit], f"... and {len(problems) - limit} more"]
    return problems
