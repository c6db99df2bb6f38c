"""The CRI gRPC server: ``runtime.v1.ImageService`` and ``RuntimeService.Version`` on a unix socket.

Every RPC runs on a worker thread against one ``Client`` (namespace ``k8s.io`` by default). cargohold's error
kinds become gRPC status codes through ``cargohold.cri.errors.GRPC_CODES``; anything else is INTERNAL and logged.
The socket is created with mode 0660; a stale socket (nobody listening) is replaced, a live one is an error.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from cargohold import __version__, grpcserve
from cargohold.client import Client
from cargohold.cri import images as criimages
from cargohold.cri.errors import grpc_code
from cargohold.cri.gcloop import GCScheduler
from cargohold.cri.proto import api_pb2 as pb
from cargohold.cri.proto import api_pb2_grpc as pb_grpc
from cargohold.diff.worker import shared_pool
from cargohold.errors import (
    InvalidArgumentError,
    NotFoundError,
)

log = logging.getLogger(__name__)

CRI_NAMESPACE = "k8s.io"
"""The namespace kubelet's images live in, as with containerd."""
KUBE_API_VERSION = "0.1.0"
RUNTIME_NAME = "cargohold"
RUNTIME_API_VERSION = "v1"
STREAM_BATCH = 100

_rpc = grpcserve.unary("CRI", grpc_code, grpc.StatusCode.INTERNAL)
_stream = grpcserve.stream("CRI", grpc_code, grpc.StatusCode.INTERNAL)


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
        self._unix = grpcserve.UnixServer(socket_path, max_workers=max_workers, thread_name="cri")
        self.gc = GCScheduler(client.gc)
        """The background gc that ``RemoveImage`` requests (``gc.wait_idle()`` waits for it)."""

    @property
    def socket_path(self) -> Path:
        return self._unix.socket_path

    @property
    def address(self) -> str:
        """The gRPC target of the socket (``unix:///path``)."""
        return self._unix.address

    def start(self) -> None:
        """Bind the socket (mode 0660) and serve; a socket another process serves is refused, a stale one
        replaced."""

        def register(server: grpc.Server) -> None:
            # The generated *_pb2_grpc module has no type hints (grpcio-tools writes no stub for it).
            pb_grpc.add_ImageServiceServicer_to_server(ImageService(self.client, self.gc), server)  # type: ignore[no-untyped-call]
            pb_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(), server)  # type: ignore[no-untyped-call]

        # The layer apply workers start with the server (not with the first pull that applies a layer), so the
        # server's processes and file descriptors are from the start what they stay.
        shared_pool().prestart()
        self.gc.start()
        try:
            self._unix.start(register)
        except BaseException:
            self.gc.stop()
            raise
        log.info("CRI image service on %s (namespace %s)", self.address, self.client.namespace)

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving (RPCs in flight get ``grace`` seconds, then are cancelled; their handlers are waited
        for) and remove the socket. A server that never bound the socket leaves the path alone: it may be
        another's."""
        self._unix.stop(grace)
        self.gc.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve(client: Client, socket_path: Path | str, *, signals: Sequence[signal.Signals] = (
        signal.SIGTERM, signal.SIGINT), ready: Callable[[CRIServer], None] | None = None) -> None:
    """Serve until one of ``signals`` arrives (main thread only), then stop and remove the socket."""

    def start() -> CRIServer:
        server = CRIServer(client, socket_path)
        server.start()
        return server

    grpcserve.run_until_signalled(start, grace=5.0, signals=signals, ready=ready)
