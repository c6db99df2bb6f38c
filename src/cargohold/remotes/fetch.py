"""The download loop: stream a blob from a registry into a content store ingest, resuming when cut off."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Protocol, Self

from cargohold import stages
from cargohold.content.store import Ingester, Writer
from cargohold.errors import AlreadyExistsError, NoSpaceError, SizeMismatchError, UnavailableError
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.remotes.http import DEFAULT_FETCH_TIMEOUT

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class ChunkStream(Protocol):
    """What a fetcher opens: chunks of bytes; closed after use."""

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class BlobFetcher(Protocol):
    """``remotes.resolver.Fetcher`` or anything that opens a descriptor's bytes from an offset."""

    def fetch(self, desc: Descriptor, *, offset: int = 0) -> ChunkStream: ...


class BlobTap(Protocol):
    """Follows a blob while it is downloaded into the store (an apply streaming a layer from the same bytes)."""

    def opened(self, reader: Callable[[], int]) -> None:
        """The ingest is open; ``reader()`` gives a new fd on its bytes from the start (valid after commit)."""

    def committed(self, size: int) -> None:
        """The blob is complete, verified (digest and size), fsynced and committed: ``size`` bytes."""

    def failed(self, error: BaseException) -> None:
        """The download failed (bytes already written may have been discarded): nothing more will come."""


def ingest_ref(desc: Descriptor) -> str:
    """The ingest ref of a download, after containerd's MakeRefKey: ``layer-<digest>``, ``manifest-...``."""
    mtype = desc.media_type
    if mt.is_manifest(mtype) or mtype in mt.SCHEMA1_TYPES:
        kind = "manifest"
    elif mt.is_index(mtype):
        kind = "index"
    elif mt.is_layer(mtype) or "layer" in mtype:
        kind = "layer"
    elif mt.is_config(mtype) or mtype.endswith("config.v1+json"):
        kind = "config"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


def fetch_blob(
    fetcher: BlobFetcher,
    ingester: Ingester,
    desc: Descriptor,
    *,
    ref: str | None = None,
    labels: Mapping[str, str] | None = None,
    progress: ProgressFn | None = None,
    max_resumes: int = 5,
    fetch_timeout: float | None = None,
    tap: BlobTap | None = None,
) -> None:
    """Download ``desc`` into the store and commit it, verified against its digest and size.

    A blob already in the store is done (AlreadyExistsError from the ingester is swallowed). A partial
    ingest of the same ref (an earlier run cut off) is resumed from its offset. A connection lost mid-body
    is reopened at the writer's offset with ``Range`` up to ``max_resumes`` times;
    a stalled connection (no data for the transport's read timeout) is reopened the same way until no byte
    has arrived for ``fetch_timeout`` seconds (default: the fetcher's ``fetch_timeout``, else
    DEFAULT_FETCH_TIMEOUT). On a digest or size mismatch nothing is committed, the partial download is
    discarded (the next pull starts afresh) and DigestMismatchError / SizeMismatchError names the digest.
    ``progress(done, total)`` is called as bytes arrive. ``tap`` follows the download while it is written (see
    ``BlobTap``); it hears nothing when the blob was already in the store.
    """
    give_up = fetch_timeout if fetch_timeout is not None else float(
        getattr(fetcher, "fetch_timeout", DEFAULT_FETCH_TIMEOUT))
    ref = ref or ingest_ref(desc)
    try:
        writer = ingester.writer(ref, expected=desc.digest, total=desc.size)
    except AlreadyExistsError:
        return
    with writer:
        if writer.offset > desc.size:
            writer.truncate(0)  # a leftover longer than the blob can only be garbage
        if tap is not None:
            tap.opened(writer.open_reader)
        try:
            _download(fetcher, writer, desc, labels=labels, progress=progress, max_resumes=max_resumes,
                      give_up=give_up)
        except BaseException as exc:
            if tap is not None:
                tap.failed(exc)
            raise
    if tap is not None:
        tap.committed(desc.size)


def _download(fetcher: BlobFetcher, writer: Writer, desc: Descriptor, *, labels: Mapping[str, str] | None,
              progress: ProgressFn | None, max_resumes: int, give_up: float) -> None:
    """The body of ``fetch_blob``: write the blob from the writer's offset to its end (resuming when cut off),
    then commit it."""
    if writer.offset and progress is not None:
        progress(writer.offset, desc.size)
    began, first = time.perf_counter(), writer.offset
    resumes = 0
    last_progress = time.monotonic()
    while writer.offset < desc.size:
        start = writer.offset
        # Opening is retried by the transport (and falls through the hosts); an error here is final.
        try:
            stream = fetcher.fetch(desc, offset=start)
        except SizeMismatchError:
            writer.truncate(0)  # a partial of a blob that is not what its descriptor says is worthless
            raise
        try:
            with stream:
                for chunk in stream:
                    writer.write(chunk)
                    last_progress = time.monotonic()
                    if progress is not None:
                        progress(min(writer.offset, desc.size), desc.size)
                    if writer.offset > desc.size:
                        break  # more bytes than announced: commit below reports the size mismatch
        except NoSpaceError:
            raise  # our disk, not the connection: reopening would not help (the partial data is kept)
        except UnavailableError as exc:
            # The connection dropped or stalled mid-body: reopen at the offset reached. Cuts are bounded
            # by count, stalls by the time without a byte.
            idle = time.monotonic() - last_progress
            if idle >= give_up:
                raise UnavailableError(
                    f"{desc.digest}: no data for {idle:.0f} s at byte {writer.offset} of {desc.size}; "
                    f"giving up (fetch_timeout {give_up:g} s): {exc}") from exc
            if not getattr(stream, "stalled", False):
                if resumes >= max_resumes:
                    raise UnavailableError(f"{desc.digest}: gave up after {resumes} resumes: {exc}") from exc
                resumes += 1
            log.info(
                "%s: %s; resuming at byte %d (resume %d of %d)",
                desc.digest,
                exc,
                writer.offset,
                resumes,
                max_resumes,
            )
            continue
        if writer.offset > desc.size:
            break
        if writer.offset < desc.size:
            # The body ended early without an error (no Content-Length): also a cut.
            if resumes >= max_resumes:
                raise UnavailableError(
                    f"{desc.digest}: registry sent {writer.offset} of {desc.size} bytes, then nothing"
                )
            resumes += 1
    stages.record("fetch", time.perf_counter() - began, nbytes=writer.offset - first)
    with stages.timed("commit"):  # verify (the running hash), fsync, rename, record
        writer.commit(desc.size, desc.digest, labels=dict(labels) if labels else None)
