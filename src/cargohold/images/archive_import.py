"""Read image archives into a content store, in one sequential pass (stdin is not seekable).

Plain, gzip or zstd tars (detected by magic bytes) holding an OCI layout, a ``docker save`` archive
(``manifest.json`` with ``<id>/layer.tar`` and ``<id>.json``), or both (newer docker: ``index.json`` wins).
Each ``blobs/<alg>/<hex>`` entry streams into an ingest and is committed only when its bytes hash to the
digest its path names; one already stored is read through and checked all the same. Other large entries
(docker layer tars) stream into the store under the digest they hash to, except a layer tar some stored
compressed blob is labelled ``containerd.io/uncompressed`` with: that blob is reused and the tar discarded.
Small JSON entries stay in memory. Nothing here records an image: the caller does, once all is verified.

Entry names are never host paths: nothing is extracted, blobs are stored by digest. Names are archive paths
(``./a//b`` is ``a/b``); an absolute name or one whose ``..`` climbs out of the archive is refused, naming the
entry. Symlinks and hardlinks (skopeo's ``<id>/layer.tar -> ../<diffid>.tar``) are followed inside the
archive only; an absolute symlink target starts at the archive's root, as in a chroot.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import secrets
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cargohold.content.store import ContentStore
from cargohold.diff import paths
from cargohold.diff.compression import Compression, decompress_stream, detect_compression
from cargohold.errors import (
    AlreadyExistsError,
    CargoholdError,
    DigestMismatchError,
    InvalidArgumentError,
    NotFoundError,
    UnsafePathError,
)
from cargohold.events import Event, EventSink, discard
from cargohold.images.archive import (
    DOCKER_MANIFEST_FILE,
    INDEX_FILE,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
)
from cargohold.metadata.labels import UNCOMPRESSED
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest, Verifier

CHUNK = 1 << 20
# What reading a broken stream raises: tarfile's errors, I/O errors, and our decompressors' InvalidArgumentError.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, InvalidArgumentError)
SMALL_ENTRY = 1 << 20  # non-blob entries up to this size (configs, v1 json) are kept in memory...
MAX_IN_MEMORY = 64 << 20  # ...until they add up to this much; then they go to the store like layer tars
MAX_JSON = 16 << 20
_BLOB_PATH = re.compile(r"^blobs/([a-z0-9]+)/([a-f0-9]+)$")
_MEMORY_FILES = frozenset({OCI_LAYOUT_FILE, INDEX_FILE, DOCKER_MANIFEST_FILE, "repositories"})


@dataclass(slots=True, kw_only=True)
class Entry:
    """A regular file of the archive: kept in memory (``data``), or hashed to ``digest`` and stored under it,
    unless a stored compressed blob holds these bytes uncompressed (``reused``: the file itself not stored)."""

    name: str
    size: int
    data: bytes | None = None
    digest: Digest | None = None
    reused: Descriptor | None = None


@dataclass(slots=True, kw_only=True)
class Contents:
    """Everything one pass over the archive found."""

    entries: dict[str, Entry] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # link entry -> the archive path it points at
    committed: list[Digest] = field(default_factory=list)
    present: list[Digest] = field(default_factory=list)
    reused: list[Digest] = field(default_factory=list)
    in_memory: int = 0  # bytes of the small entries kept in ``entries``

    def lookup(self, name: str) -> Entry:
        """The regular file at ``name``, following symlinks and hardlinks (of the file or of a directory on
        its way) inside the archive. NotFoundError names the path."""
        path = clean_name(name)
        for _ in range(paths.MAX_SYMLINKS):
            entry = self.entries.get(path)
            if entry is not None:
                return entry
            parts = path.split("/")
            for i in range(1, len(parts) + 1):
                target = self.links.get("/".join(parts[:i]))
                if target is not None:
                    path = "/".join(p for p in (target, *parts[i:]) if p)
                    break
            else:
                raise NotFoundError(f"archive entry {name}: not in the archive")
        raise InvalidArgumentError(f"archive entry {name}: more than {paths.MAX_SYMLINKS} links on its way")

    def json(self, name: str) -> Any:
        entry = self.entries.get(name)
        if entry is None or entry.data is None:
            return None
        try:
            return json.loads(entry.data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"archive entry {name}: invalid JSON: {exc}") from None


def clean_name(name: str) -> str:
    """An archive name as an archive path (``./a//b`` is ``a/b``); UnsafePathError for an absolute name or
    one whose ``..`` climbs out of the archive."""
    try:
        return paths.clean_name(name)
    except UnsafePathError:
        raise UnsafePathError(f"archive entry {name!r}: refused: an absolute name, or '..' out of the archive"
                              ) from None


def _link_target(name: str, member: tarfile.TarInfo) -> str:
    """The archive path a link entry points at: a hardlink's target is an archive name; a symlink's is
    relative to its directory, or to the archive's root when absolute. Out of the archive is refused."""
    target = member.linkname
    if member.issym():
        target = posixpath.join("" if target.startswith("/") else posixpath.dirname(name), target.lstrip("/"))
    try:
        return paths.clean_name(target)
    except UnsafePathError:
        raise UnsafePathError(f"archive entry {name}: link target {member.linkname!r} leads out of the archive"
                              ) from None


def read_archive(store: ContentStore, source: BinaryIO, *, where: str = "archive",
                 on_event: EventSink = discard) -> Contents:
    """Read the whole archive once, ingesting blobs as they stream by. Errors name ``where`` or the entry
    (and digest)."""
    contents = Contents()
    previous = ""
    try:
        stream = decompress_stream(source)
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK)  # type: ignore[call-overload]
    except _READ_ERRORS as exc:
        raise InvalidArgumentError(f"{where}: not a readable tar archive: {exc}") from None
    with tar:
        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except _READ_ERRORS as exc:
                at = f"after entry {previous}" if previous else "at its start"
                raise InvalidArgumentError(f"{where}: truncated or unreadable {at}: {exc}") from None
            name = previous = clean_name(member.name)
            if member.issym() or member.islnk():
                contents.links[name] = _link_target(name, member)
            elif member.isreg():
                reader = tar.extractfile(member)
                assert reader is not None
                _read_entry(store, contents, name, member.size, reader, on_event)
    if not contents.entries:
        raise InvalidArgumentError(f"{where}: no files in it (empty, or not a tar archive)")
    return contents


def _read_entry(store: ContentStore, contents: Contents, name: str, size: int, reader: BinaryIO,
                on_event: EventSink) -> None:
    match = _BLOB_PATH.match(name)
    if match is not None:
        try:
            digest = Digest(match.group(1), match.group(2))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"archive entry {name}: {exc}") from None
        new = ingest(store, reader, name=name, size=size, expected=digest, on_event=on_event)
        (contents.committed if new else contents.present).append(digest)
        contents.entries[name] = Entry(name=name, size=size, digest=digest)
        return
    small = size <= SMALL_ENTRY and not name.endswith(".tar") and contents.in_memory + size <= MAX_IN_MEMORY
    if name in _MEMORY_FILES or small:
        if size > MAX_JSON:
            raise InvalidArgumentError(f"archive entry {name}: {size} bytes is too large for a metadata file")
        contents.entries[name] = Entry(name=name, size=size, data=b"".join(c for _, c in _chunks(reader, size, name)))
        contents.in_memory += size
        return
    # A docker layer tar (or another large file): stored under the digest it hashes to, unless a stored
    # compressed blob already holds these uncompressed bytes.
    digest, new, reused = ingest_unknown(store, reader, name=name, size=size, on_event=on_event)
    contents.entries[name] = Entry(name=name, size=size, digest=digest, reused=reused)
    if reused is not None:
        contents.reused.append(digest)
    elif new:
        contents.committed.append(digest)
    else:
        contents.present.append(digest)


def _chunks(reader: BinaryIO, size: int, name: str, digest: Digest | None = None) -> Iterator[tuple[int, bytes]]:
    """The entry's bytes in chunks, with the count so far; a short or broken read names the entry."""
    what = f"archive entry {name}" + (f" ({digest})" if digest is not None else "")
    done = 0
    while done < size:
        try:
            chunk = reader.read(min(CHUNK, size - done))
        except _READ_ERRORS as exc:
            raise InvalidArgumentError(f"{what}: truncated or unreadable: {exc}") from None
        if not chunk:
            raise InvalidArgumentError(f"{what}: truncated or unreadable: {done} of {size} bytes")
        done += len(chunk)
        yield done, chunk


def _abort(store: ContentStore, ref: str) -> None:
    """Drop an ingest that will not be committed: a half-read entry is not worth resuming (an archive restarts
    from byte 0), and nothing is left behind in the ingest directory."""
    with contextlib.suppress(CargoholdError):
        store.abort(ref)


def ingest(store: ContentStore, reader: BinaryIO, *, name: str, size: int, expected: Digest,
           on_event: EventSink = discard) -> bool:
    """Stream one entry into the store, committed only if it hashes to ``expected``; True when new.

    A blob already stored is read through and checked too, so a corrupt archive never passes."""
    item = str(expected)
    on_event(Event(action="import", status="running", item=item, total=size))
    ref = f"import-{expected}"
    try:
        writer = store.writer(ref, expected=expected, total=size)
    except AlreadyExistsError:
        _verify_only(reader, name=name, size=size, expected=expected)
        on_event(Event(action="import", status="exists", item=item, current=size, total=size))
        return False
    committed = False
    try:
        with writer:
            if writer.offset:
                writer.truncate(0)  # an earlier, interrupted import of this blob: the archive starts at 0
            for done, chunk in _chunks(reader, size, name, expected):
                writer.write(chunk)
                on_event(Event(action="import", status="running", item=item, current=done, total=size))
            try:
                writer.commit(size, expected)
            except DigestMismatchError as exc:
                raise DigestMismatchError(expected, exc.actual, what=f"archive entry {name}: blob") from None
            committed = True
    finally:
        if not committed:
            _abort(store, ref)
    on_event(Event(action="import", status="done", item=item, current=size, total=size))
    return True


def _verify_only(reader: BinaryIO, *, name: str, size: int, expected: Digest) -> None:
    verifier = Verifier(expected)
    for _, chunk in _chunks(reader, size, name, expected):
        verifier.update(chunk)
    if not verifier.verified():
        raise DigestMismatchError(expected, verifier.digest(), what=f"archive entry {name}: blob")


def ingest_unknown(store: ContentStore, reader: BinaryIO, *, name: str, size: int,
                   on_event: EventSink = discard) -> tuple[Digest, bool, Descriptor | None]:
    """Stream an entry whose digest nobody announced; returns (digest, newly stored, reused blob). A reused
    blob's entry is not stored."""
    ref = f"import-entry-{secrets.token_hex(8)}"
    on_event(Event(action="import", status="running", item=name, total=size))
    committed = False
    try:
        with store.writer(ref, total=size) as writer:
            for done, chunk in _chunks(reader, size, name):
                writer.write(chunk)
                on_event(Event(action="import", status="running", item=name, current=done, total=size))
            digest = writer.digest()  # the writer hashed the bytes as they went by: once
            reused = compressed_for(store, digest)
            if reused is None:
                new = not store.exists(digest)
                writer.commit(size, digest)
                committed = True
    finally:
        if not committed:
            _abort(store, ref)
    if reused is not None:
        on_event(Event(action="import", status="exists", item=name, current=size, total=size,
                       message=f"reusing {reused.digest} for {digest}"))
        return digest, False, reused
    on_event(Event(action="import", status="done", item=name, current=size, total=size, message=str(digest)))
    return digest, new, None


_COMPRESSED_TYPES = {Compression.GZIP: mt.DOCKER_LAYER_GZIP, Compression.ZSTD: mt.DOCKER_LAYER_ZSTD}


def compressed_for(store: ContentStore, diff_id: Digest) -> Descriptor | None:
    """A stored compressed blob whose ``containerd.io/uncompressed`` label is ``diff_id`` (gzip preferred,
    then the smallest digest), as a Docker layer descriptor; None when there is none."""
    found: list[tuple[int, str, Descriptor]] = []
    for info in store.walk(label_filters={UNCOMPRESSED: str(diff_id)}):
        if info.digest == diff_id or not store.exists(info.digest):
            continue
        kind = blob_compression(store, info.digest)
        if kind not in _COMPRESSED_TYPES:
            continue
        desc = Descriptor(media_type=_COMPRESSED_TYPES[kind], digest=info.digest, size=info.size)
        found.append((0 if kind is Compression.GZIP else 1, str(info.digest), desc))
    return min(found, key=lambda t: t[:2])[2] if found else None


def blob_compression(store: ContentStore, digest: Digest) -> Compression:
    """A stored blob's compression, from its first bytes."""
    with store.reader_at(digest) as r:
        return detect_compression(r.read_at(0, 4))


def put_blob(store: ContentStore, data: bytes) -> Digest:
    """Commit ``data`` (a config, manifest or index we hold in memory); already stored is fine."""
    digest = Digest.from_bytes(data)
    try:
        with store.writer(f"import-{digest}", expected=digest, total=len(data)) as writer:
            if writer.offset:
                writer.truncate(0)
            writer.write(data)
            writer.commit(len(data), digest)
    except AlreadyExistsError:
        pass
    return digest


def check_layout(contents: Contents, where: str = "archive") -> bool:
    """Whether the archive is an OCI layout (``oci-layout`` of a version we read, or an ``index.json``)."""
    layout = contents.json(OCI_LAYOUT_FILE)
    if layout is not None:
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if version != OCI_LAYOUT_VERSION:
            raise InvalidArgumentError(
                f"archive entry {OCI_LAYOUT_FILE}: unsupported OCI layout version {version!r} "
                f"(want {OCI_LAYOUT_VERSION})")
        if INDEX_FILE not in contents.entries:
            raise InvalidArgumentError(f"{where}: OCI layout without {INDEX_FILE}")
        return True
    return INDEX_FILE in contents.entries
