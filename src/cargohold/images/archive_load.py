"""Load an archive: read its entries (``archive_import``) and make sense of them, as an OCI layout or as a
docker archive whose index ``dockerarchive`` builds. Kept apart so neither of those imports the other's user."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import BinaryIO

from cargohold.content.store import ContentStore
from cargohold.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnsupportedMediaTypeError
from cargohold.events import EventSink, discard
from cargohold.images.archive import (
    DOCKER_MANIFEST_FILE,
    INDEX_FILE,
    OCI_LAYOUT_FILE,
    ReadArchive,
    archive_images,
)
from cargohold.images.archive_import import Contents, check_layout, read_archive
from cargohold.images.dockerarchive import build_docker_index
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import Index


def interpret(store: ContentStore, contents: Contents, *, where: str = "archive", base_name: str | None,
              digests: bool, today: date) -> ReadArchive:
    """Make sense of what ``read_archive`` found: an OCI layout, or a docker archive (manifests built)."""
    if check_layout(contents, where):
        fmt = "oci"
        raw = contents.entries[INDEX_FILE].data
        assert raw is not None
    elif DOCKER_MANIFEST_FILE in contents.entries:
        fmt = "docker"
        raw = build_docker_index(store, contents)
    else:
        raise InvalidArgumentError(
            f"{where}: not an image archive (no {OCI_LAYOUT_FILE}/{INDEX_FILE} and no {DOCKER_MANIFEST_FILE})")
    index = Index.parse(raw, where=f"archive entry {INDEX_FILE}")
    for n, d in enumerate(index.manifests):  # an image's target says what to walk: a blob would pass unchecked
        if not (mt.is_index(d.media_type) or mt.is_manifest(d.media_type)):
            raise UnsupportedMediaTypeError(f"archive entry {INDEX_FILE} manifest {n} ({d.digest}): media type "
                                            f"{d.media_type!r} is neither a manifest nor an index")
    desc = Descriptor(media_type=index.media_type, digest=Digest.from_bytes(raw), size=len(raw))
    images = archive_images(index, base_name=base_name, digests=digests, today=today)
    if not images:
        raise InvalidArgumentError(f"archive entry {INDEX_FILE}: lists no images")
    return ReadArchive(format=fmt, index=desc, index_raw=raw, images=tuple(images),
                       committed=tuple(contents.committed), present=tuple(contents.present),
                       reused=tuple(contents.reused))


def load_archive(store: ContentStore, source: Path | str | BinaryIO, *, base_name: str | None, digests: bool,
                 today: date, on_event: EventSink = discard) -> ReadArchive:
    """``read_archive`` then ``interpret``, from a file (opened and closed here) or a binary stream read once,
    in order; errors name the file (``-`` for a stream)."""
    if isinstance(source, (str, Path)):
        where = f"archive {source}"
        try:
            stream: BinaryIO = open(source, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFoundError(f"{where}: no such file") from None
        except OSError as exc:
            raise FailedPreconditionError(f"{where}: cannot read it: {exc.strerror or exc}") from None
        with stream:
            contents = read_archive(store, stream, where=where, on_event=on_event)
    else:
        where = "archive -"
        contents = read_archive(store, source, where=where, on_event=on_event)
    return interpret(store, contents, where=where, base_name=base_name, digests=digests, today=today)
