"""The CRI gRPC server: ``runtime.v1.ImageService`` and ``RuntimeService.Version`` on a unix socket.

Every RPC runs on a worker thread against one ``Client`` (namespace ``k8s.io`` by default). cargohold's error
kinds become gRPC status codes through ``cargohold.cri.errors.GRPC_CODES``; anything else is INTERNAL and logged.
The socket is created with mode 0660; a stale socket (nobody listening) is replaced, a live one is an error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

import grpc

from cargohold import __version__
from cargohold.client import Client
from cargohold.cri import images as criimages
from cargohold.cri.errors import grpc_code
from cargohold.cri.gcloop import GCScheduler
from cargohold.cri.proto import api_pb2 as pb
from cargohold.cri.proto import api_pb2_grpc as pb_grpc
from cargohold.errors import (
    AlreadyExistsError,
    CargoholdError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)

log = logging.getLogger(__name__)

CRI_NAMESPACE = "k8s.io"
"""The namespace kubelet's images live in, as with containerd."""
KUBE_API_VERSION = "0.1.0"
RUNTIME_NAME = "cargohold"
RUNTIME_API_VERSION = "v1"
SOCKET_MODE = 0o660
STREAM_BATCH = 100
# Linux's sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107

R = TypeVar("R")


def _rpc(method: Callable[..., R]) -> Callable[..., R]:
    """Run an RPC body; cargohold errors abort with their status code, other exceptions with INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return method(self, request, context)
        except CargoholdError as exc:
            context.abort(grpc_code(exc), str(exc))
        except Exception as exc:
            log.exception("CRI %s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def _stream(method: Callable[..., Iterator[R]]) -> Callable[..., Iterator[R]]:
    """``_rpc`` for server-streaming RPCs: errors raised while producing items abort the stream."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[R]:
        try:
            yield from method(self, request, context)
        except CargoholdError as exc:
            context.abort(grpc_code(exc), str(exc))
        except Exception as exc:
            log.exception("CRI %s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {type(exc).__name__}: {exc}")

    return wrapper


class ImageService(pb_grpc.ImageServiceServicer):
    """CRI's image service on a client, as containerd's CRI plugin answers it."""

    def __init__(self, client: Client, gc: GCScheduler) -> None:
        self.client = client
        self._gc = gc

    def _matching(self, flt: pb.ImageFilter | None) -> list[pb.Image]:
        wanted = flt.image.image if flt is not None and flt.HasField("image") else ""
        if wanted:
            try:
                found = [self.client.runtime_image(wanted)]
            except NotFoundError:
                found = []
        else:
            found = self.client.runtime_images()
        return [criimages.to_cri_image(self.client, img) for img in found]

    @_rpc
    def ListImages(self, request: pb.ListImagesRequest, context: grpc.ServicerContext) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=self._matching(request.filter if request.HasField("filter") else None))

    @_stream
    def StreamImages(self, request: pb.StreamImagesRequest, context: grpc.ServicerContext
                     ) -> Iterator[pb.StreamImagesResponse]:
        found = self._matching(request.filter if request.HasField("filter") else None)
        for start in range(0, len(found), STREAM_BATCH):
            yield pb.StreamImagesResponse(images=found[start:start + STREAM_BATCH])

    @_rpc
    def ImageStatus(self, request: pb.ImageStatusRequest, context: grpc.ServicerContext) -> pb.ImageStatusResponse:
        name = request.image.image
        if not name:
            raise InvalidArgumentError("ImageStatus: empty image")
        try:
            img = self.client.runtime_image(name)
        except NotFoundError:
            return pb.ImageStatusResponse()  # unknown: no image, no error (kubelet then pulls)
        info = criimages.verbose_info(self.client, img) if request.verbose else {}
        return pb.ImageStatusResponse(image=criimages.to_cri_image(self.client, img), info=info)

    @_rpc
    def PullImage(self, request: pb.PullImageRequest, context: grpc.ServicerContext) -> pb.PullImageResponse:
        ref = request.image.image
        if not ref:
            raise InvalidArgumentError("PullImage: empty image reference")
        handler = request.image.runtime_handler
        if not handler and request.HasField("sandbox_config"):
            handler = request.sandbox_config.annotations.get(criimages.RUNTIME_HANDLER_ANNOTATION, "")
        auth = criimages.pull_auth(request.auth) if request.HasField("auth") else None
        result = self.client.pull_for_runtime(ref, handler, auth=auth)
        image_id = self.client.resolve_manifest(result.image.name).manifest.config.digest
        log.info("pulled %s for runtime handler %r: image id %s", result.image.name, handler, image_id)
        return pb.PullImageResponse(image_ref=str(image_id))

    @_rpc
    def RemoveImage(self, request: pb.RemoveImageRequest, context: grpc.ServicerContext) -> pb.RemoveImageResponse:
        name = request.image.image
        if not name:
            raise InvalidArgumentError("RemoveImage: empty image")
        removed = self.client.remove_runtime_image(name)
        if removed:
            # The content and snapshots go in a background gc (coalesced, one at a time): kubelet's image GC
            # removes images in bursts, and a full gc per call would serialise them behind it.
            self._gc.request()
        return pb.RemoveImageResponse()

    @_rpc
    def ImageFsInfo(self, request: pb.ImageFsInfoRequest, context: grpc.ServicerContext) -> pb.ImageFsInfoResponse:
        usages = criimages.image_filesystems(self.client)
        return pb.ImageFsInfoResponse(image_filesystems=[criimages.to_fs_usage(u) for u in usages])


class RuntimeService(pb_grpc.RuntimeServiceServicer):
    """The runtime service's Version; cargohold runs no containers, so nothing else."""

    @_rpc
    def Version(self, request: pb.VersionRequest, context: grpc.ServicerContext) -> pb.VersionResponse:
        return pb.VersionResponse(version=KUBE_API_VERSION, runtime_name=RUNTIME_NAME, runtime_version=__version__,
                                  runtime_api_version=RUNTIME_API_VERSION)


class CRIServer:
    """The CRI services of ``client`` on the unix socket ``socket_path``; ``start``, then ``stop``."""

    def __init__(self, client: Client, socket_path: Path | str, *, max_workers: int = 8) -> None:
        self.client = client
        self.socket_path = Path(socket_path).absolute()
        self.max_workers = max_workers
        self._server: grpc.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._bound = False
        self.gc = GCScheduler(client.gc)
        """The background gc that ``RemoveImage`` requests (``gc.wait_idle()`` waits for it)."""

    @property
    def address(self) -> str:
        """The gRPC target of the socket (``unix:///path``)."""
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        """Bind the socket (mode 0660) and serve."""
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise InvalidArgumentError(f"socket {self.socket_path}: path longer than {MAX_SOCKET_PATH} bytes")
        if self._server is not None:
            raise FailedPreconditionError(f"socket {self.socket_path}: this server is running already")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_socket(self.socket_path)
        # Ours, not grpc's: grpc never shuts its pool down, and each worker thread holds a database connection.
        self._pool = futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="cri")
        self._server = server = grpc.server(self._pool)
        try:
            # The generated *_pb2_grpc module has no type hints (grpcio-tools writes no stub for it).
            pb_grpc.add_ImageServiceServicer_to_server(ImageService(self.client, self.gc), server)  # type: ignore[no-untyped-call]
            pb_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(), server)  # type: ignore[no-untyped-call]
            # The socket is created by the bind below: a umask keeps it from ever being wider than 0660.
            old = os.umask(0o117)
            try:
                port = server.add_insecure_port(self.address)
            except RuntimeError as exc:
                raise UnavailableError(f"socket {self.socket_path}: cannot listen: {exc}") from None
            finally:
                os.umask(old)
            if not port:
                raise UnavailableError(f"socket {self.socket_path}: cannot listen")
            self._bound = True
            os.chmod(self.socket_path, SOCKET_MODE)
            self.gc.start()
            server.start()
        except BaseException:
            self.stop(grace=None)
            raise
        log.info("CRI image service on %s (namespace %s)", self.address, self.client.namespace)

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving (RPCs in flight get ``grace`` seconds, then are cancelled; their handlers are waited
        for) and remove the socket. A server that never bound the socket leaves the path alone: it may be
        another's."""
        server, pool, self._server, self._pool = self._server, self._pool, None, None
        bound, self._bound = self._bound, False
        if server is not None:
            server.stop(grace).wait()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.gc.stop()
        if not bound:
            return
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _clear_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AlreadyExistsError(f"socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left by a server that died
        return
    except OSError as exc:
        raise UnavailableError(f"socket {path}: cannot tell whether it is in use: {exc}") from None
    finally:
        probe.close()
    raise AlreadyExistsError(f"socket {path}: another server is listening on it")


def serve(client: Client, socket_path: Path | str, *, signals: Sequence[signal.Signals] = (
        signal.SIGTERM, signal.SIGINT), ready: Callable[[CRIServer], None] | None = None) -> None:
    """Serve until one of ``signals`` arrives (main thread only), then stop and remove the socket."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        with CRIServer(client, socket_path) as server:
            if ready is not None:
                ready(server)
            while not stopping.wait(0.5):
                pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
