"""The content store one namespace sees: shared blob files, per-namespace rows with labels.

As containerd's metadata content store: a blob is visible in a namespace only while the ``content`` table
has a row for it there. Committing inserts the row; a writer for a digest whose file is already on disk
(another namespace fetched it) just adds the row and answers AlreadyExistsError, so nothing is downloaded
twice.

``delete`` removes the row and, when no namespace has a row left, the blob file, in the same transaction.
Garbage collection (``metadata.gc``) does the same for content no image, lease or root label reaches.
Committing, the AlreadyExists shortcut, ``delete`` and GC's row sweep and per-batch file unlinks each run
inside a write transaction, so a blob file can never be removed between its rename into place (or its
claim) and the insert of its row.

Ingest refs are per namespace: the local store holds them as ``<namespace>/<ref>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import BinaryIO, Self

from cargohold.content.local import FileReaderAt, LocalStore
from cargohold.content.store import Info, Status
from cargohold.content.writer import LocalWriter
from cargohold.errors import AlreadyExistsError, NotFoundError
from cargohold.metadata.content import (
    ContentRecord,
    ContentRecords,
    labels_match,
    referenced_anywhere,
    validate_labels,
)
from cargohold.metadata.db import DEFAULT_NAMESPACE, MetadataDB
from cargohold.metadata.leases import KIND_CONTENT, KIND_INGEST, LeaseStore
from cargohold.oci.digest import Digest


def _info(record: ContentRecord) -> Info:
    return Info(
        digest=record.digest,
        size=record.size,
        created_at=record.created_at,
        updated_at=record.updated_at,
        labels=dict(record.labels),
    )


class NamespacedStore:
    """A ``ContentStore`` over ``local``'s files for one ``namespace`` of ``db``.

    With ``lease`` set (see ``with_lease``), every blob this store commits, claims, finds (``exists``) or
    reads, and every ingest it starts, is added to that lease in the same transaction, so GC keeps it while
    the lease lives.
    """

    def __init__(
        self,
        local: LocalStore,
        db: MetadataDB,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        lease: str | None = None,
    ) -> None:
        self.local = local
        self.db = db
        self.namespace = namespace
        self.lease = lease
        self.records = ContentRecords(db, namespace)
        self._leases = LeaseStore(db, namespace)  # also creates the namespace row

    def __repr__(self) -> str:
        return f"NamespacedStore({self.local!r}, namespace={self.namespace!r})"

    def with_lease(self, lease: str | None) -> NamespacedStore:
        """The same store, adding what it writes to ``lease`` (None: no lease)."""
        return NamespacedStore(self.local, self.db, self.namespace, lease=lease)

    def _local_ref(self, ref: str) -> str:
        return f"{self.namespace}/{ref}"

    def _hold(self, kind: str, resource: str) -> None:
        if self.lease is not None:
            self._leases.add_resource(self.lease, kind, resource)

    def _record(self, digest: Digest) -> ContentRecord:
        record = self._held_record(digest)
        if record is None:
            raise NotFoundError(f"content {digest}: not found in namespace {self.namespace}")
        return record

    def _held_record(self, digest: Digest) -> ContentRecord | None:
        """The row of ``digest``; with a lease, the blob is added to it in the same transaction, so a blob
        this store has seen (and is about to rely on: read, skip fetching) is never collected under it."""
        if self.lease is None:
            return self.records.get(digest)
        with self.db.transaction():
            record = self.records.get(digest)
            if record is not None:
                self._hold(KIND_CONTENT, str(digest))
            return record

    # -- Provider --------------------------------------------------------------------------------------------

    def reader_at(self, digest: Digest) -> FileReaderAt:
        self._record(digest)
        return self.local.reader_at(digest)

    def open(self, digest: Digest) -> BinaryIO:
        self._record(digest)
        return self.local.open(digest)

    def read_all(self, digest: Digest) -> bytes:
        self._record(digest)
        return self.local.read_all(digest)

    # -- Manager ---------------------------------------------------------------------------------------------

    def info(self, digest: Digest) -> Info:
        return _info(self._record(digest))

    def update(self, digest: Digest, labels: Mapping[str, str | None]) -> Info:
        return _info(self.records.update_labels(digest, labels))

    def walk(self, *, label_filters: Mapping[str, str | None] | None = None) -> Iterator[Info]:
        for record in self.records.list():
            if labels_match(record.labels, label_filters):
                yield _info(record)

    def delete(self, digest: Digest) -> None:
        """Remove the blob from this namespace; its file goes when no namespace has it any more."""
        with self.db.transaction(frees_space=True):
            if not self.records.remove(digest):
                raise NotFoundError(f"content {digest}: not found in namespace {self.namespace}")
            if not referenced_anywhere(self.db, digest):
                self.local.remove_blob(digest)

    def exists(self, digest: Digest) -> bool:
        """Whether the blob is visible here; with a lease, an existing blob is added to it."""
        return self._held_record(digest) is not None and self.local.exists(digest)

    # -- Ingester ---------------------------------------------------------------------------------------

    def _claim_existing(self, expected: Digest) -> bool:
        """True when ``expected`` is (now) visible here: already a row, or a file on disk we add a row for.

        A row whose file has gone missing is stale: it is dropped so the blob can be written again.
        """
        with self.db.transaction():
            record = self.records.get(expected)
            on_disk = self.local.exists(expected)
            if record is not None and not on_disk:
                self.records.remove(expected)
                return False
            if not on_disk:
                return False
            if record is None:
                self.records.add(expected, self.local.info(expected).size)
            self._hold(KIND_CONTENT, str(expected))
            return True

    def writer(
        self,
        ref: str,
        *,
        expected: Digest | None = None,
        total: int = 0,
        wait: bool = True,
        timeout: float | None = None,
    ) -> NamespacedWriter:
        def exists() -> AlreadyExistsError:
            return AlreadyExistsError(
                f"content {expected}: already exists in namespace {self.namespace} (ingest ref {ref})"
            )

        # The blob may appear (another namespace commits it) or vanish (GC) between our look and the local
        # store's: look again, a few times, rather than answer AlreadyExists for a blob we cannot see.
        for _ in range(3):
            if expected is not None and self._claim_existing(expected):
                raise exists()
            try:
                local = self.local.writer(
                    self._local_ref(ref), expected=expected, total=total, wait=wait, timeout=timeout
                )
            except AlreadyExistsError:
                continue
            break
        else:
            raise exists()
        try:
            self._hold(KIND_INGEST, ref)
        except BaseException:
            local.close()
            raise
        return NamespacedWriter(self, ref, local)

    # -- IngestManager -----------------------------------------------------------------------------------

    def _status(self, status: Status) -> Status | None:
        prefix = self._local_ref("")
        if not status.ref.startswith(prefix):
            return None
        return Status(
            ref=status.ref[len(prefix):],
            offset=status.offset,
            total=status.total,
            expected=status.expected,
            started_at=status.started_at,
            updated_at=status.updated_at,
        )

    def status(self, ref: str) -> Status:
        status = self._status(self.local.status(self._local_ref(ref)))
        assert status is not None
        return status

    def list_statuses(self) -> list[Status]:
        return [s for s in map(self._status, self.local.list_statuses()) if s is not None]

    def abort(self, ref: str) -> None:
        self.local.abort(self._local_ref(ref))


class NamespacedWriter:
    """A ``Writer`` whose commit also records the blob (with labels) in its namespace."""

    def __init__(self, store: NamespacedStore, ref: str, local: LocalWriter) -> None:
        self._store = store
        self._ref = ref
        self._local = local

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def offset(self) -> int:
        return self._local.offset

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._local.write(data)

    def digest(self) -> Digest:
        """See ``LocalWriter.digest``."""
        return self._local.digest()

    def open_reader(self) -> int:
        """See ``LocalWriter.open_reader``."""
        return self._local.open_reader()

    def status(self) -> Status:
        status = self._store._status(self._local.status())
        assert status is not None
        return status

    def truncate(self, size: int) -> None:
        self._local.truncate(size)

    def commit(self, size: int, expected: Digest, labels: Mapping[str, str] | None = None) -> Digest:
        """Verify (outside any transaction: hashing and fsync may take a while), then in one transaction
        move the blob into place and insert its row with ``labels`` (set on the row when it exists)."""
        checked = validate_labels(labels or {}, f"content {expected}")
        self._local.verify(size, expected)
        store = self._store
        with store.db.transaction():
            self._local.commit(size, expected)
            store.records.add(expected, store.local.info(expected).size, checked)
            store._hold(KIND_CONTENT, str(expected))
        return expected

    def close(self) -> None:
        self._local.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
