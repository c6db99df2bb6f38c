"""OCI image layout directories, as skopeo's ``oci:DIR[:REF]`` transport reads and writes them: ``oci-layout``,
``index.json`` and ``blobs/<alg>/<hex>`` in a directory (an archive's content, unpacked).

Reading takes only the blobs an image needs (the caller walks the graph, calling ``ingest_blob`` per
descriptor), each verified against its digest as it streams into the store. Writing is atomic per blob
(a temp file in the blob's directory, fsynced, renamed) and ``index.json`` is written last, so a reader
never sees an index naming a blob not yet there. An entry of ``index.json`` names its image with
``org.opencontainers.image.ref.name`` (REF); writing a REF replaces the entry that had it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from pathlib import Path

from cargohold.content.store import ContentStore, Provider
from cargohold.content.writer import fsync_dir
from cargohold.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cargohold.events import Event, EventSink
from cargohold.images.archive import (
    ANNOTATION_REF_NAME,
    INDEX_FILE,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
    ArchiveImage,
    archive_images,
    blob_path,
)
from cargohold.images.archive_export import CHUNK
from cargohold.images.archive_import import ingest
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Verifier
from cargohold.oci.manifest import Index

MAX_INDEX_SIZE = 4 << 20


def _read_small(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INDEX_SIZE + 1)
    except FileNotFoundError:
        raise NotFoundError(f"{what}: no such file") from None
    except OSError as exc:
        raise FailedPreconditionError(f"{what}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_INDEX_SIZE:
        raise InvalidArgumentError(f"{what}: larger than {MAX_INDEX_SIZE >> 20} MiB")
    return data


def read_index(directory: Path) -> Index:
    """The layout's ``index.json``, after checking ``oci-layout``; errors name the directory and file."""
    if not directory.is_dir():
        raise NotFoundError(f"OCI layout {directory}: no such directory")
    layout = _read_small(directory / OCI_LAYOUT_FILE, f"OCI layout {directory}: {OCI_LAYOUT_FILE}")
    try:
        version = json.loads(layout).get("imageLayoutVersion")
    except (ValueError, AttributeError):
        version = None
    if not isinstance(version, str) or not version.startswith("1."):
        raise InvalidArgumentError(f"OCI layout {directory}: {OCI_LAYOUT_FILE} has no imageLayoutVersion 1.x")
    raw = _read_small(directory / INDEX_FILE, f"OCI layout {directory}: {INDEX_FILE}")
    return Index.parse(raw, where=f"OCI layout {directory}: {INDEX_FILE}")


def layout_images(directory: Path, today: date) -> list[ArchiveImage]:
    """The images ``index.json`` lists, named as an archive's are (the ref name annotation)."""
    return archive_images(read_index(directory), base_name=None, digests=False, today=today)


def ingest_blob(store: ContentStore, directory: Path, desc: Descriptor, on_event: EventSink) -> bool:
    """Stream ``desc``'s blob from the layout into ``store``, verified; True when it was not stored yet."""
    name = blob_path(desc.digest)
    path = directory / name
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFoundError(f"OCI layout {directory}: blob {desc.digest} ({desc.media_type}) missing: "
                            f"no {name}") from None
    except OSError as exc:
        raise FailedPreconditionError(f"OCI layout {directory}: {name}: cannot read it: {exc.strerror or exc}"
                                      ) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != desc.size:
            raise InvalidArgumentError(f"OCI layout {directory}: {name} is {size} bytes, its descriptor says "
                                       f"{desc.size}")
        return ingest(store, f, name=f"{directory}/{name}", size=size, expected=desc.digest, on_event=on_event)


def write_layout(provider: Provider, directory: Path, target: Descriptor, blobs: Sequence[Descriptor],
                 ref_name: str, on_event: EventSink) -> None:
    """Write ``blobs`` (every blob ``target`` needs) into the layout at ``directory`` (created), then its
    entry in ``index.json``: annotated ``ref_name`` when given, replacing the entry that had that name."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        existing: tuple[Descriptor, ...] = ()
        if (directory / INDEX_FILE).exists():
            existing = read_index(directory).manifests
        elif any(directory.iterdir()):
            raise FailedPreconditionError(f"OCI layout {directory}: not empty and not an OCI layout "
                                          f"(no {INDEX_FILE})")
        layout = json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}, separators=(",", ":")).encode()
        if not (directory / OCI_LAYOUT_FILE).exists():
            _write_atomic(directory / OCI_LAYOUT_FILE, [layout])
        for desc in dict.fromkeys(blobs):
            _write_blob(provider, directory, desc, on_event)
        annotations = {**target.annotations, **({ANNOTATION_REF_NAME: ref_name} if ref_name else {})}
        entry = Descriptor(media_type=target.media_type, digest=target.digest, size=target.size,
                           annotations=annotations)
        kept = [d for d in existing
                if not (ref_name and d.annotations.get(ANNOTATION_REF_NAME) == ref_name)
                and not (not ref_name and d.digest == target.digest and ANNOTATION_REF_NAME not in d.annotations)]
        doc = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [d.to_dict() for d in [*kept, entry]]}
        _write_atomic(directory / INDEX_FILE, [json.dumps(doc, separators=(",", ":")).encode()])
    except OSError as exc:
        raise FailedPreconditionError(f"OCI layout {directory}: cannot write it: {exc}") from exc


def _write_blob(provider: Provider, directory: Path, desc: Descriptor, on_event: EventSink) -> None:
    path = directory / blob_path(desc.digest)
    item = str(desc.digest)
    if path.is_file() and path.stat().st_size == desc.size:
        on_event(Event(action="export", status="exists", item=item, media_type=desc.media_type, total=desc.size))
        return  # content-addressed: a blob of the right size under its digest was written verified before
    path.parent.mkdir(parents=True, exist_ok=True)
    on_event(Event(action="export", status="running", item=item, media_type=desc.media_type, total=desc.size))
    verifier = Verifier(desc.digest)

    def check() -> None:  # before the blob gets its name: a bad stored blob never lands in the layout
        if verifier.size != desc.size or not verifier.verified():
            raise FailedPreconditionError(f"stored blob {desc.digest}: {verifier.size} bytes hashing to "
                                          f"{verifier.digest()}, not the descriptor's {desc.size} bytes")

    with provider.open(desc.digest) as src:
        _write_atomic(path, _verified(iter(lambda: src.read(CHUNK), b""), verifier), check=check)
    on_event(Event(action="export", status="done", item=item, media_type=desc.media_type, current=desc.size,
                   total=desc.size))


def _verified(chunks: Iterator[bytes], verifier: Verifier) -> Iterator[bytes]:
    for chunk in chunks:
        verifier.update(chunk)
        yield chunk


def _write_atomic(path: Path, chunks: Iterable[bytes], *, check: Callable[[], None] | None = None) -> None:
    """``path`` with ``chunks`` as its bytes, or unchanged: a temp file beside it, fsynced, ``check``ed,
    renamed."""
    temp = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
    try:
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check()
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_dir(path.parent)
