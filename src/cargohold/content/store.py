"""What a content store is, after containerd's ``core/content``: small interfaces composed into one.

A store holds immutable blobs addressed by digest. It is read through a ``Provider``, inspected and
labelled through a ``Manager``, written through an ``Ingester`` (a ``Writer`` per ingest ref, resumable,
verified on commit) and its unfinished ingests are managed through an ``IngestManager``.

Implementations: ``content.local.LocalStore`` (files only, no labels) and
``content.namespaced.NamespacedStore`` (per-namespace visibility and labels in the metadata DB).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import BinaryIO, Protocol, Self, runtime_checkable

from cargohold.oci.digest import Digest


@dataclass(frozen=True, slots=True, kw_only=True)
class Info:
    """A committed blob: its digest, size, times and labels (labels are empty in a bare ``LocalStore``)."""

    digest: Digest
    size: int
    created_at: datetime
    updated_at: datetime
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """An unfinished ingest: how far it got (``offset``) of ``total`` (0 when unknown)."""

    ref: str
    offset: int
    total: int
    expected: Digest | None
    started_at: datetime
    updated_at: datetime


@runtime_checkable
class ReaderAt(Protocol):
    """Random access to one blob. ``read_at`` returns fewer than ``n`` bytes only at the end of the blob."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, n: int) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class Provider(Protocol):
    """Reads committed blobs. Every method raises NotFoundError naming the digest when it is absent."""

    def reader_at(self, digest: Digest) -> ReaderAt: ...

    def open(self, digest: Digest) -> BinaryIO:
        """A plain readable (and seekable) file object over the blob; the caller closes it."""
        ...

    def read_all(self, digest: Digest) -> bytes:
        """The whole blob; for manifests, indexes and configs, not for layers."""
        ...


class Manager(Protocol):
    """Inspects, labels, lists and deletes committed blobs."""

    def info(self, digest: Digest) -> Info: ...

    def update(self, digest: Digest, labels: Mapping[str, str | None]) -> Info:
        """Set the given labels; a value of None (or "") deletes that label. Others are kept."""
        ...

    def walk(self, *, label_filters: Mapping[str, str | None] | None = None) -> Iterator[Info]:
        """Every blob whose labels match: each key equals its value, or is present when the value is None."""
        ...

    def delete(self, digest: Digest) -> None: ...

    def exists(self, digest: Digest) -> bool: ...


class Writer(Protocol):
    """Writes one ingest. ``close()`` keeps the partial data so the same ref can resume; use as a context
    manager so the lock is always released."""

    @property
    def ref(self) -> str: ...

    @property
    def offset(self) -> int: ...

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def digest(self) -> Digest:
        """The digest of the bytes written so far (sha256 unless the expected digest says otherwise)."""
        ...

    def open_reader(self) -> int:
        """A new fd reading the data written so far (and later) from its start; valid after commit."""
        ...

    def status(self) -> Status: ...

    def truncate(self, size: int) -> None:
        """Cut the data back to ``size`` bytes (0 restarts the ingest)."""
        ...

    def commit(self, size: int, expected: Digest, labels: Mapping[str, str] | None = None) -> Digest:
        """Verify size (when ``size`` > 0) and digest, then make the blob visible atomically.

        On a mismatch nothing is committed, the ingest is discarded and SizeMismatchError /
        DigestMismatchError is raised. A blob already present is not an error. The writer is closed after.
        """
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class Ingester(Protocol):
    """Opens writers by ingest ref."""

    def writer(
        self,
        ref: str,
        *,
        expected: Digest | None = None,
        total: int = 0,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Writer:
        """A writer holding ``ref``; resumes a partial ingest left by an earlier writer.

        Raises AlreadyExistsError when ``expected`` is already committed (callers treat that as done), and
        LockedError when another writer (thread or process) holds ``ref`` and ``wait`` is false or
        ``timeout`` seconds pass.
        """
        ...


class IngestManager(Protocol):
    """Unfinished ingests."""

    def status(self, ref: str) -> Status: ...

    def list_statuses(self) -> list[Status]: ...

    def abort(self, ref: str) -> None:
        """Discard a partial ingest. LockedError when a writer holds it; NotFoundError when there is none."""
        ...


class ContentStore(Provider, Manager, Ingester, IngestManager, Protocol):
    """The whole content store."""

