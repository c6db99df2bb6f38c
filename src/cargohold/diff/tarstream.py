"""A streaming tar reader written for extraction speed and exact names.

Reads ustar, GNU (long names ``L``/``K``) and PAX (``x``; ``g`` is ignored, as containerd does) headers from
any ``read(n)`` source, one pass, no seeking. Names are returned exactly as stored — never cleaned — so the
extractor can judge them (non-UTF-8 bytes survive as surrogate escapes: ``os.fsencode`` gives them back).
File data is handed out as memoryviews into the read buffer: a small file costs no copy. Sparse entries (GNU
``S`` and the PAX ``GNU.sparse.*`` encodings) come with their map (``diff.sparse``), as Go's reader gives them;
multi-volume entries are refused. Long names, long link names and PAX headers are capped at 1 MiB each, as in
Go, so a crafted layer cannot exhaust memory.

Header-only types (links, devices, dirs, FIFOs) carry no data whatever their size field says (Go's reader does
the same; some writers put the target's size on hardlinks).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from cargohold.diff import sparse
from cargohold.diff.sparse import MAX_SPECIAL_SIZE, PAX_SPARSE_NUMBYTES, PAX_SPARSE_OFFSET, SparseMap
from cargohold.errors import InvalidArgumentError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_READ_SIZE = 1 << 20
# One unpack of a header block: name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic,
# (version, uname, gname skipped), devmajor, devminor, prefix.
_HEADER = struct.Struct("100s8s8s8s12s12s8sB100s6s66x8s8s155s")
_USTAR = b"ustar\x00"

# Entry kinds (the tar typeflag, normalised: '\0' and '7' become '0').
REG = "0"
LNK = "1"
SYM = "2"
CHR = "3"
BLK = "4"
DIR = "5"
FIFO = "6"
_HEADER_ONLY = frozenset("123456")
_SCHILY_XATTR = "SCHILY.xattr."
_SPECIAL = {"x": "PAX header", "X": "PAX header", "g": "global PAX header", "L": "GNU long name",
            "K": "GNU long link name"}


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


# Not frozen: one is built per tar entry and frozen dataclasses cost a setattr call per field.
@dataclass(slots=True)
class TarEntry:
    """One tar member. ``name``/``linkname`` are as stored (PAX overrides applied), not cleaned."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int | None
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] | None
    # Sparse entries only: where the stored data goes (``size`` is then the real size of the file).
    sparse: SparseMap | None = None


def _nts(field: bytes) -> bytes:
    end = field.find(0)
    return field if end < 0 else field[:end]


def _num(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit of the first byte is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:  # negative
            value -= 1 << (8 * (len(field) - 1))
        return value
    try:
        return int(field.partition(b"\0")[0], 8)  # int() itself skips surrounding spaces
    except ValueError:
        if not field.partition(b"\0")[0].strip(b" "):
            return 0
        raise InvalidArgumentError(f"tar header: bad {what} field {bytes(field)!r}") from None


def _checksum_ok(block: bytes | memoryview, stored: int) -> bool:
    """Whether ``stored`` (the header's chksum field) is the sum of the block's bytes, the checksum field
    counted as spaces."""
    # adler32's low half is 1 + the byte sum mod 65521; 256 bytes sum to at most 65280, so each half's sum is
    # exact and computed in C.
    total = ((zlib.adler32(block[:256]) & 0xFFFF) - 1 + (zlib.adler32(block[256:]) & 0xFFFF) - 1
             - ((zlib.adler32(block[148:156]) & 0xFFFF) - 1) + 8 * 32)
    if total == stored:
        return True
    # Some old writers summed signed chars.
    signed = total - 256 * sum(1 for i, b in enumerate(bytes(block)) if b >= 0x80 and not 148 <= i < 156)
    return signed == stored


def _parse_time_ns(value: str, key: str) -> int:
    sign = -1 if value.startswith("-") else 1
    whole, _, frac = value.lstrip("-").partition(".")
    try:
        return sign * (int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9]))
    except ValueError:
        raise InvalidArgumentError(f"tar PAX header: bad {key} {value!r}") from None


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records ``"<len> <key>=<value>\\n"``; values stay bytes (xattr values are binary)."""
    out: dict[str, bytes] = {}
    sparse_map: list[bytes] | None = None
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos, pos + 24)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        end = pos + length
        if length <= 0 or end > n or data[end - 1] != 0x0A:
            raise InvalidArgumentError(f"tar PAX header: malformed record at byte {pos}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise InvalidArgumentError(f"tar PAX header: record without '=' at byte {pos}")
        if key == PAX_SPARSE_OFFSET or key == PAX_SPARSE_NUMBYTES:
            # Sparse format 0.0 repeats these, one pair per fragment: kept in order, as Go does.
            if sparse_map is None:
                sparse_map = []
            if (key == PAX_SPARSE_OFFSET) != (len(sparse_map) % 2 == 0) or b"," in value:
                raise InvalidArgumentError(f"tar PAX header: GNU.sparse.offset/numbytes out of order at byte {pos}")
            sparse_map.append(value)
        else:
            out[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    if sparse_map is not None:
        out["GNU.sparse.map"] = b",".join(sparse_map)
    return out


_MAX_ID = 2**32 - 2
_MAX_DEV = 2**32 - 1
_MAX_SIZE = 2**62
_MAX_TIME_NS = 2**63 - 1  # nanoseconds: what utime (a 64-bit timespec in ns) accepts


class TarReader:
    """Iterate ``entries()``; for the current entry read its data with ``read_small()`` or ``chunks()``.

    Data not consumed is skipped when the next entry is asked for. Iteration stops at the end-of-archive
    marker (or at a clean end of input between entries); the bytes after it are left unread in the source, so
    the caller can drain them (they count in a diffID).
    """

    def __init__(self, src: Readable) -> None:
        self._src = src
        self._view = memoryview(b"")  # the bytes being parsed, from _pos on
        self._pos = 0
        self._rest: memoryview | None = None  # the part of the last chunk read beyond _view, next in line
        self._left = 0  # data bytes of the current entry not yet consumed
        self._pad = 0  # padding after them

    # -- buffer --------------------------------------------------------------------------------------------

    def _need(self, n: int) -> bool:
        """Make ``n`` bytes available at ``_pos``; False if the input ends first.

        Chunks are used in place; only a request straddling two chunks is copied, and only its own bytes:
        the rest of the new chunk waits in ``_rest``."""
        avail = len(self._view) - self._pos
        if avail >= n:
            return True
        parts: list[memoryview | bytes] = [self._view[self._pos :]] if avail else []
        got = avail
        while got < n:
            if self._rest is not None:
                chunk: memoryview | bytes = self._rest
                self._rest = None
            else:
                chunk = self._src.read(max(_READ_SIZE, n - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        if len(parts) == 1:
            self._view = memoryview(parts[0])
        elif parts:
            extra = got - n
            if extra > 0:
                last = memoryview(parts[-1])
                parts[-1] = last[: len(last) - extra]
                self._rest = last[len(last) - extra :]
            self._view = memoryview(b"".join(parts))
        else:
            self._view = memoryview(b"")
        self._pos = 0
        return got >= n

    def _skip(self, n: int) -> None:
        while n:
            avail = len(self._view) - self._pos
            if avail >= n:
                self._pos += n
                return
            n -= avail
            self._pos = len(self._view)
            if not self._need(min(n, _READ_SIZE)):
                raise InvalidArgumentError("tar stream truncated inside an entry's data")

    def _take(self, n: int, what: str) -> bytes:
        if not self._need(n):
            raise InvalidArgumentError(f"tar stream truncated inside {what}")
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return out

    # -- data of the current entry --------------------------------------------------------------------------

    def read_small(self) -> memoryview:
        """All of the current entry's data in one view (valid until the next read). For sizes up to ~1 MiB."""
        n = self._left
        if len(self._view) - self._pos < n and not self._need(n):
            raise InvalidArgumentError("tar stream truncated inside an entry's data")
        view = self._view[self._pos : self._pos + n]
        self._pos += n
        self._left = 0
        return view

    def chunks(self) -> Iterator[memoryview]:
        """The current entry's data as a sequence of views, each valid until the next one is asked for."""
        while self._left:
            if self._pos >= len(self._view) and not self._need(1):
                raise InvalidArgumentError("tar stream truncated inside an entry's data")
            n = min(self._left, len(self._view) - self._pos)
            view = self._view[self._pos : self._pos + n]
            self._pos += n
            self._left -= n
            yield view

    # -- headers -------------------------------------------------------------------------------------------

    def entries(self) -> Iterator[TarEntry]:
        pax: dict[str, bytes] | None = None
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            if self._left or self._pad:
                n = self._left + self._pad
                if len(self._view) - self._pos >= n:
                    self._pos += n  # the common case, inline: padding (or unread data) in the buffer
                else:
                    self._skip(n)
                self._left = self._pad = 0
            if len(self._view) - self._pos < BLOCK and not self._need(BLOCK):
                if len(self._view) - self._pos:
                    raise InvalidArgumentError("tar stream truncated inside a header")
                if pax is not None or long_name is not None or long_link is not None:
                    raise InvalidArgumentError("tar stream ended after an extended header without its entry")
                return
            view, pos = self._view, self._pos
            self._pos = pos + BLOCK
            hdr = _HEADER.unpack_from(view, pos)
            block = view[pos : pos + BLOCK]
            try:
                stored = int(hdr[6].partition(b"\0")[0], 8)
            except ValueError:
                if block == _ZERO_BLOCK:
                    return  # end of archive (the second zero block and anything after are the caller's)
                stored = _num(hdr[6], "chksum")
            if not _checksum_ok(block, stored):
                raise InvalidArgumentError(f"tar header checksum mismatch (entry {_nts(hdr[0])!r})")
            flag = chr(hdr[7])
            try:
                size = int(hdr[4].partition(b"\0")[0], 8)
            except ValueError:
                size = _num(hdr[4], "size")
            if size < 0:
                raise InvalidArgumentError(f"tar header: negative size for {_nts(hdr[0])!r}")
            if flag in "xXgLK":
                if size > MAX_SPECIAL_SIZE:
                    who = _nts(hdr[0]).decode("utf-8", "surrogateescape")
                    raise InvalidArgumentError(f"tar entry {who!r}: {_SPECIAL[flag]} of {size} bytes exceeds the "
                                               f"{MAX_SPECIAL_SIZE} byte (1 MiB) limit")
                data = self._take(size, "an extended header")
                self._skip(-size % BLOCK)
                if flag == "x" or flag == "X":
                    pax = _parse_pax(data) if pax is None else {**pax, **_parse_pax(data)}
                elif flag == "L":
                    long_name = _nts(data)
                elif flag == "K":
                    long_link = _nts(data)
                continue  # 'g': global PAX headers are ignored, as containerd does
            entry = self._entry(hdr, block, flag, size, pax, long_name, long_link)
            pax = long_name = long_link = None
            if entry is None:
                continue
            yield entry

    def _entry(self, hdr: tuple[bytes, ...], block: memoryview, flag: str, size: int,
               pax: dict[str, bytes] | None, long_name: bytes | None, long_link: bytes | None
               ) -> TarEntry | None:
        f_name, f_mode, f_uid, f_gid, _, f_mtime, _, _, f_link, magic, f_major, f_minor, f_prefix = hdr
        if long_name is not None:
            raw_name = long_name
        else:
            raw_name = f_name.partition(b"\0")[0]
            if magic == _USTAR:
                prefix = f_prefix.partition(b"\0")[0]
                if prefix:
                    raw_name = prefix + b"/" + raw_name
        name = raw_name.decode("utf-8", "surrogateescape")
        raw_link = long_link if long_link is not None else f_link.partition(b"\0")[0]
        linkname = raw_link.decode("utf-8", "surrogateescape")
        try:  # octal text, the common case; anything else (base-256, blanks, errors) goes through _num
            mode = int(f_mode.partition(b"\0")[0], 8) & 0o7777
            uid = int(f_uid.partition(b"\0")[0], 8)
            gid = int(f_gid.partition(b"\0")[0], 8)
            mtime_ns = int(f_mtime.partition(b"\0")[0], 8) * 1_000_000_000
        except ValueError:
            mode = _num(f_mode, "mode") & 0o7777
            uid = _num(f_uid, "uid")
            gid = _num(f_gid, "gid")
            mtime_ns = _num(f_mtime, "mtime") * 1_000_000_000
        atime_ns: int | None = None
        devmajor = devminor = 0
        if flag == CHR or flag == BLK:
            devmajor = _num(f_major, "devmajor")
            devminor = _num(f_minor, "devminor")
        xattrs: dict[str, bytes] | None = None
        sparse_pax = False
        if pax:
            for key, value in pax.items():
                if key.startswith(_SCHILY_XATTR):
                    if xattrs is None:
                        xattrs = {}
                    xattrs[key[len(_SCHILY_XATTR):]] = value
                elif key == "path":
                    name = value.decode("utf-8", "surrogateescape")
                elif key == "linkpath":
                    linkname = value.decode("utf-8", "surrogateescape")
                elif key == "size":
                    size = _pax_int(value, key)
                elif key == "uid":
                    uid = _pax_int(value, key)
                elif key == "gid":
                    gid = _pax_int(value, key)
                elif key == "mtime":
                    mtime_ns = _parse_time_ns(value.decode("ascii", "replace"), key)
                elif key == "atime":
                    atime_ns = _parse_time_ns(value.decode("ascii", "replace"), key)
                elif key.startswith("GNU.sparse."):
                    sparse_pax = True
        if "\0" in name or "\0" in linkname:
            raise InvalidArgumentError(f"tar entry {name!r}: NUL byte in a name")
        if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID and 0 <= size <= _MAX_SIZE
                and 0 <= devmajor <= _MAX_DEV and 0 <= devminor <= _MAX_DEV
                and -_MAX_TIME_NS <= mtime_ns <= _MAX_TIME_NS
                and (atime_ns is None or -_MAX_TIME_NS <= atime_ns <= _MAX_TIME_NS)):
            _out_of_range(name, uid, gid, size, devmajor, devminor, mtime_ns, atime_ns)
        if flag in _HEADER_ONLY:
            size = 0
        if flag == "\0" or flag == "7":
            flag = DIR if name.endswith("/") and flag == "\0" else REG
        elif flag == "D":  # GNU dumpdir: a directory followed by a listing we do not need
            flag = DIR
        elif flag == "V":  # GNU volume label: not a file
            self._left, self._pad = size, -size % BLOCK
            return None
        elif flag == "S":
            smap = sparse.old_gnu(name, bytes(block), size, self._take, _num)
            return self._sparse_entry(smap, size, 0, name, mode, uid, gid, mtime_ns, atime_ns, xattrs)
        elif flag not in _HEADER_ONLY and flag != REG:
            what = {"S": "GNU sparse", "M": "multi-volume"}.get(flag, f"type {flag!r}")
            raise InvalidArgumentError(f"tar entry {name!r}: unsupported {what} entry")
        if size < 0:
            raise InvalidArgumentError(f"tar entry {name!r}: negative size")
        if sparse_pax:
            assert pax is not None
            if flag != REG:
                if sparse.pax_version(pax) is not None:
                    raise InvalidArgumentError(f"tar entry {name!r}: sparse map on a non-regular entry")
            elif (found := sparse.from_pax(name, pax, size, self._take)) is not None:
                smap, name, used = found
                return self._sparse_entry(smap, size, used, name, mode, uid, gid, mtime_ns, atime_ns, xattrs)
        self._left, self._pad = size, -size % BLOCK
        # Positional: this runs once per entry and keywords cost more.
        return TarEntry(name, flag, mode, uid, gid, size, mtime_ns, atime_ns, linkname, devmajor, devminor, xattrs)


    def _sparse_entry(self, smap: SparseMap, size: int, used: int, name: str, mode: int, uid: int, gid: int,
                      mtime_ns: int, atime_ns: int | None, xattrs: dict[str, bytes] | None) -> TarEntry:
        # ``size`` data bytes follow the header, ``used`` of them (a 1.0 map) already read.
        if "\0" in name:
            raise InvalidArgumentError(f"tar entry {name!r}: NUL byte in a name")
        self._left, self._pad = size - used, -size % BLOCK
        return TarEntry(name=name, kind=REG, mode=mode, uid=uid, gid=gid, size=smap.realsize, mtime_ns=mtime_ns,
                        atime_ns=atime_ns, linkname="", devmajor=0, devminor=0, xattrs=xattrs, sparse=smap)


def _out_of_range(name: str, uid: int, gid: int, size: int, devmajor: int, devminor: int, mtime_ns: int,
                  atime_ns: int | None) -> None:
    """Raise for the first number the kernel cannot take (negative base-256 ids, absurd times): bad input,
    not OverflowError from chown/utime/makedev later. An id of 2**32-1 means "unchanged" to chown."""
    for what, number, top in (("uid", uid, _MAX_ID), ("gid", gid, _MAX_ID), ("size", size, _MAX_SIZE),
                              ("devmajor", devmajor, _MAX_DEV), ("devminor", devminor, _MAX_DEV)):
        if not 0 <= number <= top:
            raise InvalidArgumentError(f"tar entry {name!r}: {what} {number} out of range")
    for what, ns in (("mtime", mtime_ns), ("atime", atime_ns or 0)):
        if not -_MAX_TIME_NS <= ns <= _MAX_TIME_NS:
            raise InvalidArgumentError(f"tar entry {name!r}: {what} out of range")


def _pax_int(value: bytes, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(f"tar PAX header: bad {key} {value!r}") from None
