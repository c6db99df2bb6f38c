"""A private containerd (1.6, Debian's package) for the benchmark and the interop tests.

Root, state and sockets all live under one directory; the CRI and unused snapshotter plugins are disabled so it
starts in about a second without touching the host's containerd.

    with containerd(base, base / "containerd.log") as (sock, pid):
        subprocess.run(["ctr", "--address", sock, "images", "ls"])
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

CONTAINERD_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
]


class ContainerdError(Exception):
    """The private containerd did not start (the message says why and where its log is)."""


def tail(log: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ("" when unreadable)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def containerd_config(base: Path, proxy_plugins: Mapping[str, Path | str] | None = None) -> str:
    """A containerd config (TOML) with root ``base/containerd/root``, state ``base/containerd/state`` and the
    socket ``base/containerd.sock``; ``proxy_plugins`` maps a snapshotter name to the unix socket of a proxy
    snapshotter (``[proxy_plugins.NAME] type = "snapshot"``)."""

    def q(p: Path) -> str:
        return json.dumps(str(p))  # a JSON string is a valid TOML basic string

    return "\n".join([
        "version = 2",
        f"root = {q(base / 'containerd' / 'root')}",
        f"state = {q(base / 'containerd' / 'state')}",
        f"disabled_plugins = {json.dumps(CONTAINERD_DISABLED)}",
        "[grpc]",
        f"  address = {q(base / 'containerd.sock')}",
        "[ttrpc]",
        f"  address = {q(base / 'containerd.sock.ttrpc')}",
        "[debug]",
        '  address = ""',
        "[metrics]",
        '  address = ""',
        *[line for name, address in (proxy_plugins or {}).items() for line in (
            f"[proxy_plugins.{json.dumps(name)}]",
            '  type = "snapshot"',
            f"  address = {q(Path(address))}",
        )],
        "",
    ])


@contextmanager
def containerd(base: Path, log: Path, *, env: Mapping[str, str] | None = None, start_timeout: float = 30.0,
               proxy_plugins: Mapping[str, Path | str] | None = None) -> Iterator[tuple[str, int]]:
    """A private containerd with everything under ``base``; yields (socket, pid). Stopped (TERM, then KILL).
    ``proxy_plugins``: proxy snapshotters by name -> socket (see ``containerd_config``).

    Keep ``base`` short: the socket path must fit in 108 bytes.
    """
    cfg = base / "containerd.toml"
    cfg.write_text(containerd_config(base, proxy_plugins))
    sock = str(base / "containerd.sock")
    with open(log, "wb") as out:
        # Own session: a Ctrl-C reaches us, and we stop containerd before its directory goes away.
        proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise ContainerdError(f"containerd exited {proc.returncode} at start (log {log}):\n{tail(log)}")
            if os.path.exists(sock) and subprocess.run(["ctr", "--address", sock, "version"],
                                                        capture_output=True).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd did not answer on {sock} within {start_timeout:.0f}s (log {log})")
            time.sleep(0.05)
        yield sock, proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
