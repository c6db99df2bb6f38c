"""The snapshotter seam: containerd's Snapshotter interface and the data it speaks in.

A snapshotter hands out filesystem trees by key. ``prepare`` makes a writable *active* snapshot (optionally on
top of a committed parent), ``view`` a read-only one, ``commit`` freezes an active snapshot under a name that
later snapshots can use as their parent. Callers never touch snapshot directories; they get a list of
``Mount`` records and mount them (see ``cargohold.snapshots.mount``).

The ten verbs map one for one onto containerd's gRPC ``containerd.services.snapshots.v1.Snapshots``
service, so a gRPC proxy implementation can sit behind the same Protocol.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Kind(enum.Enum):
    """What a snapshot is; values are containerd's names (also what the metadata DB stores)."""

    VIEW = "View"
    ACTIVE = "Active"
    COMMITTED = "Committed"

    @property
    def filter_name(self) -> str:
        """The lower-case spelling filters use (``kind==committed``), as containerd's adaptor."""
        return self.value.lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class Info:
    """One snapshot as the metadata DB knows it.

    ``key`` and ``name`` are the same string: containerd calls an active snapshot's handle its key and a
    committed snapshot's its name, and addresses both through one key space per namespace. ``name`` defaults
    to ``key`` so callers building an Info for ``update`` only need one of them.
    """

    key: str = ""
    parent: str = ""
    kind: Kind = Kind.ACTIVE
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime = _EPOCH
    updated_at: datetime = _EPOCH
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.key)
        elif not self.key:
            object.__setattr__(self, "key", self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Disk usage of the data a snapshot adds: bytes allocated (st_blocks * 512) and distinct inodes."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    """One mount, as containerd's mount.Mount: ``mount -t TYPE -o OPTIONS SOURCE TARGET/target``.

    ``target`` is a path relative to where the mount list is mounted ("" = the mount point itself).
    """

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


@runtime_checkable
class Snapshotter(Protocol):
    """containerd's Snapshotter. Keys of the local snapshotters are scoped to the namespace the instance was
    opened for; a proxy passes the namespace to its daemon, which may keep one key space for all (stargz does).

    Errors: ``NotFoundError`` (no such key/parent), ``AlreadyExistsError`` (key or commit name taken),
    ``FailedPreconditionError`` (remove of a snapshot with children, commit of a non-active snapshot,
    mounts of a committed one), ``InvalidArgumentError`` (empty key, parent not committed, bad filter or
    fieldpath).
    """

    name: str
    """Registered name, e.g. "native" or "overlayfs" (the directory under ROOT/snapshots/)."""
    remote: bool
    """True for lazy/remote snapshotters whose layers need not be unpacked locally; the unpacker reads it."""

    def stat(self, key: str) -> Info:
        """The Info of ``key``."""
        ...

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change labels of ``info.key``; ``fieldpaths`` like "labels", "labels.KEY"; empty = replace all.

        A label set to "" (or absent from ``info.labels`` for a "labels.KEY" path) is deleted.
        """
        ...

    def usage(self, key: str) -> Usage:
        """Space the snapshot itself uses (for overlay: the upper dir only)."""
        ...

    def mounts(self, key: str) -> list[Mount]:
        """Mounts that assemble an active snapshot or view."""
        ...

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create the writable active snapshot ``key`` on top of committed ``parent`` (or empty)."""
        ...

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create the read-only view ``key`` of committed ``parent``."""
        ...

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Freeze active ``key`` as committed ``name`` (``key`` stops existing) labelled ``labels``."""
        ...

    def remove(self, key: str) -> None:
        """Delete a snapshot that no other snapshot uses as parent, with its data."""
        ...

    def walk(self, *filters: str) -> Iterator[Info]:
        """All snapshots of the namespace matching any of ``filters`` (containerd filter syntax), by key."""
        ...

    def close(self) -> None:
        """Release resources; the instance must not be used afterwards."""
        ...
