"""The README's command line tour runs as written: the playground (`python -m cargohold.devtools.playground`)
serves on 127.0.0.1:5000, and every line of the README's `<!-- tour -->` block runs verbatim in one bash
session, from the repository (so `. .venv/bin/activate` works), each command exiting 0.

The one substitution: when port 5000 is taken (another test run, a real registry), the playground runs on a
free port and `127.0.0.1:5000` in the tour becomes `127.0.0.1:<that port>` — said in the test's output."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cargohold.devtools.registry import find_registry_binary, free_port

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TOUR_MARK = "<!-- tour -->"
PORT = 5000


def tour_blocks(text: str) -> list[str]:
    """The ```sh blocks right after a ``<!-- tour -->`` line."""
    return [m.group(1) for m in re.finditer(re.escape(TOUR_MARK) + r"\s*\n```sh\n(.*?)\n```", text, re.S)]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def playground(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    try:
        find_registry_binary()
    except Exception as exc:  # noqa: BLE001 - any reason the registry cannot run skips
        pytest.skip(f"no docker-registry: {exc}")
    port = PORT if _port_free(PORT) else free_port()
    if port != PORT:
        print(f"port {PORT} is taken: the playground serves on {port} and the tour's 127.0.0.1:{PORT} "
              f"becomes 127.0.0.1:{port}")
    proc = subprocess.Popen([sys.executable, "-m", "cargohold.devtools.playground", "--port", str(port),
                             "--data", str(tmp_path / "registry")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("serving"):
            break
    if not seen or not seen[-1].startswith("serving"):
        proc.kill()
        pytest.fail(f"the playground did not start: {''.join(seen)}")
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_readme_has_a_runnable_tour() -> None:
    blocks = tour_blocks(README.read_text())
    assert len(blocks) == 1
    assert "IMAGE" not in blocks[0] and "…" not in blocks[0], "placeholders belong in the reference block"


@pytest.mark.skipif(os.geteuid() != 0, reason="the tour mounts an image: run as root")
@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "activate").exists(), reason="no .venv (make venv)")
def test_readme_tour_runs_verbatim(playground: tuple[subprocess.Popen[str], int], tmp_path: Path) -> None:
    proc, port = playground
    script = tour_blocks(README.read_text())[0]
    if port != PORT:
        script = script.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}")
    # Harness, not tour: stop at the first failing command and name it.
    harness = "set -eo pipefail\ntrap 'echo \"tour failed at: $BASH_COMMAND\" >&2' ERR\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGOHOLD_")}
    env["TMPDIR"] = str(tmp_path)  # the tour's mktemp -d directories land here
    run = subprocess.run(["bash", "-c", harness + script], cwd=REPO, env=env, text=True, capture_output=True,
                         timeout=600)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr
    assert f"127.0.0.1:{port}/demo/multi:v1" in run.stdout

    proc.send_signal(signal.SIGINT)  # Ctrl-C stops the playground cleanly
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert out.strip().endswith("stopping")
    assert _port_free(port), "the registry is still serving after the playground stopped"
