"""Write image archives: an OCI layout plus a Docker ``manifest.json`` in one deterministic tar.

Entries are sorted by name, with mtime 0, uid/gid 0 and no user names, so two exports of the same images are
byte-identical. Blobs stream from the content store and are digest-checked as they are copied. A file
archive appears whole or not at all (``atomic_output``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cargohold.content.store import Provider
from cargohold.content.writer import fsync_dir
from cargohold.errors import DigestMismatchError, FailedPreconditionError, InvalidArgumentError, SizeMismatchError
from cargohold.events import Event, EventSink, discard
from cargohold.images.archive import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    DOCKER_MANIFEST_FILE,
    INDEX_FILE,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
    Selection,
    blob_path,
    oci_ref_name,
    repo_tag,
    require_complete,
)
from cargohold.images.handlers import read_manifest_or_index
from cargohold.metadata.images import Image
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Verifier
from cargohold.oci.manifest import Manifest
from cargohold.oci.platform import Platform, PlatformMatcher

BLOCK = 512
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class _Entry:
    name: str  # as written in the header (directories end with "/")
    mode: int
    data: bytes | None = None  # small files; None for directories and blobs
    blob: Descriptor | None = None


def index_json(images: Sequence[Image]) -> bytes:
    """``index.json``: one descriptor per image name, annotated with the full name and the tag."""
    manifests = []
    for image in images:
        annotations = {**image.target.annotations, ANNOTATION_IMAGE_NAME: image.name,
                       ANNOTATION_REF_NAME: oci_ref_name(image.name)}
        desc = Descriptor(media_type=image.target.media_type, digest=image.target.digest, size=image.target.size,
                          annotations=dict(sorted(annotations.items())))
        manifests.append(desc.to_dict())
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}
    return json.dumps(doc, separators=(",", ":")).encode()


def docker_manifest(provider: Provider, images: Sequence[Image], selections: Sequence[Selection],
                    platforms: Sequence[Platform]) -> bytes:
    """Docker's ``manifest.json``: for each image its manifest best matching the first platform (the first
    chosen one when none matches), with ``RepoTags`` and ``blobs/sha256/<hex>`` paths."""
    entries: dict[str, dict[str, object]] = {}
    matcher = PlatformMatcher(list(platforms)[:1])
    for image, sel in zip(images, selections, strict=True):
        if not sel.manifests:
            continue
        best = matcher.best(d.platform for d in sel.manifests)
        chosen = sel.manifests[best if best is not None else 0]
        key = str(chosen.digest)
        if key not in entries:
            doc = read_manifest_or_index(provider, chosen)
            assert isinstance(doc, Manifest)
            entries[key] = {"Config": blob_path(doc.config.digest), "RepoTags": [],
                            "Layers": [blob_path(layer.digest) for layer in doc.layers]}
        tag = repo_tag(image.name)
        tags = entries[key]["RepoTags"]
        assert isinstance(tags, list)
        if tag is not None and tag not in tags:
            tags.append(tag)
    return json.dumps(list(entries.values()), separators=(",", ":")).encode()


def archive_entries(provider: Provider, images: Sequence[Image], selections: Sequence[Selection],
                    platforms: Sequence[Platform]) -> tuple[list[_Entry], list[Descriptor]]:
    """Every tar entry, sorted by name, and the blobs among them."""
    require_complete(f"archive of {', '.join(i.name for i in images)}",
                     [(f"image {img.name}", sel) for img, sel in zip(images, selections, strict=True)])
    blobs: dict[str, Descriptor] = {}
    for sel in selections:
        for desc in sel.required:
            blobs.setdefault(blob_path(desc.digest), desc)
    entries = [_Entry(name=path, mode=0o444, blob=desc) for path, desc in blobs.items()]
    entries.append(_Entry(name="blobs/", mode=0o755))
    for algorithm in sorted({d.digest.algorithm for d in blobs.values()}):
        entries.append(_Entry(name=f"blobs/{algorithm}/", mode=0o755))
    layout = json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}, separators=(",", ":")).encode()
    entries.append(_Entry(name=OCI_LAYOUT_FILE, mode=0o444, data=layout))
    entries.append(_Entry(name=INDEX_FILE, mode=0o644, data=index_json(images)))
    entries.append(_Entry(name=DOCKER_MANIFEST_FILE, mode=0o644,
                          data=docker_manifest(provider, images, selections, platforms)))
    entries.sort(key=lambda e: e.name)
    return entries, [e.blob for e in entries if e.blob is not None]


def _header(name: str, size: int, mode: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.type = kind
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(n: int) -> bytes:
    return b"\0" * (-n % BLOCK)


def write_archive(provider: Provider, images: Sequence[Image], selections: Sequence[Selection],
                  platforms: Sequence[Platform], out: BinaryIO, *, on_event: EventSink = discard
                  ) -> tuple[list[Descriptor], int]:
    """Write the archive of ``images`` (their ``selections`` complete) to ``out``; returns the blobs written
    and the number of bytes. A blob whose stored bytes do not match its descriptor is an error naming it."""
    entries, blobs = archive_entries(provider, images, selections, platforms)
    written = 0

    def emit(data: bytes) -> None:
        nonlocal written
        out.write(data)
        written += len(data)

    for entry in entries:
        if entry.name.endswith("/"):
            emit(_header(entry.name, 0, entry.mode, tarfile.DIRTYPE))
        elif entry.data is not None:
            emit(_header(entry.name, len(entry.data), entry.mode, tarfile.REGTYPE))
            emit(entry.data + _pad(len(entry.data)))
        else:
            assert entry.blob is not None
            emit(_header(entry.name, entry.blob.size, entry.mode, tarfile.REGTYPE))
            _copy_blob(provider, entry.blob, emit, on_event)
            emit(_pad(entry.blob.size))
    emit(b"\0" * (2 * BLOCK))
    out.flush()
    return blobs, written


def _copy_blob(provider: Provider, desc: Descriptor, emit: Callable[[bytes], None], on_event: EventSink) -> None:
    item = str(desc.digest)
    on_event(Event(action="export", status="running", item=item, media_type=desc.media_type, total=desc.size))
    verifier = Verifier(desc.digest)
    with provider.open(desc.digest) as f:
        while verifier.size < desc.size:
            chunk = f.read(min(CHUNK, desc.size - verifier.size))
            if not chunk:
                break
            verifier.update(chunk)
            emit(chunk)
            on_event(Event(action="export", status="running", item=item, media_type=desc.media_type,
                           current=verifier.size, total=desc.size))
        extra = f.read(1)
    if verifier.size != desc.size or extra:
        raise SizeMismatchError(desc.digest, desc.size, verifier.size + len(extra))
    if not verifier.verified():
        raise DigestMismatchError(desc.digest, verifier.digest(), what=f"stored blob {desc.digest}")
    on_event(Event(action="export", status="done", item=item, media_type=desc.media_type, current=desc.size,
                   total=desc.size))


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A file that becomes ``path`` only when the block succeeds: fsynced, then renamed into place.

    The data goes to an unnamed ``O_TMPFILE`` beside ``path`` when the filesystem has them, so even a
    SIGKILL leaves nothing behind; elsewhere to ``.<name>.tmp-<random>``, removed on any exception. An
    OSError (no space, no permission) is a FailedPreconditionError naming ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidArgumentError(f"{path}: is a directory")
    directory = path.parent
    if not directory.is_dir():
        raise InvalidArgumentError(f"{path}: directory {directory} does not exist")
    temp = directory / f".{path.name}.tmp-{secrets.token_hex(6)}"
    named = False
    try:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
            fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            named = True
        with os.fdopen(fd, "wb", buffering=CHUNK) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if not named:
                # linkat(AT_SYMLINK_FOLLOW) through /proc gives the unnamed file a name (os.link takes that
                # path only when given a directory fd).
                dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.link(f"/proc/self/fd/{f.fileno()}", temp.name, dst_dir_fd=dir_fd, follow_symlinks=True)
                finally:
                    os.close(dir_fd)
                named = True
            os.replace(temp, path)
            named = False
        fsync_dir(directory)
    except OSError as exc:
        raise FailedPreconditionError(f"{path}: cannot write the archive: {exc}") from exc
    finally:
        if named:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
