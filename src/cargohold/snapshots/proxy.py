"""The proxy snapshotter: containerd's Snapshotter spoken over its snapshots gRPC API on a unix socket.

This is containerd's ``snapshots/proxy`` client: each verb is one call of
``containerd.services.snapshots.v1.Snapshots`` (``Walk`` is the server-streamed ``List``), the namespace
travels in the ``containerd-namespace`` gRPC metadata, and every request carries the snapshotter name this
side configured (containerd sends its proxy plugin's name; servers built on containerd's
``contrib/snapshotservice``, stargz's among them, ignore it).

What containerd's metadata layer does before a proxy is reached, this client does itself with the local
snapshotters' own checks: labels go through ``metadata.content.validate_labels`` (the 4096-byte limit; for ``update``,
the labels its field paths apply) and filters through ``filters.parse_filters``, so those errors are raised at
the call and name the key or filter. A plain remote snapshotter has one key space whatever the namespace
(stargz ignores the namespace header; containerd prefixes keys per namespace in its metadata DB, a layer we do
not have in front). With ``namespaced_keys`` this client does that part itself: every key it sends (key,
parent, commit name, and the ``containerd.io/snapshot.ref`` label a remote snapshotter commits under) is
``<namespace>/<key>``, answers are stripped back, and ``walk`` lists only this namespace's snapshots, so two
cargohold namespaces never collide in one daemon.

gRPC status codes map back onto cargohold's error kinds in one table (``cargohold.snapshots.errors``, shared
with the server); every error names the key and the socket.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NoReturn

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from cargohold.errors import (
    CargoholdError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from cargohold.metadata.content import validate_labels
from cargohold.metadata.labels import SNAPSHOT_REF
from cargohold.snapshots.base import Info, Kind, Mount, Usage
from cargohold.snapshots.errors import error_kind
from cargohold.snapshots.filters import info_fields, parse_filters
from cargohold.snapshots.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc

NAMESPACE_HEADER = "containerd-namespace"
"""gRPC metadata key containerd's clients put the namespace in (containerd's namespaces.GRPCHeader)."""

MAX_MESSAGE_SIZE = 16 << 20  # containerd's default gRPC message limit
MAX_RECONNECT_BACKOFF_MS = 3000  # as containerd's proxy plugins: a restarted daemon is seen again within 3 s

_TO_KIND = {
    snapshots_pb2.VIEW: Kind.VIEW,
    snapshots_pb2.ACTIVE: Kind.ACTIVE,
    snapshots_pb2.COMMITTED: Kind.COMMITTED,
}
_FROM_KIND = {kind: value for value, kind in _TO_KIND.items()}


def socket_target(address: str) -> str:
    """The gRPC target for a unix socket given as a path, ``unix:PATH`` or ``unix://PATH`` (made absolute)."""
    path = address.removeprefix("unix://") if address.startswith("unix://") else address.removeprefix("unix:")
    if not path:
        raise InvalidArgumentError("proxy snapshotter: empty socket address")
    return "unix://" + os.path.abspath(path)


class ProxySnapshotter:
    """A ``Snapshotter`` served by another process over containerd's snapshots gRPC API.

    ``address`` is the unix socket (a path or ``unix://PATH``); ``name`` is what this side calls the
    snapshotter (sent as the requests' ``snapshotter`` field, used in errors and by the unpacker's locks);
    ``remote`` marks a lazy snapshotter the unpacker must not force-feed. ``timeout`` bounds each call
    (None: no deadline; a remote ``prepare`` may take a while to fetch layer metadata). ``namespaced_keys``
    prefixes keys with the namespace on the wire (see the module docstring), for daemons that ignore it.
    """

    capabilities: frozenset[str] = frozenset()
    """What the daemon supports beyond containerd 1.6's interface, as configured (containerd's proxy plugin
    ``capabilities``): "rebase" lets ``commit`` send a parent."""

    def __init__(
        self, name: str, address: str, *, namespace: str, remote: bool = False, timeout: float | None = None,
        capabilities: Iterable[str] = (), namespaced_keys: bool = False,
    ) -> None:
        if not name:
            raise InvalidArgumentError(f"proxy snapshotter at {address}: empty name")
        if not namespace:
            raise InvalidArgumentError(f"proxy snapshotter {name}: empty namespace")
        self.name = name
        self.remote = remote
        self.namespace = namespace
        self.address = socket_target(address)
        self.timeout = timeout
        self.capabilities = frozenset(capabilities)
        self.namespaced_keys = namespaced_keys
        # containerd's namespace names have no "/", so "<namespace>/" cannot be the start of another's keys.
        self._prefix = f"{namespace}/" if namespaced_keys else ""
        self._metadata = ((NAMESPACE_HEADER, namespace),)
        self._channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ],
        )
        self._stub: Any = snapshots_pb2_grpc.SnapshotsStub(self._channel)  # type: ignore[no-untyped-call]
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProxySnapshotter({self.name!r}, {self.address!r}, namespace={self.namespace!r})"

    # --- plumbing --------------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"snapshotter {self.name} at {self.address}"

    def _closed_error(self, what: str) -> FailedPreconditionError:
        return FailedPreconditionError(f"{what}: {self._where} is closed")

    def _call(self, method: str, request: Any, what: str) -> Any:
        if self._closed:
            raise self._closed_error(what)
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            self._raise(exc, what)
        except ValueError:  # grpc's "Cannot invoke RPC on closed channel!": close() ran on another thread
            if self._closed:
                raise self._closed_error(what) from None
            raise

    def _raise(self, exc: grpc.RpcError, what: str) -> NoReturn:
        if self._closed:  # a call in flight when close() ran on another thread is cancelled by grpc
            raise self._closed_error(what) from None
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        detail = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        kind, suffix = error_kind(code)
        if suffix:
            detail = detail.removesuffix(": " + suffix)
        if kind is UnavailableError:
            raise UnavailableError(f"{what}: {self._where} unavailable: {detail}") from None
        if kind is CargoholdError:
            detail = f"{code.name}: {detail}"
        raise kind(f"{what}: {detail} ({self._where})") from None

    def _out(self, key: str) -> str:
        """A key (or parent, "" for none) as the daemon knows it."""
        return self._prefix + key if key and self._prefix else key

    def _out_labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        out = dict(labels)
        if self._prefix and out.get(SNAPSHOT_REF):
            out[SNAPSHOT_REF] = self._prefix + out[SNAPSHOT_REF]
        return out

    def _mine(self, key: str) -> bool:
        return key.startswith(self._prefix)

    def _in(self, info: snapshots_pb2.Info) -> Info:
        """A daemon's Info as this namespace sees it (prefixes stripped)."""
        got = to_info(info)
        if not self._prefix:
            return got
        labels = dict(got.labels)
        if labels.get(SNAPSHOT_REF, "").startswith(self._prefix):
            labels[SNAPSHOT_REF] = labels[SNAPSHOT_REF][len(self._prefix):]
        return replace(got, key=got.key.removeprefix(self._prefix), name=got.key.removeprefix(self._prefix),
                       parent=got.parent.removeprefix(self._prefix), labels=labels)

    # --- Snapshotter -----------------------------------------------------------------------------------

    def stat(self, key: str) -> Info:
        resp = self._call("Stat", snapshots_pb2.StatSnapshotRequest(snapshotter=self.name, key=self._out(key)),
                          f"stat snapshot {key}")
        return self._in(resp.info)

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        key = info.key
        what = f"update snapshot {key}"
        if not key:
            raise InvalidArgumentError(f"snapshot update: key must not be empty ({self._where})")
        validate_labels(_applied_labels(info, fieldpaths), what)
        wire = replace(info, key=self._out(key), name=self._out(key), parent=self._out(info.parent),
                       labels=self._out_labels(info.labels))
        request = snapshots_pb2.UpdateSnapshotRequest(
            snapshotter=self.name,
            info=from_info(wire),
            update_mask=field_mask_pb2.FieldMask(paths=list(fieldpaths)),
        )
        return self._in(self._call("Update", request, what).info)

    def usage(self, key: str) -> Usage:
        resp = self._call("Usage", snapshots_pb2.UsageRequest(snapshotter=self.name, key=self._out(key)),
                          f"usage of snapshot {key}")
        return Usage(size=resp.size, inodes=resp.inodes)

    def mounts(self, key: str) -> list[Mount]:
        resp = self._call("Mounts", snapshots_pb2.MountsRequest(snapshotter=self.name, key=self._out(key)),
                          f"mounts of snapshot {key}")
        return to_mounts(resp.mounts)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        what = f"prepare snapshot {key}" + (f" on {parent}" if parent else "")
        if not key:
            raise InvalidArgumentError(f"snapshot key must not be empty ({self._where})")
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.name, key=self._out(key), parent=self._out(parent),
            labels=self._out_labels(validate_labels(labels or {}, what)),
        )
        return to_mounts(self._call("Prepare", request, what).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        what = f"view snapshot {key}" + (f" of {parent}" if parent else "")
        if not key:
            raise InvalidArgumentError(f"snapshot key must not be empty ({self._where})")
        request = snapshots_pb2.ViewSnapshotRequest(
            snapshotter=self.name, key=self._out(key), parent=self._out(parent),
            labels=self._out_labels(validate_labels(labels or {}, what)),
        )
        return to_mounts(self._call("View", request, what).mounts)

    def commit(
        self, name: str, key: str, labels: Mapping[str, str] | None = None, *, parent: str | None = None
    ) -> None:
        """containerd's Commit; ``parent`` (only with the "rebase" capability) re-parents the committed
        snapshot, as containerd 2.x's ``CommitSnapshotRequest.parent``."""
        what = f"commit snapshot {key} as {name}"
        if not name:
            raise InvalidArgumentError(f"commit of snapshot {key}: name must not be empty ({self._where})")
        if parent is not None and "rebase" not in self.capabilities:
            raise InvalidArgumentError(
                f"commit of snapshot {key} with parent {parent}: {self._where} is not configured to rebase"
            )
        request = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.name, name=self._out(name), key=self._out(key),
            labels=self._out_labels(validate_labels(labels or {}, what)), parent=self._out(parent or ""),
        )
        self._call("Commit", request, what)

    def remove(self, key: str) -> None:
        self._call("Remove", snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.name, key=self._out(key)),
                   f"remove snapshot {key}")

    def walk(self, *filters: str) -> Iterator[Info]:
        """Matching snapshots by key, read now: the stream is drained at the call, so bad filters (parsed
        here first, as containerd's server would) and transport errors raise here, not at the first next().
        With namespaced keys the daemon lists everything and the filters apply here, to this namespace's
        snapshots as it sees them (a name or parent filter means the unprefixed key)."""
        parsed = parse_filters(filters)
        what = "list snapshots" + (f" matching {list(filters)}" if any(filters) else "")
        sent = [] if self._prefix else list(filters)
        stream = self._call("List", snapshots_pb2.ListSnapshotsRequest(snapshotter=self.name, filters=sent), what)
        infos: list[Info] = []
        try:
            for resp in stream:
                infos.extend(self._in(i) for i in resp.info if self._mine(i.name))
        except grpc.RpcError as exc:
            self._raise(exc, what)
        if self._prefix:
            infos = [i for i in infos if parsed.match(info_fields(i))]
        return iter(sorted(infos, key=lambda i: i.key))

    def cleanup(self) -> None:
        """Ask the daemon to free the disk space of removed snapshots (containerd's Cleaner)."""
        self._call("Cleanup", snapshots_pb2.CleanupRequest(snapshotter=self.name), "cleanup")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._channel.close()


# --- conversions -------------------------------------------------------------------------------------------


def _applied_labels(info: Info, fieldpaths: Sequence[str]) -> Mapping[str, str]:
    """The labels an update with ``fieldpaths`` sets (containerd's metadata layer validates those): all of
    ``info.labels`` for no paths or "labels", else the value (or deletion) of each "labels.KEY"."""
    if not fieldpaths or "labels" in fieldpaths:
        return info.labels
    prefix = "labels."
    return {p[len(prefix):]: info.labels.get(p[len(prefix):], "") for p in fieldpaths if p.startswith(prefix)}


def _to_time(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _from_time(when: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def to_info(info: snapshots_pb2.Info) -> Info:
    return Info(
        key=info.name,
        parent=info.parent,
        # As containerd's proxy: anything not view or active (UNKNOWN included) is committed.
        kind=_TO_KIND.get(info.kind, Kind.COMMITTED),
        labels=dict(info.labels),
        created_at=_to_time(info.created_at),
        updated_at=_to_time(info.updated_at),
    )


def from_info(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=_FROM_KIND[info.kind],
        created_at=_from_time(info.created_at),
        updated_at=_from_time(info.updated_at),
        labels=dict(info.labels),
    )


def to_mounts(mounts: Sequence[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(type=m.type, source=m.source, target=m.target, options=tuple(m.options)) for m in mounts]
