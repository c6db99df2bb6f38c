"""The verbs common to snapshotters that keep their data in local directories (native, overlayfs)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from cargohold.errors import FailedPreconditionError, InvalidArgumentError
from cargohold.metadata.db import DEFAULT_NAMESPACE, MetadataDB
from cargohold.snapshots.base import Info, Kind, Mount, Usage
from cargohold.snapshots.dirs import Scratch, disk_usage
from cargohold.snapshots.storage import Record, SnapshotStore


class LocalSnapshotter:
    """Implements ``Snapshotter`` on a ``SnapshotStore``; subclasses say how a snapshot directory is laid out
    (``_populate``) and mounted (``_mounts``).

    Every snapshot directory holds ``fs`` (the tree, or the overlay upper dir); ``usage`` measures ``fs``.
    """

    name: str = ""
    remote: bool = False
    capabilities: frozenset[str] = frozenset()
    """Extensions beyond containerd's interface: "rebase" = ``commit(..., parent=...)`` is supported."""

    def __init__(
        self, root: Path | str, db: MetadataDB, namespace: str = DEFAULT_NAMESPACE, *, remote: bool = False
    ) -> None:
        self.root = Path(root)
        self.db = db
        self.namespace = namespace
        self.remote = remote
        self.store = SnapshotStore(self.root / "snapshots" / self.name, db, namespace, self.name)
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, namespace={self.namespace!r})"

    def _open(self) -> SnapshotStore:
        if self._closed:
            raise FailedPreconditionError(f"{self.name} snapshotter for namespace {self.namespace} is closed")
        return self.store

    # --- subclass hooks --------------------------------------------------------------------------------

    def _populate(self, scratch: Scratch, kind: Kind, parents: list[Record]) -> None:
        raise NotImplementedError

    def _mounts(self, rec: Record, parents: list[Record]) -> list[Mount]:
        raise NotImplementedError

    # --- helpers ---------------------------------------------------------------------------------------

    def fs_path(self, rec: Record) -> Path:
        return self.store.path(rec.id) / "fs"

    def snapshot_dir(self, key: str) -> Path:
        """The directory holding snapshot ``key`` (ROOT/snapshots/NAME/snapshots/ID)."""
        return self.store.path(self._open().get(key).id)

    # --- Snapshotter -----------------------------------------------------------------------------------

    def stat(self, key: str) -> Info:
        return self._open().get(key).info

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        return self._open().update(info, fieldpaths)

    def usage(self, key: str) -> Usage:
        return disk_usage(self.fs_path(self._open().get(key)))

    def mounts(self, key: str) -> list[Mount]:
        chain = self._open().chain(key)
        if chain[0].info.kind is Kind.COMMITTED:
            raise FailedPreconditionError(
                f"snapshot {key} is committed: only active snapshots and views mount"
            )
        return self._mounts(chain[0], chain[1:])

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        def populate(scratch: Scratch, parents: list[Record]) -> None:
            self._populate(scratch, kind, parents)

        chain = self._open().create(key, parent, kind, labels, populate)
        return self._mounts(chain[0], chain[1:])

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def commit(
        self, name: str, key: str, labels: Mapping[str, str] | None = None, *, parent: str | None = None
    ) -> None:
        """containerd's Commit; ``parent`` (an extension, only with the "rebase" capability) re-parents the
        committed snapshot onto committed ``parent``, so layers can be prepared without parents, filled in
        parallel and chained at commit."""
        store = self._open()
        if parent is not None and "rebase" not in self.capabilities:
            raise InvalidArgumentError(
                f"commit of snapshot {key} with parent {parent}: the {self.name} snapshotter cannot rebase"
            )
        store.commit(name, key, labels, parent)

    def remove(self, key: str) -> None:
        self._open().remove(key)

    def walk(self, *filters: str) -> Iterator[Info]:
        return self._open().walk(filters)

    def cleanup(self) -> None:
        """containerd's Cleaner: delete directories no snapshot owns any more (left by removes or creates
        that a crash interrupted); ``remove`` itself deletes a snapshot's directory at once."""
        self._open().cleanup()

    def close(self) -> None:
        self._closed = True
