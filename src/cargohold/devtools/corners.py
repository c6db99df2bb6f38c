"""Deterministic layers holding the tar corners real images contain, built byte by byte, and the tree they
must unpack to.

Covered: GNU ``S`` sparse files (with extension blocks) and the PAX sparse formats 0.0, 0.1 and 1.0; GNU long
names and long link names; PAX headers with non-UTF-8 path and link path and a binary xattr value; base-256
size, uid, gid and mtime; a hardlink to a symlink; paths repeated within one layer (last wins); a directory
entry after its children; a ``lib64``-style symlink whose relative target climbs past the root, with a file
and a hardlink resolved through it (clamped at the root as in a chroot). ``gzip_multimember`` compresses as
several concatenated gzip members (pigz / concatenated blobs).

``corner_layers()`` gives the uncompressed layer tars, ``corner_blobs()`` them compressed (some
multi-member), ``corner_tree()`` what ``cargohold rootfs`` must produce from them (as root), and
``tree_listing(root)`` reads a real directory in the same shape. ``corner_image()`` is the image of those
blobs, ready for ``samples.push``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from cargohold.devtools.samples import FIXED_MTIME, Blob, SampleImage, build_image
from cargohold.oci import mediatypes as mt

BLOCK = 512
# path -> (kind, permission bits, size, sha256 hex of the content for files / the target for symlinks / "")
Node = tuple[str, int, int, str]

BIG_ID = 2_100_000  # above the 7-digit octal maximum (2097151): needs base-256
BIG_MTIME = 8**11 + 5  # above the 11-digit octal maximum: needs base-256
XATTR_VALUE = b"\x00\xff\x80binary\n"  # not UTF-8, with a NUL: xattr values are bytes
NON_UTF8_NAME = b"names/caf\xe9-latin1"  # ISO-8859-1, invalid UTF-8
NON_UTF8_TARGET = b"caf\xe9-target"


# -- header building -----------------------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def _base256(value: int, width: int) -> bytes:
    return b"\x80" + value.to_bytes(width - 1, "big")


def _num(value: int, width: int, *, b256: bool = False) -> bytes:
    if b256 or value >= 8 ** (width - 1):
        return _base256(value, width)
    return _octal(value, width)


def _put(buf: bytearray, offset: int, data: bytes) -> None:
    buf[offset : offset + len(data)] = data


def header(name: bytes, *, typeflag: bytes = b"0", size: int = 0, mode: int = 0o644, uid: int = 0, gid: int = 0,
           mtime: int = FIXED_MTIME, linkname: bytes = b"", gnu: bool = False, b256: Iterable[str] = (),
           extra: dict[int, bytes] | None = None) -> bytes:
    """One 512-byte header, checksum included. ``gnu``: GNU magic (``ustar  \\0``) instead of POSIX ustar.
    ``b256`` names the fields (size, uid, gid, mtime) to write in base-256 even when octal would do.
    ``extra``: raw bytes at given offsets (GNU sparse areas)."""
    forced = set(b256)
    buf = bytearray(BLOCK)
    _put(buf, 0, name[:100])
    _put(buf, 100, _octal(mode, 8))
    _put(buf, 108, _num(uid, 8, b256="uid" in forced))
    _put(buf, 116, _num(gid, 8, b256="gid" in forced))
    _put(buf, 124, _num(size, 12, b256="size" in forced))
    _put(buf, 136, _num(mtime, 12, b256="mtime" in forced))
    buf[156] = typeflag[0]
    _put(buf, 157, linkname[:100])
    _put(buf, 257, b"ustar  \0" if gnu else b"ustar\x0000")
    _put(buf, 265, b"root")
    _put(buf, 297, b"root")
    for offset, data in (extra or {}).items():
        _put(buf, offset, data)
    _put(buf, 148, b" " * 8)
    _put(buf, 148, f"{sum(buf):06o}".encode() + b"\0 ")
    return bytes(buf)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, data: bytes = b"", **kw: object) -> bytes:
    """A header and its padded data."""
    return header(name, size=len(data), **kw) + _padded(data)  # type: ignore[arg-type]


def pax_record(key: bytes, value: bytes) -> bytes:
    """``"<len> key=value\\n"``, where the length counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pax(records: Sequence[tuple[bytes, bytes]], name: bytes = b"PaxHeaders/entry") -> bytes:
    """An ``x`` extended header carrying ``records`` (in order; keys may repeat) for the next entry."""
    return member(name, b"".join(pax_record(k, v) for k, v in records), typeflag=b"x")


def gnu_long(kind: bytes, value: bytes) -> bytes:
    """A GNU ``L`` (long name) or ``K`` (long link name) header for the next entry."""
    return member(b"././@LongLink", value + b"\0", typeflag=kind, gnu=True)


def end_of_archive() -> bytes:
    return bytes(2 * BLOCK)


def tar(*members: bytes) -> bytes:
    return b"".join(members) + end_of_archive()


# -- sparse --------------------------------------------------------------------------------------------------


def _sparse_data(seed: int, fragments: Sequence[tuple[int, int]]) -> list[bytes]:
    return [bytes((seed * 31 + i * 7 + j) % 251 + 1 for j in range(length)) for i, (_, length) in
            enumerate(fragments)]


def sparse_content(realsize: int, fragments: Sequence[tuple[int, int]], chunks: Sequence[bytes]) -> bytes:
    """The expanded file: each chunk at its fragment's offset, zeros elsewhere."""
    out = bytearray(realsize)
    for (offset, length), data in zip(fragments, chunks, strict=True):
        out[offset : offset + length] = data[:length]
    return bytes(out)


def _sparse_area(entries: Sequence[tuple[int, int]], count: int) -> bytes:
    area = b"".join(_octal(o, 12) + _octal(n, 12) for o, n in entries)
    return area + bytes(24 * count - len(area))


def gnu_sparse(name: bytes, realsize: int, fragments: Sequence[tuple[int, int]], data: bytes,
               **kw: object) -> bytes:
    """An old GNU ``S`` entry: 4 map entries in the header, the rest in extension blocks of 21."""
    head, rest = list(fragments[:4]), list(fragments[4:])
    extra = {386: _sparse_area(head, 4), 482: b"\x01" if rest else b"\x00", 483: _octal(realsize, 12)}
    out = [header(name, typeflag=b"S", size=len(data), gnu=True, extra=extra, **kw)]  # type: ignore[arg-type]
    while rest:
        part, rest = rest[:21], rest[21:]
        out.append(_sparse_area(part, 21) + (b"\x01" if rest else b"\x00") + bytes(7))
    return b"".join(out) + _padded(data)


def pax_sparse(version: str, name: bytes, realsize: int, fragments: Sequence[tuple[int, int]], data: bytes,
               **kw: object) -> bytes:
    """A PAX sparse entry in GNU format ``version`` 0.0, 0.1 or 1.0 (as GNU tar writes them)."""
    count = str(len(fragments)).encode()
    size = str(realsize).encode()
    records: list[tuple[bytes, bytes]]
    if version == "0.0":
        records = [(b"GNU.sparse.size", size), (b"GNU.sparse.numblocks", count)]
        for offset, length in fragments:
            records += [(b"GNU.sparse.offset", str(offset).encode()), (b"GNU.sparse.numbytes", str(length).encode())]
        return pax(records) + member(name, data, **kw)
    if version == "0.1":
        flat = b",".join(f"{o},{n}".encode() for o, n in fragments)
        records = [(b"GNU.sparse.size", size), (b"GNU.sparse.numblocks", count), (b"GNU.sparse.name", name),
                   (b"GNU.sparse.map", flat)]
        return pax(records) + member(b"GNUSparseFile.0/" + name.rpartition(b"/")[2], data, **kw)
    if version == "1.0":
        records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", name),
                   (b"GNU.sparse.realsize", size)]
        lines = [count] + [str(v).encode() for o, n in fragments for v in (o, n)]
        sparse_map = _padded(b"\n".join(lines) + b"\n")
        return pax(records) + member(b"GNUSparseFile.0/" + name.rpartition(b"/")[2], sparse_map + data, **kw)
    raise ValueError(f"unknown sparse version {version!r}")


SPARSE_REALSIZE = 200_000
# Six fragments (two beyond the old GNU header's four: an extension block), a hole at the start and one at
# the end; the last, zero-length, marks the real size as GNU tar writes it. Block-aligned but for the last
# data fragment's length, as GNU tar writes them: its reader pads each fragment's data to a block, Go's does
# not, and on such maps the two agree.
SPARSE_FRAGMENTS: tuple[tuple[int, int], ...] = (
    (4096, 512), (10_240, 4096), (65_536, 512), (102_400, 20_480), (150_016, 1000), (SPARSE_REALSIZE, 0),
)
SPARSE_VERSIONS = ("gnu", "0.0", "0.1", "1.0")


def sparse_entry(version: str, name: bytes, seed: int) -> tuple[bytes, bytes]:
    """(tar members, expanded content) of one sparse file in ``version`` ("gnu" is the old ``S`` type)."""
    chunks = _sparse_data(seed, SPARSE_FRAGMENTS)
    data = b"".join(chunks)
    if version == "gnu":
        raw = gnu_sparse(name, SPARSE_REALSIZE, SPARSE_FRAGMENTS, data)
    else:
        raw = pax_sparse(version, name, SPARSE_REALSIZE, SPARSE_FRAGMENTS, data)
    return raw, sparse_content(SPARSE_REALSIZE, SPARSE_FRAGMENTS, chunks)


# -- the corner layers ---------------------------------------------------------------------------------------

LONG_DIR = b"names/" + b"long-directory-name-" * 6  # > 100 bytes: needs a GNU long name
LONG_TARGET = b"../" + b"t" * 150


def _dir(name: bytes, mode: int = 0o755, *, mtime: int = FIXED_MTIME, gnu: bool = False) -> bytes:
    return member(name.rstrip(b"/") + b"/", typeflag=b"5", mode=mode, mtime=mtime, gnu=gnu)


def _sym(name: bytes, target: bytes, *, gnu: bool = False) -> bytes:
    return member(name, typeflag=b"2", mode=0o777, linkname=target, gnu=gnu)


def _sparse_layer() -> bytes:
    parts = [_dir(b"sparse")]
    for seed, version in enumerate(SPARSE_VERSIONS):
        parts.append(sparse_entry(version, f"sparse/{version}".encode(), seed)[0])
    return tar(*parts)


def _names_layer() -> bytes:
    return tar(
        _dir(b"names"),
        gnu_long(b"L", LONG_DIR + b"/"), _dir(LONG_DIR[:100], gnu=True),
        gnu_long(b"L", LONG_DIR + b"/file"), member(LONG_DIR[:100], b"long name\n", gnu=True),
        gnu_long(b"K", LONG_TARGET), _sym(b"names/long-link", LONG_TARGET[:100], gnu=True),
        gnu_long(b"L", LONG_DIR + b"/link"), gnu_long(b"K", LONG_TARGET), _sym(b"x", b"x", gnu=True),
        pax([(b"path", NON_UTF8_NAME), (b"SCHILY.xattr.user.corner", XATTR_VALUE)]),
        member(b"names/placeholder", b"latin-1 name\n"),
        pax([(b"path", b"names/non-utf8-link"), (b"linkpath", NON_UTF8_TARGET)]),
        _sym(b"names/placeholder-link", b"placeholder"),
        member(b"names/base256", b"base-256 numbers\n", uid=BIG_ID, gid=BIG_ID, mtime=BIG_MTIME,
               b256=("size", "uid", "gid", "mtime"), gnu=True),
    )


def _order_layer() -> bytes:
    return tar(
        # A hardlink to a symlink links the symlink itself.
        _dir(b"links"), _sym(b"links/sym", b"../target-of-sym"), member(b"links/hl-to-sym", typeflag=b"1",
                                                                         linkname=b"links/sym"),
        # One path repeated within the layer: the last entry wins.
        _dir(b"rep"),
        member(b"rep/file-file", b"first\n"), member(b"rep/file-file", b"second, longer\n", mode=0o600),
        member(b"rep/file-dir", b"a file first\n"), _dir(b"rep/file-dir", mode=0o750),
        _dir(b"rep/dir-file"), member(b"rep/dir-file/child", b"goes with its dir\n"),
        member(b"rep/dir-file", b"then a file\n"),
        member(b"rep/file-symlink", b"a file first\n"), _sym(b"rep/file-symlink", b"file-file"),
        _sym(b"rep/symlink-dir", b"../links"), _dir(b"rep/symlink-dir", mode=0o700),
        # A directory entry after its children: the children stay, its metadata applies.
        member(b"late/a", b"a\n"), member(b"late/sub/b", b"b\n"), _dir(b"late", mode=0o711, mtime=FIXED_MTIME - 5),
        # lib64-style symlink climbing past the root: resolved through, it is clamped at the root.
        _dir(b"usr"), _dir(b"usr/lib"), _dir(b"usr/lib/x"), _dir(b"usr/lib64"),
        _sym(b"usr/lib64/x", b"../../../../usr/lib/x"),
        member(b"usr/lib64/x/file", b"through the climbing symlink\n"),
        member(b"usr/hardlink", typeflag=b"1", linkname=b"usr/lib64/x/file"),
    )


def corner_layers() -> list[bytes]:
    """The uncompressed layer tars of the corners image, in order (deterministic bytes)."""
    return [_sparse_layer(), _names_layer(), _order_layer()]


def gzip_multimember(data: bytes, parts: int = 4) -> bytes:
    """``data`` as ``parts`` concatenated gzip members of about equal size plus an empty one (as pigz and
    concatenated blobs give): gunzip reads it back whole. Deterministic (no name, mtime 0)."""
    step = max(1, -(-len(data) // parts))
    out = []
    for start in [*range(0, len(data), step), len(data)]:
        comp = zlib.compressobj(6, zlib.DEFLATED, 31)
        out.append(comp.compress(data[start : start + step]) + comp.flush())
    return b"".join(out)


def corner_blobs() -> list[bytes]:
    """The layers gzip-compressed: the first and last as multi-member streams, the middle as one member."""
    layers = corner_layers()
    one = zlib.compressobj(6, zlib.DEFLATED, 31)
    return [gzip_multimember(layers[0]), one.compress(layers[1]) + one.flush(), gzip_multimember(layers[2], 3)]


def corner_image(platform: str = "linux/amd64") -> SampleImage:
    """An OCI image of ``corner_blobs()`` (the multi-member gzip ones as they are)."""
    base = build_image(corner_layers(), platform=platform)  # its config depends on the diffIDs only
    layers = tuple(Blob(media_type=mt.OCI_LAYER_GZIP, data=blob) for blob in corner_blobs())
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": base.config.descriptor.to_dict(),
           "layers": [layer.descriptor.to_dict() for layer in layers]}
    manifest = Blob(media_type=mt.OCI_MANIFEST, data=json.dumps(doc, indent=2).encode(), platform=base.platform)
    return dataclasses.replace(base, manifest=manifest, layers=layers)


def _file(data: bytes, mode: int = 0o644) -> Node:
    return ("file", mode, len(data), hashlib.sha256(data).hexdigest())


def _link(target: bytes) -> Node:
    return ("symlink", 0o777, 0, os.fsdecode(target))


def corner_tree() -> dict[str, Node]:
    """What the corner layers unpack to (``cargohold rootfs`` as root), independent of the snapshotter.

    Paths are ``/``-separated and root-relative; a non-UTF-8 name is the ``os.fsdecode`` of its bytes."""
    dirs = {"sparse": 0o755, "names": 0o755, os.fsdecode(LONG_DIR): 0o755, "links": 0o755, "rep": 0o755,
            "rep/file-dir": 0o750, "rep/symlink-dir": 0o700, "late": 0o711, "late/sub": 0o755, "usr": 0o755,
            "usr/lib": 0o755, "usr/lib/x": 0o755, "usr/lib64": 0o755}
    tree: dict[str, Node] = {path: ("dir", mode, 0, "") for path, mode in dirs.items()}
    for seed, version in enumerate(SPARSE_VERSIONS):
        tree[f"sparse/{version}"] = _file(sparse_entry(version, b"", seed)[1])
    long_dir = os.fsdecode(LONG_DIR)
    tree.update({
        f"{long_dir}/file": _file(b"long name\n"),
        "names/long-link": _link(LONG_TARGET),
        f"{long_dir}/link": _link(LONG_TARGET),
        os.fsdecode(NON_UTF8_NAME): _file(b"latin-1 name\n"),
        "names/non-utf8-link": _link(NON_UTF8_TARGET),
        "names/base256": _file(b"base-256 numbers\n"),
        "links/sym": _link(b"../target-of-sym"),
        "links/hl-to-sym": _link(b"../target-of-sym"),
        "rep/file-file": _file(b"second, longer\n", 0o600),
        "rep/dir-file": _file(b"then a file\n"),
        "rep/file-symlink": _link(b"file-file"),
        "late/a": _file(b"a\n"),
        "late/sub/b": _file(b"b\n"),
        "usr/lib64/x": _link(b"../../../../usr/lib/x"),
        "usr/lib/x/file": _file(b"through the climbing symlink\n"),
        "usr/hardlink": _file(b"through the climbing symlink\n"),
    })
    return dict(sorted(tree.items()))


def tree_listing(root: Path | str) -> dict[str, Node]:
    """A real directory in ``corner_tree``'s shape (nothing followed; other kinds listed with empty payload)."""
    out: dict[str, Node] = {}
    top = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top).replace(os.sep, "/")
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0o777, 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), 0, "")
            else:
                out[rel] = ("other", stat.S_IMODE(st.st_mode), 0, "")
    return dict(sorted(out.items()))
