"""A loopback HTTP/1.1 proxy in front of a registry that misbehaves on request.

Each client connection carries one request: the proxy forwards it upstream with ``Connection: close``,
relays the answer with ``Connection: close`` and closes, so response framing needs no parsing. Faults
match a method and a path regex and fire ``times`` times:

- ``cut_after=N``: relay the headers and N bytes of the body, then drop the connection;
- ``status=S``: answer S (with ``headers``/``body``) without asking the registry;
- ``strip_request_headers``: forward without those headers (e.g. ``Range``: a server that ignores it).

``requests`` records every request seen (method, path, query, headers) for assertions.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    fault: str = ""

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class Fault:
    path: re.Pattern[str]
    method: str | None = None
    times: int = 1
    cut_after: int | None = None
    stall_after: int | None = None  # send this many body bytes, then nothing for ``stall_seconds``, then close
    stall_seconds: float = 0.0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    strip_request_headers: tuple[str, ...] = ()
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self.path.search(path))

    def describe(self) -> str:
        if self.status is not None:
            return f"status {self.status}"
        if self.cut_after is not None:
            return f"cut after {self.cut_after}"
        if self.stall_after is not None:
            return f"stall after {self.stall_after}"
        return f"strip {','.join(self.strip_request_headers)}"


def _read_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    """Read until the end of an HTTP head; returns the head, leaves the rest in ``buf``."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf.extend(data)
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head


def _parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in lines:
        if ":" in line:
            name, _, value = line.partition(":")
            out.append((name.strip(), value.strip()))
    return out


class FaultProxy:
    """``FaultProxy("127.0.0.1:5000")``: listens on a free loopback port; ``host``/``url`` name it."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.faults: list[Fault] = []
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_fault(
        self,
        path: str,
        *,
        method: str | None = None,
        times: int = 1,
        cut_after: int | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        strip_request_headers: tuple[str, ...] = (),
        stall_after: int | None = None,
        stall_seconds: float = 0.0,
    ) -> Fault:
        """Misbehave on the next ``times`` requests whose path matches the regex ``path``."""
        fault = Fault(
            path=re.compile(path),
            method=method,
            times=times,
            cut_after=cut_after,
            stall_after=stall_after,
            stall_seconds=stall_seconds,
            status=status,
            headers=dict(headers or {}),
            body=body,
            strip_request_headers=tuple(h.lower() for h in strip_request_headers),
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def seen(self, method: str | None = None, path: str | None = None) -> list[SeenRequest]:
        """Requests seen so far, filtered by method and path regex."""
        with self._lock:
            reqs = list(self.requests)
        return [
            r
            for r in reqs
            if (method is None or r.method == method) and (path is None or re.search(path, r.path))
        ]

    # -- serving ---------------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self._stopped.is_set():
                client.close()
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits < fault.times and fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _serve(self, client: socket.socket) -> None:
        try:
            with client:
                client.settimeout(30)
                buf = bytearray()
                head = _read_head(client, buf)
                if head is None:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = _parse_headers(lines[1:])
                body = self._read_body(client, buf, headers)
                path, _, query = target.partition("?")
                fault = self._take_fault(method, path)
                seen = SeenRequest(
                    method=method,
                    path=path,
                    query=query,
                    headers={k.lower(): v for k, v in headers},
                    fault=fault.describe() if fault else "",
                )
                with self._lock:
                    self.requests.append(seen)
                if fault is not None and fault.status is not None:
                    self._answer(client, method, fault)
                    return
                self._forward(client, method, target, headers, body, fault)
        except OSError:
            return

    @staticmethod
    def _read_body(sock: socket.socket, buf: bytearray, headers: list[tuple[str, str]]) -> bytes:
        names = {k.lower(): v for k, v in headers}
        if names.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                while b"\r\n" not in buf:
                    buf.extend(sock.recv(65536))
                line_end = buf.index(b"\r\n")
                size = int(bytes(buf[:line_end]).split(b";")[0], 16)
                del buf[: line_end + 2]
                while len(buf) < size + 2:
                    buf.extend(sock.recv(65536))
                out.extend(buf[:size])
                del buf[: size + 2]
                if size == 0:
                    return bytes(out)
        length = int(names.get("content-length", "0") or 0)
        while len(buf) < length:
            data = sock.recv(65536)
            if not data:
                break
            buf.extend(data)
        return bytes(buf[:length])

    @staticmethod
    def _answer(client: socket.socket, method: str, fault: Fault) -> None:
        assert fault.status is not None
        reason = HTTPStatus(fault.status).phrase if fault.status in HTTPStatus._value2member_map_ else "Fault"
        lines = [
            f"HTTP/1.1 {fault.status} {reason}",
            f"Content-Length: {len(fault.body)}",
            "Connection: close",
        ]
        lines += [f"{k}: {v}" for k, v in fault.headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if method != "HEAD":
            data += fault.body
        client.sendall(data)

    def _forward(
        self,
        client: socket.socket,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        fault: Fault | None,
    ) -> None:
        drop = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length"}
        if fault is not None:
            drop |= set(fault.strip_request_headers)
        out = [f"{method} {target} HTTP/1.1"]
        out += [f"{k}: {v}" for k, v in headers if k.lower() not in drop]
        if body or method in ("POST", "PUT", "PATCH"):
            out.append(f"Content-Length: {len(body)}")
        out.append("Connection: close")
        with socket.create_connection(self.upstream, timeout=30) as up:
            up.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
            buf = bytearray()
            head = _read_head(up, buf)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            kept = [
                line
                for line in lines[1:]
                if line and not line.lower().startswith(("connection:", "keep-alive:"))
            ]
            client.sendall(
                ("\r\n".join([lines[0], *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1")
            )
            limit = fault.cut_after if fault is not None and fault.cut_after is not None else None
            stall = fault.stall_after if fault is not None and fault.stall_after is not None else None
            if stall is not None:
                limit = stall
            sent = 0
            data = bytes(buf)
            while True:
                if data:
                    if limit is not None and sent + len(data) >= limit:
                        client.sendall(data[: limit - sent])
                        if stall is not None and fault is not None:
                            time.sleep(fault.stall_seconds)  # the connection stays open, silent
                        # A clean FIN short of Content-Length: the client gets exactly ``limit`` bytes, then
                        # sees the connection end mid-body.
                        client.shutdown(socket.SHUT_RDWR)
                        return
                    client.sendall(data)
                    sent += len(data)
                data = up.recv(65536)
                if not data:
                    return
