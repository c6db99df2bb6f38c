"""cargohold's snapshotters served to containerd: ``containerd.services.snapshots.v1.Snapshots`` on a unix socket.

containerd loads this as a proxy plugin (``[proxy_plugins.NAME] type = "snapshot" address = SOCKET``). What
containerd sends, and what this server therefore does:

- Keys arrive already made unique by containerd's metadata layer (``NS/ID/KEY``) and are stored as given, and
  so are labels (containerd passes ``containerd.io/snapshot.ref`` and ``containerd.io/snapshot/*`` through).
- One key space: every call lands in one cargohold namespace (``CONTAINERD_NAMESPACE`` unless configured),
  whatever ``containerd-namespace`` gRPC header it carries. containerd's garbage collector walks the plugin
  with no header at all and removes every snapshot its database lacks, while calls from inside containerd
  (its CRI plugin) carry their namespace: splitting by header would hide snapshots from the collector (leaks)
  or show it cargohold's own (data loss). The namespace is a separate one for that reason, and
  ``cargohold -n containerd snapshots ls`` shows what containerd made. The request's ``snapshotter`` field is
  containerd's name for the plugin and is ignored.
- Errors become the status codes containerd's errdefs reads back (one table: ``cargohold.snapshots.errors``).
- ``List`` reports every snapshot with its exact parent: containerd's garbage collector walks it and removes
  what its own database lacks, children first. ``Cleanup`` deletes directories no snapshot owns.
- ``Commit`` with ``parent`` (containerd 2.x, only when its config grants the plugin "rebase") re-parents the
  committed snapshot where the snapshotter can (overlayfs); elsewhere it is INVALID_ARGUMENT.

Every RPC runs on a worker thread; the metadata DB gives each thread its own SQLite connection.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import empty_pb2

from cargohold import grpcserve
from cargohold.errors import (
    InvalidArgumentError,
    UnavailableError,
)
from cargohold.metadata.db import MetadataDB
from cargohold.snapshots import known_snapshotters, open_snapshotter
from cargohold.snapshots.base import Info, Mount, Snapshotter
from cargohold.snapshots.errors import grpc_code
from cargohold.snapshots.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from cargohold.snapshots.proxy import MAX_MESSAGE_SIZE, from_info, to_info

log = logging.getLogger(__name__)

LIST_BATCH = 100
"""Infos per ``List`` response message (containerd's own server sends batches too)."""
DEFAULT_GRACE = 10.0
CONTAINERD_NAMESPACE = "containerd"
"""The cargohold namespace holding what containerd makes (containerd's namespaces are already in the keys)."""

R = TypeVar("R")


_rpc = grpcserve.unary("snapshots", grpc_code, grpc.StatusCode.UNKNOWN)


def _mounts(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
            for m in mounts]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """The snapshots API over the local snapshotter ``name`` under ``root`` (rows in ``db``), all calls in
    cargohold namespace ``namespace``."""

    def __init__(self, name: str, root: Path, db: MetadataDB, *, namespace: str = CONTAINERD_NAMESPACE,
                 list_batch: int = LIST_BATCH) -> None:
        if name not in known_snapshotters():
            raise InvalidArgumentError(
                f"unknown snapshotter {name!r} (known: {', '.join(known_snapshotters())})")
        if not namespace:
            raise InvalidArgumentError(f"snapshotter {name}: empty namespace to serve")
        self.name = name
        self.root = root
        self.db = db
        self.namespace = namespace
        self.list_batch = list_batch
        self._lock = threading.Lock()
        self._snapshotter: Snapshotter | None = None
        self._closed = False

    def snapshotter(self) -> Snapshotter:
        """The served snapshotter, opened on first use (opening cleans up after a crashed predecessor)."""
        with self._lock:
            if self._closed:
                raise UnavailableError(f"snapshotter {self.name}: the server is stopping")
            if self._snapshotter is None:
                self._snapshotter = open_snapshotter(self.name, self.root, self.db, self.namespace)
            return self._snapshotter

    def _sn(self, context: grpc.ServicerContext) -> Snapshotter:
        return self.snapshotter()

    def close(self) -> None:
        """Close the snapshotter; later calls are UNAVAILABLE."""
        with self._lock:
            self._closed = True
            sn, self._snapshotter = self._snapshotter, None
        if sn is not None:
            sn.close()

    # --- the RPCs ----------------------------------------------------------------------------------------

    @_rpc
    def Prepare(self, request: snapshots_pb2.PrepareSnapshotRequest, context: grpc.ServicerContext
                ) -> snapshots_pb2.PrepareSnapshotResponse:
        mounts = self._sn(context).prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def View(self, request: snapshots_pb2.ViewSnapshotRequest, context: grpc.ServicerContext
             ) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = self._sn(context).view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def Mounts(self, request: snapshots_pb2.MountsRequest, context: grpc.ServicerContext
               ) -> snapshots_pb2.MountsResponse:
        return snapshots_pb2.MountsResponse(mounts=_mounts(self._sn(context).mounts(request.key)))

    @_rpc
    def Commit(self, request: snapshots_pb2.CommitSnapshotRequest, context: grpc.ServicerContext
               ) -> empty_pb2.Empty:
        sn = self._sn(context)
        labels = dict(request.labels)
        if request.parent:  # proto3: "" is "not sent", as containerd reads it
            commit: Any = sn.commit  # the parent keyword is the local snapshotters' extension
            if "rebase" not in getattr(sn, "capabilities", frozenset()):
                raise InvalidArgumentError(
                    f"commit of snapshot {request.key} with parent {request.parent}: the {self.name} "
                    "snapshotter cannot rebase")
            commit(request.name, request.key, labels, parent=request.parent)
        else:
            sn.commit(request.name, request.key, labels)
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: snapshots_pb2.RemoveSnapshotRequest, context: grpc.ServicerContext
               ) -> empty_pb2.Empty:
        self._sn(context).remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: snapshots_pb2.StatSnapshotRequest, context: grpc.ServicerContext
             ) -> snapshots_pb2.StatSnapshotResponse:
        return snapshots_pb2.StatSnapshotResponse(info=from_info(self._sn(context).stat(request.key)))

    @_rpc
    def Update(self, request: snapshots_pb2.UpdateSnapshotRequest, context: grpc.ServicerContext
               ) -> snapshots_pb2.UpdateSnapshotResponse:
        wanted = to_info(request.info)
        info = Info(key=wanted.key, labels=wanted.labels)
        updated = self._sn(context).update(info, list(request.update_mask.paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=from_info(updated))

    def List(self, request: snapshots_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
             ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        # Read (and filters parsed) before the first message: errors abort the call cleanly, and a client
        # that goes away mid-stream only stops this generator (grpc closes it; nothing is held open).
        try:
            infos = [from_info(i) for i in self._sn(context).walk(*request.filters)]
        except Exception as exc:
            grpcserve.abort(context, "snapshots List", exc, grpc_code, grpc.StatusCode.UNKNOWN)
            return
        for start in range(0, len(infos), self.list_batch):
            if not context.is_active():
                log.debug("List: client went away after %d of %d snapshots", start, len(infos))
                return
            yield snapshots_pb2.ListSnapshotsResponse(info=infos[start:start + self.list_batch])

    @_rpc
    def Usage(self, request: snapshots_pb2.UsageRequest, context: grpc.ServicerContext
              ) -> snapshots_pb2.UsageResponse:
        usage = self._sn(context).usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(self, request: snapshots_pb2.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        sn = self._sn(context)
        cleanup = getattr(sn, "cleanup", None)
        if cleanup is not None:
            cleanup()
        return empty_pb2.Empty()


class SnapshotsServer:
    """The snapshots service of snapshotter ``name`` under ``root`` on the unix socket ``socket_path``."""

    def __init__(self, name: str, root: Path | str, socket_path: Path | str, *,
                 namespace: str = CONTAINERD_NAMESPACE, max_workers: int = 8, list_batch: int = LIST_BATCH) -> None:
        self.name = name
        self.namespace = namespace
        self.root = Path(root).absolute()
        self.list_batch = list_batch
        self._db: MetadataDB | None = None
        self._service: SnapshotsService | None = None
        self._unix = grpcserve.UnixServer(socket_path, max_workers=max_workers, thread_name="snapshots", options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
            ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
        ])

    @property
    def socket_path(self) -> Path:
        return self._unix.socket_path

    @property
    def address(self) -> str:
        """The gRPC target of the socket (``unix:///path``)."""
        return self._unix.address

    def start(self) -> None:
        """Bind the socket (mode 0660) and serve. A socket another process serves is an AlreadyExistsError; a
        stale one (nobody listening) is replaced."""
        self._unix.check()  # before the database is opened: a refused start touches nothing
        try:
            self._db = MetadataDB(self.root / "metadata.db")
            self._service = service = SnapshotsService(self.name, self.root, self._db, namespace=self.namespace,
                                                       list_batch=self.list_batch)
            # The generated *_pb2_grpc module has no type hints (grpcio-tools writes no stub for it).
            self._unix.start(lambda server: snapshots_pb2_grpc.add_SnapshotsServicer_to_server(  # type: ignore[no-untyped-call]
                service, server))
        except BaseException:
            self.stop(grace=None)
            raise
        log.info("snapshotter %s (root %s, namespace %s) on %s", self.name, self.root, self.namespace,
                 self.address)

    def stop(self, grace: float | None = DEFAULT_GRACE) -> None:
        """Stop accepting calls, give those in flight ``grace`` seconds (then cancel them and wait for their
        handlers), close the snapshotters and the DB, and remove the socket if this server bound it."""
        self._unix.stop(grace)
        service, db, self._service, self._db = self._service, self._db, None, None
        if service is not None:
            service.close()
        if db is not None:
            db.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve(name: str, root: Path | str, socket_path: Path | str, *, namespace: str = CONTAINERD_NAMESPACE,
          grace: float = DEFAULT_GRACE,
          signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
          ready: Callable[[SnapshotsServer], None] | None = None) -> None:
    """Serve until one of ``signals`` arrives (main thread only), then stop: calls in flight get ``grace``
    seconds, the socket is removed."""

    def start() -> SnapshotsServer:
        server = SnapshotsServer(name, root, socket_path, namespace=namespace)
        server.start()
        return server

    grpcserve.run_until_signalled(start, grace=grace, signals=signals, ready=ready)
