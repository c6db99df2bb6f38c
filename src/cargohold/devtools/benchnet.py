"""A slow network for the bench: a TCP proxy on 127.0.0.1 that forwards to a loopback upstream with every
connection's bytes (both directions) drawn from one shared token bucket, so N parallel downloads share the
rate as on a real link.

    with RateLimitedProxy(("127.0.0.1", registry_port), rate=40e6) as proxy:
        ... fetch http://127.0.0.1:{proxy.port}/v2/...
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Self

CHUNK = 16 << 10


class TokenBucket:
    """``rate`` bytes per second with at most ``burst`` bytes ahead. ``take`` reserves and sleeps off any debt,
    so concurrent takers are served in turn and the long-run rate holds exactly."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(CHUNK, int(rate / 50))  # 20 ms worth
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0:
            time.sleep(debt / self.rate)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class RateLimitedProxy:
    """Listens on 127.0.0.1 (an ephemeral port unless given); each accepted connection is forwarded to
    ``upstream`` (a loopback address) by two threads, one per direction, sharing the bucket."""

    def __init__(self, upstream: tuple[str, int], rate: float, *, port: int = 0) -> None:
        if not _is_loopback(upstream[0]):
            raise ValueError(f"upstream {upstream[0]} is not a loopback address")
        self.upstream = upstream
        self.bucket = TokenBucket(rate)
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.bytes = 0

    def start(self) -> Self:
        t = threading.Thread(target=self._accept, name="bench-proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            for src, dst in ((client, server), (server, client)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                self.bucket.take(len(data))
                dst.sendall(data)
                with self._lock:
                    self.bytes += len(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass
            self._socks.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
