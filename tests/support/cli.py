"""Run the real ``cargohold`` command line in a subprocess, as users do."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def cargohold_cmd(root: Path, *args: str) -> list[str]:
    """The argv of ``cargohold --root ROOT ARGS…`` with this interpreter."""
    return [sys.executable, "-m", "cargohold.cli.main", "--root", str(root), *args]


def cli(root: Path, *args: str, check: bool = True, timeout: float = 300,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cargohold``; with ``check``, a non-zero exit fails the test showing stderr."""
    proc = subprocess.run(cargohold_cmd(root, *args), text=True, capture_output=True, timeout=timeout,
                          env=dict(env) if env is not None else None)
    if check and proc.returncode != 0:
        raise AssertionError(f"cargohold {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def cli_bytes(root: Path, *args: str, check: bool = True, stdin: bytes | None = None, timeout: float = 300
              ) -> subprocess.CompletedProcess[bytes]:
    """``cli`` with binary stdin/stdout (archives through pipes)."""
    proc = subprocess.run(cargohold_cmd(root, *args), input=stdin, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cargohold {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()}")
    return proc


def wait_for_socket(proc: subprocess.Popen[str], sock: Path, timeout: float = 30) -> None:
    """Wait until the server ``proc`` (started with ``stderr=PIPE``) has created its unix socket ``sock``; fail
    showing its stderr if it exits first, or when ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "server did not create its socket"
        time.sleep(0.05)
