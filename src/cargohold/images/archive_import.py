"""Read image archives into a content store, in one sequential pass (stdin is not seekable).

Plain, gzip or zstd tars (detected by magic bytes) holding an OCI layout, a ``docker save`` archive
(``manifest.json`` with ``<id>/layer.tar`` and ``<id>.json``), or both (newer docker: ``index.json`` wins).
Each ``blobs/<alg>/<hex>`` entry streams into an ingest and is committed only when its bytes hash to the
digest its path names; one already stored is read through and checked all the same. Other large entries
(docker layer tars) stream into the store under the digest they hash to, except a layer tar some stored
compressed blob is labelled ``containerd.io/uncompressed`` with: that blob is reused and the tar discarded.
Small JSON entries stay in memory. Nothing here records an image: the caller does, once all is verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
import secrets
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, BinaryIO

from cargohold.content.store import ContentStore
from cargohold.diff.compression import decompress_stream
from cargohold.errors import (
    AlreadyExistsError,
    CargoholdError,
    DigestMismatchError,
    InvalidArgumentError,
    NotFoundError,
)
from cargohold.events import Event, EventSink, discard
from cargohold.images.archive import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    DOCKER_MANIFEST_FILE,
    INDEX_FILE,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
    ArchiveImage,
    ReadArchive,
    normalize_name,
)
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import Index
from cargohold.unpack.labels import UNCOMPRESSED

CHUNK = 1 << 20
# What reading a broken stream raises: tarfile's errors, I/O errors, and our decompressors' InvalidArgumentError.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, InvalidArgumentError)
SMALL_ENTRY = 1 << 20  # non-blob entries up to this size (configs, v1 json) are kept in memory
MAX_JSON = 16 << 20
_BLOB_PATH = re.compile(r"^blobs/([a-z0-9]+)/([a-f0-9]+)$")
_MEMORY_FILES = frozenset({OCI_LAYOUT_FILE, INDEX_FILE, DOCKER_MANIFEST_FILE, "repositories"})


@dataclass(slots=True, kw_only=True)
class Entry:
    """A regular file of the archive: kept in memory (``data``), in the store (``digest``), or matched to a
    stored compressed blob (``reused``, the tar itself not stored)."""

    name: str
    size: int
    data: bytes | None = None
    digest: Digest | None = None
    reused: Descriptor | None = None


@dataclass(slots=True, kw_only=True)
class Contents:
    """Everything one pass over the archive found."""

    entries: dict[str, Entry] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    committed: list[Digest] = field(default_factory=list)
    present: list[Digest] = field(default_factory=list)
    reused: list[Digest] = field(default_factory=list)

    def lookup(self, name: str) -> Entry:
        """The entry at ``name``, following symlinks and hardlinks; NotFoundError names the path."""
        path = clean_name(name)
        for _ in range(16):
            entry = self.entries.get(path)
            if entry is not None:
                return entry
            if path not in self.links:
                break
            path = self.links[path]
        raise NotFoundError(f"archive entry {name}: not in the archive")

    def json(self, name: str) -> Any:
        entry = self.entries.get(name)
        if entry is None or entry.data is None:
            return None
        try:
            return json.loads(entry.data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"archive entry {name}: invalid JSON: {exc}") from None


def clean_name(name: str) -> str:
    """Archive names compared as paths: ``./a//b`` is ``a/b``."""
    path = posixpath.normpath("/" + name).lstrip("/")
    return path


def read_archive(store: ContentStore, source: BinaryIO, *, on_event: EventSink = discard) -> Contents:
    """Read the whole archive once, ingesting blobs as they stream by. Errors name the entry (and digest)."""
    contents = Contents()
    previous = ""
    try:
        stream = decompress_stream(source)
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK)  # type: ignore[call-overload]
    except _READ_ERRORS as exc:
        raise InvalidArgumentError(f"archive: not a readable tar archive: {exc}") from None
    with tar:
        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except _READ_ERRORS as exc:
                where = f"after entry {previous}" if previous else "at its start"
                raise InvalidArgumentError(f"archive: truncated or unreadable {where}: {exc}") from None
            name = previous = clean_name(member.name)
            if member.issym():
                contents.links[name] = clean_name(posixpath.join(posixpath.dirname(name), member.linkname))
            elif member.islnk():
                contents.links[name] = clean_name(member.linkname)
            elif member.isreg():
                reader = tar.extractfile(member)
                assert reader is not None
                _read_entry(store, contents, name, member.size, reader, on_event)
    if not contents.entries:
        raise InvalidArgumentError("archive: no files in it (empty, or not a tar archive)")
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
    if name in _MEMORY_FILES or (size <= SMALL_ENTRY and not name.endswith(".tar")):
        if size > MAX_JSON:
            raise InvalidArgumentError(f"archive entry {name}: {size} bytes is too large for a metadata file")
        contents.entries[name] = Entry(name=name, size=size, data=_read_exact(reader, size, name))
        return
    # A docker layer tar (or another large file): stored under the digest it hashes to, unless a stored
    # compressed blob already holds these uncompressed bytes.
    digest, new, reused = ingest_unknown(store, reader, name=name, size=size, on_event=on_event)
    entry = Entry(name=name, size=size, digest=digest if reused is None else None, reused=reused)
    contents.entries[name] = entry
    if reused is not None:
        contents.reused.append(digest)
    elif new:
        contents.committed.append(digest)
    else:
        contents.present.append(digest)


def _read_exact(reader: BinaryIO, size: int, name: str) -> bytes:
    try:
        data = reader.read(size)
    except _READ_ERRORS as exc:
        raise _wrap_read_error(name, None, exc) from None
    if len(data) != size:
        raise InvalidArgumentError(f"archive entry {name}: truncated ({len(data)} of {size} bytes)")
    return data


def _chunks(reader: BinaryIO, size: int, name: str, digest: Digest | None = None) -> Iterator[tuple[int, bytes]]:
    """The entry's bytes in chunks, with the count so far; a short or broken read names the entry."""
    done = 0
    while done < size:
        try:
            chunk = reader.read(min(CHUNK, size - done))
        except _READ_ERRORS as exc:
            raise _wrap_read_error(name, digest, exc) from None
        if not chunk:
            raise _wrap_read_error(name, digest, EOFError(f"{done} of {size} bytes"))
        done += len(chunk)
        yield done, chunk


def _wrap_read_error(name: str, digest: Digest | None, exc: BaseException) -> InvalidArgumentError:
    what = f"archive entry {name}" + (f" ({digest})" if digest is not None else "")
    return InvalidArgumentError(f"{what}: truncated or unreadable: {exc}")


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
    with writer:
        try:
            if writer.offset:
                writer.truncate(0)  # an earlier, interrupted import of this blob: the archive starts at 0
            for done, chunk in _chunks(reader, size, name, expected):
                writer.write(chunk)
                on_event(Event(action="import", status="running", item=item, current=done, total=size))
        except BaseException:
            writer.close()  # a half-read entry is not worth resuming: the archive restarts from byte 0
            with contextlib.suppress(CargoholdError):
                store.abort(ref)
            raise
        try:
            writer.commit(size, expected)
        except DigestMismatchError as exc:
            raise DigestMismatchError(expected, exc.actual, what=f"archive entry {name}: blob") from None
    on_event(Event(action="import", status="done", item=item, current=size, total=size))
    return True


def _verify_only(reader: BinaryIO, *, name: str, size: int, expected: Digest) -> None:
    hasher = expected.hasher()
    for _, chunk in _chunks(reader, size, name, expected):
        hasher.update(chunk)
    actual = Digest(expected.algorithm, hasher.hexdigest())
    if actual != expected:
        raise DigestMismatchError(expected, actual, what=f"archive entry {name}: blob")


def ingest_unknown(store: ContentStore, reader: BinaryIO, *, name: str, size: int,
                   on_event: EventSink = discard) -> tuple[Digest, bool, Descriptor | None]:
    """Stream an entry whose digest nobody announced; returns (digest, newly stored, reused blob)."""
    ref = f"import-entry-{secrets.token_hex(8)}"
    hasher = hashlib.sha256()
    on_event(Event(action="import", status="running", item=name, total=size))
    with store.writer(ref, total=size) as writer:
        try:
            for done, chunk in _chunks(reader, size, name):
                writer.write(chunk)
                hasher.update(chunk)
                on_event(Event(action="import", status="running", item=name, current=done, total=size))
        except BaseException:
            writer.close()
            with contextlib.suppress(CargoholdError):
                store.abort(ref)
            raise
        digest = Digest("sha256", hasher.hexdigest())
        reused = compressed_for(store, digest)
        if reused is not None:
            writer.close()
            with contextlib.suppress(CargoholdError):
                store.abort(ref)
            on_event(Event(action="import", status="exists", item=name, current=size, total=size,
                           message=f"reusing {reused.digest} for {digest}"))
            return digest, False, reused
        new = not store.exists(digest)
        writer.commit(size, digest)
    on_event(Event(action="import", status="done", item=name, current=size, total=size, message=str(digest)))
    return digest, new, None


_COMPRESSED_TYPES = {"gzip": mt.DOCKER_LAYER_GZIP, "zstd": mt.DOCKER_LAYER_ZSTD}


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
        found.append((0 if kind == "gzip" else 1, str(info.digest), desc))
    return min(found, key=lambda t: t[:2])[2] if found else None


def blob_compression(store: ContentStore, digest: Digest) -> str:
    """``gzip``, ``zstd`` or ``none``, from the blob's first bytes."""
    with store.reader_at(digest) as r:
        head = r.read_at(0, 4)
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def put_blob(store: ContentStore, data: bytes, *, ref_kind: str = "import") -> Digest:
    """Commit ``data`` (a config, manifest or index we hold in memory); already stored is fine."""
    digest = Digest.from_bytes(data)
    try:
        with store.writer(f"{ref_kind}-{digest}", expected=digest, total=len(data)) as writer:
            if writer.offset:
                writer.truncate(0)
            writer.write(data)
            writer.commit(len(data), digest)
    except AlreadyExistsError:
        pass
    return digest


def check_layout(contents: Contents) -> bool:
    """Whether the archive is an OCI layout (``oci-layout`` of a version we read, or an ``index.json``)."""
    layout = contents.json(OCI_LAYOUT_FILE)
    if layout is not None:
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if version != OCI_LAYOUT_VERSION:
            raise InvalidArgumentError(
                f"archive entry {OCI_LAYOUT_FILE}: unsupported OCI layout version {version!r} "
                f"(want {OCI_LAYOUT_VERSION})")
        if INDEX_FILE not in contents.entries:
            raise InvalidArgumentError(f"archive: OCI layout without {INDEX_FILE}")
        return True
    return INDEX_FILE in contents.entries


def image_names(desc: Descriptor, *, base_name: str | None, digests: bool, today: date) -> tuple[str, ...]:
    """The names an index entry is recorded under, as ``ctr images import`` gives them.

    ``io.containerd.image.name`` when set; else ``org.opencontainers.image.ref.name``: kept when it is a
    full reference, else a bare tag joined to ``base_name`` (default ``import-<YYYY-MM-DD>``). ``digests``
    adds ``<base>@<digest>``; an entry with no name at all gets that digest name too, so it is kept.
    """
    base = base_name or f"import-{today.isoformat()}"
    names: list[str] = []
    name = desc.annotations.get(ANNOTATION_IMAGE_NAME, "")
    if not name:
        ref = desc.annotations.get(ANNOTATION_REF_NAME, "")
        if ref:
            name = ref if any(c in ref for c in "/:@") else f"{base}:{ref}"
    if name:
        names.append(normalize_name(name))
    if digests or not names:
        names.append(normalize_name(f"{base}@{desc.digest}"))
    return tuple(dict.fromkeys(names))


def archive_images(index: Index, *, base_name: str | None, digests: bool, today: date) -> list[ArchiveImage]:
    """The images of an archive's index, each with its names."""
    return [ArchiveImage(names=image_names(d, base_name=base_name, digests=digests, today=today),
                         target=Descriptor(media_type=d.media_type, digest=d.digest, size=d.size,
                                           annotations=dict(d.annotations)))
            for d in index.manifests]


def interpret(store: ContentStore, contents: Contents, *, base_name: str | None, digests: bool, today: date,
              on_event: EventSink = discard) -> ReadArchive:
    """Make sense of what ``read_archive`` found: an OCI layout, or a docker archive (manifests built)."""
    from cargohold.images.dockerarchive import build_docker_index

    built: Sequence[Descriptor] = ()
    if check_layout(contents):
        fmt = "oci"
        raw = contents.entries[INDEX_FILE].data
        assert raw is not None
    elif DOCKER_MANIFEST_FILE in contents.entries:
        fmt = "docker"
        raw, built = build_docker_index(store, contents, on_event=on_event)
    else:
        raise InvalidArgumentError(
            f"archive: not an image archive (no {OCI_LAYOUT_FILE}/{INDEX_FILE} and no {DOCKER_MANIFEST_FILE})")
    index = Index.parse(raw, mt.OCI_INDEX if not _declared_type(raw) else "", where=f"archive entry {INDEX_FILE}")
    desc = Descriptor(media_type=index.media_type, digest=Digest.from_bytes(raw), size=len(raw))
    images = archive_images(index, base_name=base_name, digests=digests, today=today)
    if not images:
        raise InvalidArgumentError(f"archive entry {INDEX_FILE}: lists no images")
    return ReadArchive(format=fmt, index=desc, index_raw=raw, images=tuple(images),
                       committed=tuple(contents.committed), present=tuple(contents.present),
                       reused=tuple(contents.reused), built=tuple(built))


def _declared_type(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return ""
    return str(doc.get("mediaType", "")) if isinstance(doc, dict) else ""

