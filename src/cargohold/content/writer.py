"""The local store's ingest writer and the files of an ingest directory.

An ingest directory (``ROOT/content/ingest/<sha256(ref)>/``) holds ``data`` (the bytes so far), ``ref``,
``startedat``, ``updatedat``, ``total``, ``expected`` and the ``lock`` file. ``ref`` is written last when an
ingest starts, so a directory without it is not (yet) an ingest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cargohold.content.locks import IngestLock
from cargohold.content.store import Status
from cargohold.errors import (
    DigestMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SizeMismatchError,
    is_no_space,
    no_space,
)
from cargohold.metadata.db import from_text, to_text, utcnow
from cargohold.oci.digest import Digest

CHUNK = 1 << 20


def read_status(directory: Path, ref: str | None = None) -> Status:
    """The status recorded in an ingest directory. NotFoundError when it holds no ingest (of ``ref``)."""
    try:
        stored_ref = (directory / "ref").read_text()
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"ingest ref {ref if ref is not None else directory.name}: not found") from None
    if ref is not None and stored_ref != ref:
        raise NotFoundError(f"ingest ref {ref}: not found")
    try:
        data = os.stat(directory / "data")
        offset = data.st_size
        updated = datetime.fromtimestamp(data.st_mtime, UTC)
    except FileNotFoundError:
        offset, updated = 0, utcnow()
    started = _read_time(directory / "startedat") or updated
    return Status(
        ref=stored_ref,
        offset=offset,
        total=_read_int(directory / "total"),
        expected=_read_digest(directory / "expected"),
        started_at=started,
        updated_at=max(updated, _read_time(directory / "updatedat") or updated),
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _read_time(path: Path) -> datetime | None:
    text = _read_text(path)
    try:
        return from_text(text) if text else None
    except ValueError:
        return None


def _read_int(path: Path) -> int:
    text = _read_text(path)
    return int(text) if text.isdigit() else 0


def _read_digest(path: Path) -> Digest | None:
    text = _read_text(path)
    if not text:
        return None
    try:
        return Digest.parse(text)
    except InvalidArgumentError:
        return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WRITEBACK_EVERY = 8 << 20  # bytes written between two early-writeback requests
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)``: start writing a range back without waiting
    (Linux; not in the os module). None where it cannot be loaded. Loaded on the first blob write of 8 MiB,
    not at import: commands that write no blob do not pay for ctypes."""
    try:
        import ctypes  # only here: the one C call the os module lacks

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int

    def start(fd: int, offset: int, n: int) -> None:
        func(fd, offset, n, _SYNC_FILE_RANGE_WRITE)  # advisory: an error only means no head start

    return start



def _hash_file(fd: int, size: int, algorithm: str) -> Any:
    hasher = hashlib.new(algorithm)
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(CHUNK, size - pos), pos)
        if not chunk:
            break
        hasher.update(chunk)
        pos += len(chunk)
    return hasher


class LocalWriter:
    """Writes one ingest of a ``LocalStore``; holds its lock until ``commit``, ``close`` or a failed commit.

    Created by ``LocalStore.writer``. On open it resumes whatever ``data`` holds: the offset is its size and
    the running hash is rebuilt by reading it, so ``commit`` verifies the whole blob.
    """

    def __init__(
        self,
        *,
        ref: str,
        lock: IngestLock,
        blob_path: Callable[[Digest], Path],
        expected: Digest | None,
        total: int,
    ) -> None:
        self._ref = ref
        self._lock = lock
        self._dir = lock.directory
        self._blob_path = blob_path
        self._fd: int | None = None
        self._verified: tuple[int, Digest] | None = None
        try:
            self._open(expected, total)
        except OSError as exc:
            self._release(remove=False)
            if is_no_space(exc):
                raise no_space(exc, f"starting ingest {ref}", self._dir) from exc
            raise
        except BaseException:
            self._release(remove=False)
            raise

    def _open(self, expected: Digest | None, total: int) -> None:
        d = self._dir
        ref_file = d / "ref"
        resuming = ref_file.exists() and ref_file.read_text() == self._ref
        if not resuming:
            # A fresh ingest (or the leftovers of one that died before writing ``ref``): start from nothing.
            for name in ("data", "startedat", "updatedat", "total", "expected"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d / name)
            (d / "startedat").write_text(to_text(utcnow()))
        if total > 0 or not resuming:
            (d / "total").write_text(str(max(total, 0)))
        if expected is not None or not resuming:
            (d / "expected").write_text(str(expected) if expected is not None else "")
        self._fd = os.open(d / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not resuming:
            ref_file.write_text(self._ref)
        self._started_at = _read_time(d / "startedat") or utcnow()
        self._total = _read_int(d / "total")
        self._expected = _read_digest(d / "expected")
        self._offset = os.fstat(self._fd).st_size
        self._written_back = self._offset
        self._algorithm = self._expected.algorithm if self._expected is not None else "sha256"
        self._hasher = _hash_file(self._fd, self._offset, self._algorithm)
        self._updated_at = utcnow()

    # -- Writer ------------------------------------------------------------------------------------------

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def closed(self) -> bool:
        return self._fd is None

    def digest(self) -> Digest:
        """The digest of the bytes written so far (the running hash: nothing is read again)."""
        return Digest(self._algorithm, self._hasher.copy().hexdigest())

    def open_reader(self) -> int:
        """A new file descriptor reading this ingest's data from its start, for a reader that follows the bytes
        as they are written (an apply streaming a layer). It stays valid after ``commit`` renames the file."""
        return os.open(self._dir / "data", os.O_RDONLY | os.O_CLOEXEC)

    def _live_fd(self) -> int:
        if self._fd is None:
            raise FailedPreconditionError(f"ingest ref {self._ref}: writer is closed")
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        fd = self._live_fd()
        view = memoryview(data).cast("B")
        n = len(view)
        pos = self._offset
        try:
            while view:
                written = os.pwrite(fd, view, pos)
                pos += written
                view = view[written:]
        except OSError as exc:
            # The bytes that did land are a prefix of the blob: the ingest keeps them and a later writer of
            # the same ref resumes from the file's size.
            if is_no_space(exc):
                raise no_space(exc, f"writing ingest {self._ref}", self._dir / "data") from exc
            raise
        self._hasher.update(data)
        # Start writing back what is written, every few MiB, without waiting: the fsync at commit then has
        # little left to do, so a blob's commit right after its last byte is short (the page cache keeps the
        # bytes for a reader following the file).
        if pos - self._written_back >= _WRITEBACK_EVERY:
            start_writeback = _load_sync_file_range()
            if start_writeback is not None:
                start_writeback(fd, self._written_back, pos - self._written_back)
            self._written_back = pos
        self._offset = pos
        self._updated_at = utcnow()
        self._verified = None
        return n

    def status(self) -> Status:
        self._live_fd()
        return Status(
            ref=self._ref,
            offset=self._offset,
            total=self._total,
            expected=self._expected,
            started_at=self._started_at,
            updated_at=self._updated_at,
        )

    def truncate(self, size: int) -> None:
        fd = self._live_fd()
        if size < 0 or size > self._offset:
            raise InvalidArgumentError(
                f"ingest ref {self._ref}: cannot truncate to {size} bytes (have {self._offset})"
            )
        os.ftruncate(fd, size)
        self._offset = size
        self._written_back = min(self._written_back, size)
        self._hasher = _hash_file(fd, size, self._algorithm)
        self._updated_at = utcnow()
        self._verified = None
        (self._dir / "updatedat").write_text(to_text(self._updated_at))

    def verify(self, size: int, expected: Digest) -> None:
        """The checks of ``commit`` without making the blob visible: size (when > 0) and digest, data
        fsynced. On a mismatch the ingest is discarded, the lock released, and the error raised."""
        fd = self._live_fd()
        if self._verified == (size, expected):
            return
        if size > 0 and self._offset != size:
            self._release(remove=True)
            err = SizeMismatchError(expected, size, self._offset)
            err.args = (f"{err} (ingest ref {self._ref})",)
            raise err
        if expected.algorithm == self._algorithm:
            actual = Digest(expected.algorithm, self._hasher.copy().hexdigest())
        else:
            actual = Digest(expected.algorithm, _hash_file(fd, self._offset, expected.algorithm).hexdigest())
        if actual != expected:
            self._release(remove=True)
            raise DigestMismatchError(expected, actual, what=f"ingest ref {self._ref}: content")
        try:
            os.fsync(fd)
        except OSError as exc:
            if is_no_space(exc):
                raise no_space(exc, f"syncing ingest {self._ref}", self._dir / "data") from exc
            raise
        self._verified = (size, expected)

    def commit(self, size: int, expected: Digest, labels: Mapping[str, str] | None = None) -> Digest:
        """Verify, then rename ``data`` to the blob path (fsynced, read-only) and remove the ingest.

        ``labels`` are ignored: a bare ``LocalStore`` keeps none (``NamespacedStore`` records them).
        """
        self.verify(size, expected)
        fd = self._live_fd()
        target = self._blob_path(expected)
        try:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.fchmod(fd, 0o444)
                # A concurrent commit of the same digest may rename over us; the bytes are the same.
                os.rename(self._dir / "data", target)
                fsync_dir(target.parent)
        except OSError as exc:
            self._release(remove=False)
            if is_no_space(exc):
                raise no_space(exc, f"committing blob {expected}", target) from exc
            raise
        except BaseException:
            self._release(remove=False)
            raise
        self._release(remove=True)
        return expected

    def close(self) -> None:
        """Release the ref and keep the partial data, so a later writer of the same ref resumes it."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self._dir / "updatedat").write_text(to_text(self._updated_at))
        self._release(remove=False)

    def _release(self, *, remove: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._lock.release(remove=remove)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A writer dropped without close() must not keep its ref locked for the life of the process.
        with contextlib.suppress(Exception):
            self.close()
