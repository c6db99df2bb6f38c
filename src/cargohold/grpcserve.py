"""Serving gRPC on a unix socket: what the CRI server and the snapshots server share.

A ``UnixServer`` binds one socket (never wider than mode 0660, even for a moment), serves on a worker pool it owns
(grpc never shuts its own pool down, and every worker thread may hold a database connection), and on ``stop``
gives calls in flight a grace period, waits for their handlers and removes the socket it bound — never a path it
did not bind, which may be another server's. ``claim_socket`` refuses a socket some process serves and replaces
a stale one. ``unary``/``stream`` turn cargohold's error kinds into status codes at the boundary, with the table
each service passes; ``run_until_signalled`` keeps a server up until SIGTERM or SIGINT.
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
from types import FrameType
from typing import Any, Protocol, TypeVar

import grpc

from cargohold.errors import (
    AlreadyExistsError,
    CargoholdError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
MAX_SOCKET_PATH = 107  # Linux's sockaddr_un.sun_path holds 108 bytes, the terminating NUL included

R = TypeVar("R")
CodeFn = Callable[[BaseException], grpc.StatusCode]


def claim_socket(path: Path) -> None:
    """Make ``path`` free for a new socket: absent is fine, a stale socket is removed; a socket some process
    accepts connections on, or a file that is not a socket, is an AlreadyExistsError naming the path."""
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
    raise AlreadyExistsError(f"socket {path}: another process is serving on it (a server is listening there)")


class UnixServer:
    """One gRPC server on the unix socket ``socket_path``: ``start(register)``, then ``stop``."""

    def __init__(self, socket_path: Path | str, *, max_workers: int, thread_name: str,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self.socket_path = Path(socket_path).absolute()
        self.max_workers = max_workers
        self.thread_name = thread_name
        self.options = list(options)
        self._server: grpc.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._bound = False

    @property
    def address(self) -> str:
        """The gRPC target of the socket (``unix:///path``)."""
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def check(self) -> None:
        """Refuse a path too long for a unix socket, a server already running, and a socket another process
        serves (a stale one is removed); make the socket's directory."""
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise InvalidArgumentError(f"socket {self.socket_path}: path longer than {MAX_SOCKET_PATH} bytes")
        if self._server is not None:
            raise FailedPreconditionError(f"socket {self.socket_path}: this server is running already")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        claim_socket(self.socket_path)

    def start(self, register: Callable[[grpc.Server], None]) -> None:
        """``check``, then bind the socket (mode 0660), let ``register`` add the services, and serve."""
        self.check()
        self._pool = futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=self.thread_name)
        self._server = server = grpc.server(self._pool, options=self.options)
        try:
            register(server)
            old = os.umask(0o117)  # the bind creates the socket: never wider than 0660, even for a moment
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
            server.start()
        except BaseException:
            self.stop(grace=None)
            raise

    def stop(self, grace: float | None) -> None:
        """Stop accepting calls, give those in flight ``grace`` seconds (then cancel them and wait for their
        handlers), and remove the socket if this server bound it."""
        server, pool, self._server, self._pool = self._server, self._pool, None, None
        bound, self._bound = self._bound, False
        if server is not None:
            server.stop(grace).wait()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bound:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)


def abort(context: grpc.ServicerContext, what: str, exc: Exception, code_for: CodeFn,
          unexpected: grpc.StatusCode) -> None:
    """Abort the call: a cargohold error with ``code_for(exc)`` and its message, anything else with
    ``unexpected`` (logged with its traceback as ``what`` failed)."""
    if isinstance(exc, CargoholdError):
        context.abort(code_for(exc), str(exc))
    log.exception("%s failed", what)
    context.abort(unexpected, f"{what.rsplit(' ', 1)[-1]}: {type(exc).__name__}: {exc}")


def unary(service: str, code_for: CodeFn, unexpected: grpc.StatusCode
          ) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate a unary RPC body: cargohold errors abort with ``code_for(error)``, anything else with
    ``unexpected`` (logged with its traceback)."""

    def decorate(method: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(method)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> R:
            try:
                return method(self, request, context)
            except Exception as exc:
                abort(context, f"{service} {method.__name__}", exc, code_for, unexpected)
            raise AssertionError("unreachable: context.abort raises")

        return wrapper

    return decorate


def stream(service: str, code_for: CodeFn, unexpected: grpc.StatusCode
           ) -> Callable[[Callable[..., Iterator[R]]], Callable[..., Iterator[R]]]:
    """``unary`` for server-streaming RPCs: errors raised while producing items abort the stream."""

    def decorate(method: Callable[..., Iterator[R]]) -> Callable[..., Iterator[R]]:
        @functools.wraps(method)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[R]:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                abort(context, f"{service} {method.__name__}", exc, code_for, unexpected)

        return wrapper

    return decorate


class Serving(Protocol):
    def stop(self, grace: float | None = ...) -> None: ...


S = TypeVar("S", bound=Serving)


def run_until_signalled(start: Callable[[], S], *, grace: float | None,
                        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
                        ready: Callable[[S], None] | None = None) -> None:
    """Start a server (``start`` returns it running) and serve until one of ``signals`` arrives (main thread
    only); then stop it, giving calls in flight ``grace`` seconds. The previous signal handlers come back."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        server = start()
        try:
            if ready is not None:
                ready(server)
            while not stopping.wait(0.5):
                pass
        finally:
            server.stop(grace)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
