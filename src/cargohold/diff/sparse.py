"""Sparse tar entries, expanded as Go's archive/tar reader does: the maps of GNU's old ``S`` type and of the
three PAX encodings (0.0 ``GNU.sparse.offset``/``numbytes`` pairs, 0.1 ``GNU.sparse.map``, 1.0 a decimal map at
the start of the data), their validation, and writing the file with holes.

Kept apart from ``tarstream`` so the common entry pays nothing for it. Every map is bounded like Go's (1 MiB,
its ``maxSpecialFileSize``): a crafted layer cannot make the reader hold more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cargohold.errors import InvalidArgumentError

BLOCK = 512
MAX_SPECIAL_SIZE = 1 << 20  # Go's maxSpecialFileSize: the cap on long names, PAX headers and sparse maps
# PAX records the reader keeps in order (they repeat, one pair per fragment): joined into GNU.sparse.map.
PAX_SPARSE_OFFSET = b"GNU.sparse.offset"
PAX_SPARSE_NUMBYTES = b"GNU.sparse.numbytes"

# take(n, what): the next n bytes of the tar stream (an error naming ``what`` if it ends first).
Take = Callable[[int, str], bytes]
# num(field, what): a numeric header field (octal or base-256).
Num = Callable[[bytes, str], int]


@dataclass(frozen=True, slots=True, kw_only=True)
class SparseMap:
    """Where a sparse entry's stored data goes: ``fragments`` (offset, length), ascending and disjoint, in a
    file of ``realsize`` bytes; everything else is a hole (zeros)."""

    realsize: int
    fragments: tuple[tuple[int, int], ...]


def _bad(name: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"tar entry {name!r}: sparse map {why}")


def validated(name: str, fragments: list[tuple[int, int]], realsize: int, stored: int) -> SparseMap:
    """The map if it is sound: fragments ascending, non-overlapping, inside ``realsize``, and their lengths
    adding up to the ``stored`` data bytes; InvalidArgumentError naming the entry otherwise."""
    if realsize < 0:
        raise _bad(name, f"has a negative real size {realsize}")
    end = 0
    total = 0
    for offset, length in fragments:
        if offset < 0 or length < 0:
            raise _bad(name, f"has a negative fragment {offset}+{length}")
        if offset < end:
            raise _bad(name, f"fragment at {offset} overlaps or precedes the one ending at {end}")
        end = offset + length
        if end > realsize:
            raise _bad(name, f"fragment {offset}+{length} ends past the real size {realsize}")
        total += length
    if total != stored:
        raise _bad(name, f"covers {total} data bytes but the entry stores {stored}")
    return SparseMap(realsize=realsize, fragments=tuple(fragments))


def _pairs(name: str, numbers: list[int]) -> list[tuple[int, int]]:
    if len(numbers) % 2:
        raise _bad(name, "has an odd number of values")
    return list(zip(numbers[0::2], numbers[1::2], strict=True))


# -- old GNU ('S' typeflag) ----------------------------------------------------------------------------------


def _old_gnu_area(area: bytes, count: int, num: Num, out: list[int]) -> None:
    for i in range(count):
        field = area[i * 24 : i * 24 + 24]
        if field[0] == 0:  # as GNU, BSD and Go tar: an empty offset ends the area's list
            return
        out.append(num(field[:12], "sparse offset"))
        out.append(num(field[12:], "sparse numbytes"))


def old_gnu(name: str, block: bytes, stored: int, take: Take, num: Num) -> SparseMap:
    """The map of an old GNU sparse header: 4 entries at offset 386, ``isextended`` at 482, the real size at
    483, then extension blocks of 21 entries (``isextended`` at 504) before the data."""
    numbers: list[int] = []
    _old_gnu_area(block[386:482], 4, num, numbers)
    realsize = num(block[483:495], "sparse realsize")
    extended = block[482]
    read = 0
    while extended:
        read += BLOCK
        if read > MAX_SPECIAL_SIZE:
            raise _bad(name, f"extension blocks exceed the {MAX_SPECIAL_SIZE} byte limit")
        ext = take(BLOCK, f"the sparse map of {name!r}")
        _old_gnu_area(ext[:504], 21, num, numbers)
        extended = ext[504]
    return validated(name, _pairs(name, numbers), realsize, stored)


# -- PAX (GNU.sparse.* records) ------------------------------------------------------------------------------


def _decimal(name: str, value: bytes | str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _bad(name, f"has a bad {what} {value!r}") from None


def _map_1x0(name: str, take: Take) -> tuple[list[int], int]:
    """The 1.0 map at the start of the data: decimal lines (count, then offset/length pairs), padded to a
    block. Returns the numbers and the bytes read (whole blocks)."""
    buf = bytearray()
    lines = 0
    want = 1
    count = -1
    while lines < want:
        if len(buf) + BLOCK > MAX_SPECIAL_SIZE:
            raise _bad(name, f"exceeds the {MAX_SPECIAL_SIZE} byte limit")
        blk = take(BLOCK, f"the sparse map of {name!r}")
        buf += blk
        lines += blk.count(b"\n")
        if count < 0 and lines >= 1:
            count = _decimal(name, bytes(buf[: buf.index(b"\n")]), "fragment count")
            if count < 0:  # a huge count is bounded by the size limit above
                raise _bad(name, f"has a bad fragment count {count}")
            want = 1 + 2 * count
    tokens = bytes(buf).split(b"\n", want)[1:want]
    return [_decimal(name, t, "value") for t in tokens], len(buf)


def pax_version(pax: dict[str, bytes]) -> str | None:
    """"1.0" or "0.x" when an entry's ``GNU.sparse.*`` records describe a sparse file Go would recognise."""
    major = pax.get("GNU.sparse.major", b"")
    minor = pax.get("GNU.sparse.minor", b"")
    if major == b"1" and minor == b"0":
        return "1.0"
    if major == b"0" and minor in (b"0", b"1"):
        return "0.x"
    if major or minor:
        return None  # an unknown version: Go reads such an entry as a plain file
    if pax.get("GNU.sparse.map"):
        return "0.x"  # 0.0 and 0.1 wrote no version records
    return None


def from_pax(name: str, pax: dict[str, bytes], size: int, take: Take) -> tuple[SparseMap, str, int] | None:
    """The map, the entry's real name and the bytes of data the map took (1.0), for a PAX entry with
    ``GNU.sparse.*`` records; None when they do not describe a sparse file (see ``pax_version``)."""
    version = pax_version(pax)
    if version is None:
        return None
    is1x0 = version == "1.0"
    real_name = pax.get("GNU.sparse.name")
    if real_name:
        name = real_name.decode("utf-8", "surrogateescape")
    raw_size = pax.get("GNU.sparse.size") or pax.get("GNU.sparse.realsize")
    realsize = size if raw_size is None else _decimal(name, raw_size, "real size")
    used = 0
    if is1x0:
        numbers, used = _map_1x0(name, take)
    else:
        raw_map = pax.get("GNU.sparse.map", b"")
        numbers = [_decimal(name, v, "value") for v in raw_map.split(b",")] if raw_map else []
        blocks = pax.get("GNU.sparse.numblocks")
        if blocks is not None and _decimal(name, blocks, "numblocks") * 2 != len(numbers):
            raise _bad(name, f"has {len(numbers)} values for {blocks.decode('ascii', 'replace')} fragments")
    if used > size:
        raise _bad(name, f"is longer than the entry's {size} data bytes")
    return validated(name, _pairs(name, numbers), realsize, size - used), name, used


# -- writing -------------------------------------------------------------------------------------------------


def write(fd: int, smap: SparseMap, chunks: Iterator[memoryview], name: str) -> None:
    """Write the stored data (``chunks``) at the map's offsets and give the file its real size; the holes
    stay holes."""
    view = memoryview(b"")
    for offset, length in smap.fragments:
        while length:
            if not view:
                nxt = next(chunks, None)
                if nxt is None:
                    raise InvalidArgumentError(f"tar entry {name!r}: sparse data ends before its map does")
                view = nxt
            n = min(length, len(view))
            done = os.pwrite(fd, view[:n], offset)
            view = view[done:]
            offset += done
            length -= done
    os.ftruncate(fd, smap.realsize)
