"""A real stargz remote snapshotter for the tests: built once from Debian packages with this repository's
``scripts/stargz-grpc/build.sh`` (cached by the hash of its sources), run per test on a unix socket with
its own root, serving containerd's snapshots gRPC API.

Fixtures (import them into a test module): ``stargz_binary`` (session) and ``stargz_daemon`` (per test).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cargohold.snapshots.proxy import ProxySnapshotter

# The recipe is part of the repository, so a fresh clone builds the daemon rather than skipping its tests.
TOOL_DIR = Path(__file__).resolve().parents[2] / "scripts" / "stargz-grpc"
GOCODE = Path("/usr/share/gocode/src/github.com")
PACKAGES = ("golang-go", "golang-github-containerd-stargz-snapshotter-dev", "golang-github-hanwen-go-fuse-dev")
NAME = "stargz"


def _packages_present() -> bool:
    return (shutil.which("go") is not None and (GOCODE / "containerd" / "stargz-snapshotter").is_dir()
            and (GOCODE / "hanwen" / "go-fuse").is_dir())


def _cache_dir() -> Path:
    for candidate in (Path("/var/cache/cargohold-test"), Path(tempfile.gettempdir()) / "cargohold-test-cache"):
        with contextlib.suppress(OSError):
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
    raise OSError("no writable cache directory for the stargz daemon binary")


def build_stargz(log: Path | None = None) -> Path:
    """The daemon binary, built on first use (about a minute with the packages installed, plus apt-get when
    they are not). A build that cannot run here (no packages and no way to install them) or that fails is a
    test failure, never a skip: the recipe ships with the repository and ``make test`` installs the packages."""
    build = TOOL_DIR / "build.sh"
    digest = hashlib.sha256()
    for part in ("build.sh", "main.go"):
        digest.update((TOOL_DIR / part).read_bytes())
    cache = _cache_dir()
    binary = cache / f"stargz-grpc-{digest.hexdigest()[:16]}"
    if binary.is_file():
        return binary
    if not _packages_present():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise AssertionError(f"stargz daemon: Debian packages {' '.join(PACKAGES)} are missing and cannot be "
                                 "installed here (needs root and apt-get; `make test` installs them)")
    with open(cache / "stargz-grpc.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same binary
        if binary.is_file():
            return binary
        partial = binary.with_name(binary.name + f".tmp-{os.getpid()}")
        proc = subprocess.run(["sh", str(build), str(partial)], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if log is not None:
            log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise AssertionError(f"building the stargz daemon failed (exit {proc.returncode}):\n{tail}")
        os.replace(partial, binary)
    return binary


class StargzDaemon:
    """One running daemon: ``socket``, ``root``, ``log``; ``snapshotter()`` opens a client on it."""

    def __init__(self, binary: Path, root: Path, socket: Path, *, config: str = "") -> None:
        self.binary = binary
        self.root = root
        self.socket = socket
        self.log = root.parent / f"{root.name}.log"
        self.config = root.parent / f"{root.name}.toml"
        self.config.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[ProxySnapshotter] = []

    def start(self, timeout: float = 20.0) -> StargzDaemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "-address", str(self.socket), "-root", str(self.root), "-log-level", "debug",
                 "-config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"stargz daemon did not start; log {self.log}:\n{self.log_text()[-3000:]}")
            time.sleep(0.01)
        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                self.stop()
                raise AssertionError(f"stargz daemon does not answer on {self.socket}; log {self.log}:\n"
                                     f"{self.log_text()[-3000:]}") from None
        return self

    def snapshotter(self, *, namespace: str = "default", remote: bool = False, name: str = NAME,
                    namespaced_keys: bool = False) -> ProxySnapshotter:
        client = ProxySnapshotter(name, str(self.socket), namespace=namespace, remote=remote,
                                  namespaced_keys=namespaced_keys)
        self._clients.append(client)
        return client

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Close the clients opened with ``snapshotter()``, stop the daemon, unmount what it left."""
        for client in self._clients:
            client.close()
        self.stop_process()

    def stop_process(self) -> None:
        """Stop the daemon only (its clients stay open and see it unavailable)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the daemon cleans up and unmounts its FUSE layers on SIGTERM
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        # Whatever a killed daemon left mounted under its root (FUSE layers) must not outlive the test.
        for point in mounts_under(self.root):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


_MOUNTINFO_ESCAPES = (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\"))


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo, octal escapes undone)."""
    base = str(path)
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4]
            for escaped, char in _MOUNTINFO_ESCAPES:
                point = point.replace(escaped, char)
            points.append(point)
    return sorted((p for p in points if p == base or p.startswith(base + "/")), key=len, reverse=True)


@contextlib.contextmanager
def running_stargz(binary: Path, base: Path, *, config: str = "") -> Iterator[StargzDaemon]:
    """A daemon with root ``base/stargz-root``; its socket in a short /tmp directory (sun_path is 108 bytes)."""
    sockdir = Path(tempfile.mkdtemp(prefix="sgz-"))
    daemon = StargzDaemon(binary, base / "stargz-root", sockdir / "sock", config=config)
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(scope="session")
def stargz_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the stargz snapshotter needs root (overlay and FUSE mounts)")
    return build_stargz(tmp_path_factory.mktemp("stargz-build") / "build.log")


@pytest.fixture
def stargz_daemon(stargz_binary: Path, tmp_path: Path) -> Iterator[StargzDaemon]:
    """A fresh stargz daemon (empty root) for one test, stopped after it."""
    with running_stargz(stargz_binary, tmp_path) as daemon:
        yield daemon
