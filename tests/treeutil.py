"""Independent tree model for unpack tests: the expected filesystem computed from layer entry lists, and a
plain os.walk reader of the real tree. Neither uses cargohold's extractor."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cargohold.devtools.samples import Entry

Node = tuple  # (type, mode, uid, gid, payload) payload: sha256 for files, target for links, rdev for devices


def expected_tree(layers: Sequence[Sequence[Entry]]) -> dict[str, Node]:
    """Apply entry lists with OCI whiteout semantics to an in-memory map path -> node."""
    tree: dict[str, Node] = {}
    for entries in layers:
        created: set[str] = set()
        for e in entries:
            path = e.path.strip("/")
            parent, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":
                prefix = parent + "/" if parent else ""
                for p in list(tree):
                    if p.startswith(prefix) and p != parent and p not in created:
                        del tree[p]
                continue
            if base.startswith(".wh."):
                victim = (parent + "/" if parent else "") + base[4:]
                for p in list(tree):
                    if p == victim or p.startswith(victim + "/"):
                        del tree[p]
                continue
            if e.kind == "dir":
                node: Node = ("dir", e.mode & 0o7777, e.uid, e.gid, None)
            elif e.kind == "file":
                node = ("file", e.mode & 0o7777, e.uid, e.gid, hashlib.sha256(e.data).hexdigest())
            elif e.kind == "symlink":
                node = ("symlink", None, e.uid, e.gid, e.link)
            elif e.kind == "hardlink":
                target = tree[e.link.strip("/")]
                node = target
            elif e.kind == "fifo":
                node = ("fifo", e.mode & 0o7777, e.uid, e.gid, None)
            elif e.kind == "char":
                node = ("char", e.mode & 0o7777, e.uid, e.gid, os.makedev(e.devmajor, e.devminor))
            else:
                raise ValueError(e.kind)
            if node[0] != "dir":  # a non-directory replaces a whole subtree
                for p in list(tree):
                    if p.startswith(path + "/"):
                        del tree[p]
            tree[path] = node
            created.add(path)
    return tree


def read_tree(root: Path) -> dict[str, Node]:
    """The real tree under root, as nodes (whiteout char devices would show as 'char' with rdev 0)."""
    out: dict[str, Node] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, st.st_uid, st.st_gid, None)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, st.st_uid, st.st_gid, hashlib.sha256(full.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", None, st.st_uid, st.st_gid, os.readlink(full))
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", mode, st.st_uid, st.st_gid, None)
            elif stat.S_ISCHR(st.st_mode):
                out[rel] = ("char", mode, st.st_uid, st.st_gid, st.st_rdev)
            else:
                out[rel] = ("other", mode, st.st_uid, st.st_gid, None)
    return out


def inode_groups(root: Path) -> list[set[str]]:
    """Sets of paths that are hardlinks of one another (only groups of 2+)."""
    by_inode: dict[tuple[int, int], set[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            if stat.S_ISREG(st.st_mode):
                by_inode.setdefault((st.st_dev, st.st_ino), set()).add(str(full.relative_to(root)))
    return sorted((g for g in by_inode.values() if len(g) > 1), key=sorted)
