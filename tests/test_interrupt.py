"""Ctrl-C and SIGTERM stop a real ``cargohold pull`` quickly, at several points, recording nothing half-made;
the next pull resumes the partial download and completes.

The registry is real; between it and cargohold sits a TCP relay that can stall (resolve hangs) or throttle
(a fetch takes seconds), so that the signal lands where the test says.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.cli import cargohold_cmd, cli

from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess

EXIT_WITHIN = 2.0


class Relay:
    """A loopback TCP relay to ``upstream``: ``stall`` holds every byte; ``rate`` (bytes/s) throttles what the
    registry sends. Counts the bytes sent to the client and notes ``Range`` requests."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.stall = threading.Event()
        self.rate = 0
        self.sent = 0
        self.ranges = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                while self.stall.is_set():
                    time.sleep(0.05)
                data = src.recv(16384)
                if not data:
                    break
                if downstream:
                    with self._lock:
                        self.sent += len(data)
                    if self.rate:
                        time.sleep(len(data) / self.rate)
                elif b"\nrange: bytes=" in data.lower():
                    with self._lock:
                        self.ranges += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def relay(registry: RegistryProcess) -> Iterator[Relay]:
    r = Relay(registry.host)
    yield r
    r.close()


def _big_image(seed: int) -> samples.SampleImage:
    """Three layers: a small base, then two of incompressible-ish data and many files (slow to fetch when
    throttled, slow enough to apply)."""
    layers = [samples.small_base_layer()]
    for i in range(2):
        files = samples.random_files(seed + i, 1500, min_size=1024, max_size=4096, prefix=f"l{i}")
        layers.append(samples.files_layer(files))
    return samples.build_image(layers, level=1)


def _start(root: Path, ref: str) -> subprocess.Popen[str]:
    return subprocess.Popen(cargohold_cmd(root, "pull", "--snapshotter", "native", ref), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_line(proc: subprocess.Popen[str], needle: str, lines: list[str], timeout: float = 60) -> None:
    """Read stderr lines until one contains ``needle`` (the point where the signal is to land)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return
    raise AssertionError(f"never saw {needle!r}; stderr: {''.join(lines)}")


def _interrupt(proc: subprocess.Popen[str], sig: int, lines: list[str]) -> tuple[int, float, str]:
    """Send ``sig``; the exit status, the seconds it took to exit, and the rest of stderr."""
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    took = time.monotonic() - sent
    print(f"exit after {took:.2f} s")
    return proc.returncode, took, "".join(lines) + err


def _assert_nothing_recorded(root: Path) -> None:
    images = json.loads(cli(root, "images", "ls", "-o", "json").stdout)
    assert images == []
    snaps = json.loads(cli(root, "snapshots", "--snapshotter", "native", "ls", "-o", "json").stdout)
    assert [s["key"] for s in snaps if s["kind"] == "active"] == []


def test_sigint_while_resolving_exits_130_at_once(tmp_path: Path, registry: RegistryProcess, relay: Relay) -> None:
    samples.push(registry.url, "int/resolve", "v1", samples.build_image([samples.small_base_layer()]))
    relay.stall.set()  # the registry never answers
    proc = _start(tmp_path / "root", f"{relay.host}/int/resolve:v1")
    lines: list[str] = []
    _wait_line(proc, "resolve running", lines)
    time.sleep(0.3)
    status, took, err = _interrupt(proc, signal.SIGINT, lines)
    assert status == 130, err
    assert took < EXIT_WITHIN, err
    assert "Traceback" not in err
    assert err.strip().endswith("cargohold: interrupted")
    relay.stall.clear()
    _assert_nothing_recorded(tmp_path / "root")


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_fetch_stops_and_next_pull_resumes(tmp_path: Path, registry: RegistryProcess,
                                                         relay: Relay, sig: int, expected: int) -> None:
    img = _big_image(11)
    samples.push(registry.url, "int/fetch", "v1", img)
    total = sum(len(b.data) for b in img.layers)
    relay.rate = max(total // 10, 64 * 1024)  # the whole image would take ~10 s
    root = tmp_path / "root"
    ref = f"{relay.host}/int/fetch:v1"
    proc = _start(root, ref)
    lines: list[str] = []
    _wait_line(proc, "fetch running layer", lines)
    time.sleep(1.0)  # well into the layers' bodies
    status, took, err = _interrupt(proc, sig, lines)
    assert status == expected, err
    assert took < EXIT_WITHIN, err
    assert "Traceback" not in err
    assert "cargohold: interrupted" in err
    _assert_nothing_recorded(root)

    # The next pull resumes the partial downloads (Range requests, fewer bytes than the image) and completes.
    relay.rate = 0
    before = relay.sent
    out = cli(root, "pull", "--snapshotter", "native", "-o", "json", ref)
    assert json.loads(out.stdout)["digest"] == str(img.digest)
    assert relay.ranges >= 1
    assert relay.sent - before < total
    names = [i["name"] for i in json.loads(cli(root, "images", "ls", "-o", "json").stdout)]
    assert names == [ref]


@pytest.mark.parametrize("point", ["apply running layer", "apply done layer"])  # applying; committing the first
def test_sigint_while_applying_discards_the_active_snapshot(tmp_path: Path, registry: RegistryProcess,
                                                            relay: Relay, point: str) -> None:
    img = _big_image(23)
    samples.push(registry.url, "int/apply", "v1", img)
    root = tmp_path / "root"
    ref = f"{relay.host}/int/apply:v1"
    # Fetch the content first: the interrupted pull then only applies.
    cli(root, "pull", "--no-unpack", ref)
    cli(root, "images", "rm", ref)
    proc = _start(root, ref)
    lines: list[str] = []
    _wait_line(proc, point, lines)
    status, took, err = _interrupt(proc, signal.SIGINT, lines)
    assert status == 130, err
    assert took < EXIT_WITHIN, err
    assert "Traceback" not in err
    _assert_nothing_recorded(root)
    cli(root, "pull", "--snapshotter", "native", ref)
    assert [i["name"] for i in json.loads(cli(root, "images", "ls", "-o", "json").stdout)] == [ref]
