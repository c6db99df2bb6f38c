"""Build real layer tarballs for tests: any entry kind, PAX xattrs, whiteouts, opaque markers, hostile names.

Python's ``tarfile`` writer is used to build inputs (it keeps names exactly as given: ``../x``, ``/abs``,
``.wh...``); what is under test reads them with its own reader. ``expected_tree`` is an independent model of
what applying a list of layers must produce, computed from the entry lists alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
import tarfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cargohold.devtools.samples import FIXED_MTIME, Entry, tar_layer
from cargohold.diff.compression import compress_gzip, compress_zstd
from cargohold.diff.tree import TreeEntry


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerEntry:
    """One tar member. ``kind``: file, dir, symlink, hardlink, fifo, char, block. ``link`` is the symlink
    target or the hardlink's member name. Whiteouts are plain empty files: see ``whiteout``/``opaque``."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None  # default: 0755 for dirs, 0644 otherwise
    uid: int = 0
    gid: int = 0
    link: str = ""
    major: int = 0
    minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: int = FIXED_MTIME

    @property
    def perm(self) -> int:
        if self.mode is not None:
            return self.mode
        return 0o755 if self.kind == "dir" else 0o644


def f(path: str, data: bytes = b"", **kw: object) -> LayerEntry:
    return LayerEntry(path=path, kind="file", data=data, **kw)  # type: ignore[arg-type]


def d(path: str, **kw: object) -> LayerEntry:
    return LayerEntry(path=path, kind="dir", **kw)  # type: ignore[arg-type]


def symlink(path: str, target: str, **kw: object) -> LayerEntry:
    return LayerEntry(path=path, kind="symlink", link=target, mode=0o777, **kw)  # type: ignore[arg-type]


def hardlink(path: str, target: str, **kw: object) -> LayerEntry:
    return LayerEntry(path=path, kind="hardlink", link=target, **kw)  # type: ignore[arg-type]


def whiteout(path: str) -> LayerEntry:
    """The OCI whiteout hiding ``path`` of the parent layers."""
    parent, _, name = path.rpartition("/")
    return f(f"{parent}/.wh.{name}" if parent else f".wh.{name}")


def opaque(directory: str) -> LayerEntry:
    """The OCI opaque marker: ``directory`` shows only this layer's content."""
    return f(f"{directory.rstrip('/')}/.wh..wh..opq" if directory else ".wh..wh..opq")


def capability(bit: int) -> bytes:
    """A valid VFS_CAP_REVISION_2 ``security.capability`` value granting capability ``bit`` (effective)."""
    return struct.pack("<IIIII", 0x02000000 | 0x1, 1 << bit, 0, 0, 0)


def make_layer(entries: Sequence[LayerEntry], *, fmt: int = tarfile.PAX_FORMAT, trailing: bytes = b"") -> bytes:
    """A tar of ``entries`` in order (names kept verbatim), then ``trailing`` bytes after end-of-archive."""
    return tar_layer(
        [Entry(path=e.path, kind=e.kind, data=e.data, mode=e.perm, uid=e.uid, gid=e.gid, link=e.link,
               devmajor=e.major, devminor=e.minor, xattrs=dict(e.xattrs), mtime=e.mtime) for e in entries],
        fmt=fmt, trailing=trailing,
    )


def gzip_layer(tar: bytes, level: int = 6) -> bytes:
    return compress_gzip(tar, level)


def zstd_layer(tar: bytes, level: int = 3) -> bytes:
    return compress_zstd(tar, level)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the independent model -----------------------------------------------------------------------------------


def _norm(path: str) -> str:
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def expected_tree(layers: Sequence[Sequence[LayerEntry]]) -> dict[str, TreeEntry]:
    """What applying ``layers`` in order must leave, per the OCI layer spec, computed without touching disk.

    Per layer: opaque markers first hide every parent-layer path under their directory, whiteouts hide their
    path (and what is below it), then the other entries apply in order (a directory over a directory keeps
    the children and takes the new metadata; anything else replaces what was there, subtree included).
    Only supports entries whose parents are real directories (no writes through symlinks), which is what
    the comparison tests use.
    """
    tree: dict[str, TreeEntry] = {}
    inode: dict[str, int] = {}
    next_inode = iter(range(1, 1 << 30))
    for entries in layers:
        for e in entries:
            parent, _, base = _norm(e.path).rpartition("/")
            if base == ".wh..wh..opq":
                for p in [p for p in tree if parent == "" or p.startswith(parent + "/")]:
                    del tree[p]
        for e in entries:
            parent, _, base = _norm(e.path).rpartition("/")
            if base.startswith(".wh.") and base != ".wh..wh..opq":
                gone = f"{parent}/{base[4:]}" if parent else base[4:]
                for p in [p for p in tree if _under(p, gone)]:
                    del tree[p]
        for e in entries:
            path = _norm(e.path)
            if path.rpartition("/")[2].startswith(".wh."):
                continue
            old = tree.get(path)
            if not (e.kind == "dir" and old is not None and old.kind == "dir"):
                for p in [p for p in tree if _under(p, path)]:
                    del tree[p]
            if e.kind == "hardlink":
                target = _norm(e.link)
                tree[path] = tree[target]
                inode[path] = inode[target]
                continue
            xattrs = tuple(sorted(e.xattrs.items()))
            tree[path] = TreeEntry(
                kind=e.kind,
                mode=0o777 if e.kind == "symlink" else e.perm,
                uid=e.uid,
                gid=e.gid,
                size=len(e.data) if e.kind == "file" else 0,
                sha256=hashlib.sha256(e.data).hexdigest() if e.kind == "file" else "",
                link=e.link if e.kind == "symlink" else "",
                rdev=(e.major, e.minor) if e.kind in ("char", "block") else None,
                xattrs=xattrs,
                mtime_ns=e.mtime * 1_000_000_000,
            )
            inode[path] = next(next_inode)
    groups: dict[int, list[str]] = {}
    for path in tree:
        if tree[path].kind != "dir":
            groups.setdefault(inode[path], []).append(path)
    out = {}
    for path in sorted(tree):
        entry = tree[path]
        members = groups.get(inode[path], [])
        if len(members) > 1:
            entry = replace(entry, hardlink_group=min(members))
        out[path] = entry
    return out


# -- host capabilities and mounts ----------------------------------------------------------------------------


def supports_user_xattrs(directory: Path) -> bool:
    probe = directory / f".xattr-probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@contextlib.contextmanager
def overlay_mount(lowers: Sequence[Path], target: Path) -> Iterator[Path]:
    """A read-only overlayfs of ``lowers`` (topmost first) at ``target``; unmounted on exit."""
    target.mkdir(parents=True, exist_ok=True)
    opts = "lowerdir=" + ":".join(os.fspath(p) for p in lowers)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, os.fspath(target)], check=True,
                   capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", os.fspath(target)], check=True, capture_output=True)
