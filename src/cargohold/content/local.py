"""The local content store: blob files and ingest directories under one root, nothing else.

Layout (as containerd's ``plugins/content/local``)::

    ROOT/content/blobs/<algorithm>/<hex>         committed blobs, read-only, complete before they appear
    ROOT/content/ingest/<sha256(ref)>/           one unfinished ingest: data, ref, startedat, updatedat,
                                                 total, expected, lock

``LocalStore`` keeps no labels: ``info`` returns none and ``update`` refuses to set any. Labels, namespaces
and garbage collection live in the metadata layer (``content.namespaced.NamespacedStore``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from cargohold.content.locks import IngestLock
from cargohold.content.store import Info, Status
from cargohold.content.writer import LocalWriter, read_status
from cargohold.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LockedError,
    NotFoundError,
)
from cargohold.metadata.content import labels_match
from cargohold.oci.digest import Digest


class FileReaderAt:
    """``ReaderAt`` over one open blob file (``pread``, so concurrent reads need no seeking)."""

    def __init__(self, path: Path, digest: Digest) -> None:
        self.digest = digest
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"content {digest}: not found") from None
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset``; fewer only at the end of the blob, none past it."""
        if self._fd is None:
            raise FailedPreconditionError(f"content {self.digest}: reader is closed")
        if offset < 0 or n < 0:
            raise InvalidArgumentError(f"content {self.digest}: invalid read of {n} bytes at offset {offset}")
        parts: list[bytes] = []
        want = min(n, max(0, self._size - offset))
        pos = offset
        while want > 0:
            chunk = os.pread(self._fd, want, pos)
            if not chunk:
                break
            parts.append(chunk)
            pos += len(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalStore:
    """A ``ContentStore`` of plain files under ``root``; safe across threads and processes.

    Writers of one ref exclude each other (``flock`` + a thread guard); blobs appear only once complete,
    verified and fsynced, by an atomic rename.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "content" / "blobs"
        self.ingest_dir = self.root / "content" / "ingest"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def blob_path(self, digest: Digest) -> Path:
        """Where the blob ``digest`` lives (whether or not it is there)."""
        return self.blobs_dir / digest.algorithm / digest.hex

    def ingest_path(self, ref: str) -> Path:
        """The ingest directory of ``ref``."""
        if not ref:
            raise InvalidArgumentError("ingest ref must not be empty")
        return self.ingest_dir / hashlib.sha256(ref.encode()).hexdigest()

    # -- Provider --------------------------------------------------------------------------------------------

    def reader_at(self, digest: Digest) -> FileReaderAt:
        return FileReaderAt(self.blob_path(digest), digest)

    def open(self, digest: Digest) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")  # the caller owns and closes the file
        except FileNotFoundError:
            raise NotFoundError(f"content {digest}: not found") from None

    def read_all(self, digest: Digest) -> bytes:
        with self.open(digest) as f:
            return f.read()

    # -- Manager ---------------------------------------------------------------------------------------------

    def info(self, digest: Digest) -> Info:
        try:
            st = os.stat(self.blob_path(digest))
        except FileNotFoundError:
            raise NotFoundError(f"content {digest}: not found") from None
        when = datetime.fromtimestamp(st.st_mtime, UTC)
        return Info(digest=digest, size=st.st_size, created_at=when, updated_at=when, labels={})

    def update(self, digest: Digest, labels: Mapping[str, str | None]) -> Info:
        """A bare local store keeps no labels: deleting labels is a no-op, setting one is refused."""
        info = self.info(digest)
        if any(v for v in labels.values()):
            raise FailedPreconditionError(
                f"content {digest}: the local store keeps no labels (use the namespaced store)"
            )
        return info

    def walk(self, *, label_filters: Mapping[str, str | None] | None = None) -> Iterator[Info]:
        for digest in self.blob_digests():
            try:
                info = self.info(digest)
            except NotFoundError:
                continue  # deleted while we walked
            if labels_match(info.labels, label_filters):
                yield info

    def delete(self, digest: Digest) -> None:
        if not self.remove_blob(digest):
            raise NotFoundError(f"content {digest}: not found")

    def exists(self, digest: Digest) -> bool:
        return self.blob_path(digest).is_file()

    # -- blob files, for the metadata layer and GC ------------------------------------------------------

    def blob_digests(self) -> Iterator[Digest]:
        """Digests of every blob file, in no particular order (files with other names are skipped)."""
        for alg_dir in sorted(self.blobs_dir.iterdir()):
            if not alg_dir.is_dir():
                continue
            for entry in sorted(os.listdir(alg_dir)):
                try:
                    yield Digest(alg_dir.name, entry)
                except InvalidArgumentError:
                    continue

    def remove_blob(self, digest: Digest) -> bool:
        """Delete the blob file; False when it was not there. Open readers keep reading the old file."""
        path = self.blob_path(digest)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    # -- Ingester ---------------------------------------------------------------------------------------

    def writer(
        self,
        ref: str,
        *,
        expected: Digest | None = None,
        total: int = 0,
        wait: bool = True,
        timeout: float | None = None,
    ) -> LocalWriter:
        if expected is not None and self.exists(expected):
            raise AlreadyExistsError(f"content {expected}: already exists (ingest ref {ref})")
        lock = IngestLock.acquire(self.ingest_path(ref), ref, wait=wait, timeout=timeout)
        return LocalWriter(ref=ref, lock=lock, blob_path=self.blob_path, expected=expected, total=total)

    # -- IngestManager -----------------------------------------------------------------------------------

    def status(self, ref: str) -> Status:
        return read_status(self.ingest_path(ref), ref)

    def list_statuses(self) -> list[Status]:
        out: list[Status] = []
        for entry in sorted(self.ingest_dir.iterdir()):
            try:
                out.append(read_status(entry))
            except NotFoundError:
                continue  # starting, or being removed
        return sorted(out, key=lambda s: s.ref)

    def abort(self, ref: str) -> None:
        """Remove the partial ingest of ``ref``. LockedError while a writer holds it."""
        directory = self.ingest_path(ref)
        read_status(directory, ref)  # NotFoundError when there is nothing to abort
        lock = IngestLock.acquire(directory, ref, wait=False)
        try:
            read_status(directory, ref)  # committed or aborted by its holder just before we locked
        except NotFoundError:
            lock.release(remove=True)
            raise
        lock.release(remove=True)

    def remove_stale_ingests(self, max_age: timedelta = timedelta(days=1)) -> list[str]:
        """Remove the ingests whose writer is gone (nobody holds their lock: a crash, a kill) and those not
        written to for ``max_age`` (a writer stuck for that long fails at commit, as with containerd).
        Returns their refs (``<namespace>/<ref>``, or the directory name when the ref file is missing)."""
        removed: list[str] = []
        cutoff = datetime.now(UTC) - max_age
        try:
            entries = sorted(self.ingest_dir.iterdir())
        except FileNotFoundError:
            return removed
        for entry in entries:
            try:
                status: Status | None = read_status(entry)
            except NotFoundError:
                status = None  # starting (ref not written yet) or half removed: the lock decides
            ref = status.ref if status is not None else entry.name
            try:
                lock = IngestLock.acquire(entry, ref, wait=False)
            except LockedError:
                if status is not None and status.updated_at < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(ref)
                continue
            if status is None:
                try:
                    status = read_status(entry)
                except NotFoundError:
                    # Nobody holds it and it has no ref: a writer died before writing one, or this is the
                    # empty directory our own lock just created; either way nothing to keep.
                    pass
            lock.release(remove=True)
            removed.append(status.ref if status is not None else ref)
        return removed
