"""Tests that really kill: `pull`, `import`, `unpack`, `push` and `gc` run as real CLI subprocesses and are
killed (SIGKILL and SIGTERM) at points chosen by time (spread over the command's duration, measured once) and
by progress events (after the k-th line of progress on stderr). After each kill the same command is run again
(it must succeed), then `content verify` (exit 0), `images check` (complete) and `gc`; then no lease, no active
snapshot and no ingest is left, and the disk usage (blob files + snapshot directories, in bytes) is that of an
uninterrupted run.

``make test`` runs CARGOHOLD_CRASH_POINTS (default 5) points per command, half by time and half by progress,
alternating the signal; ``make crash`` sets it to 40: 20 per signal and command, 10 of each by time and by
progress.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from support.cli import cargohold_cmd, cli

POINTS = int(os.environ.get("CARGOHOLD_CRASH_POINTS", "5"))
PARALLEL = 2  # roots killed at once: the machine is shared

# Tiny layers, several of them: many progress lines, so many points, in a short run.
IMAGE = samples.build_image([samples.files_layer({f"layer{i}/file{j}.txt": f"{i}-{j}\n".encode() * (50 + i)
                                                   for j in range(8)}) for i in range(6)])


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """A command to kill: how to prepare a root for it, its arguments, and the image to check after."""

    args: Callable[[int], list[str]]  # by point number (push: a repository per point)
    prepare: Callable[[Path], None]
    image: str


def _usage(root: Path) -> int:
    """Bytes of blob files and snapshot directories (entries count too, so an empty directory left shows)."""
    total = 0
    for top in [root / "content" / "blobs", *(root / "snapshots").glob("*/snapshots")]:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in filenames:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            total += len(dirnames) + len(filenames)
    return total


def _leftovers(root: Path) -> dict[str, list[str]]:
    with closing(Client(root)) as client:
        return {
            "leases": [lease.id for lease in client.leases()],
            "ingests": [i.ref for i in client.active_ingests()],
            "active": [i.key for i in client.snapshotter().walk() if i.kind.value.lower() != "committed"],
        }


def _run_killed(root: Path, args: list[str], sig: signal.Signals, *, after_lines: int | None,
                after_seconds: float | None) -> None:
    """Start the command and kill it after the ``after_lines``-th stderr line, or after ``after_seconds``
    (when it ends first, the point fell after its end: the run just completes)."""
    proc = subprocess.Popen(cargohold_cmd(root, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    if after_lines is not None:
        seen = 0
        for _ in iter(proc.stderr.readline, b""):
            seen += 1
            if seen >= after_lines:
                break
    else:
        assert after_seconds is not None
        reader = threading.Thread(target=proc.stderr.read, daemon=True)  # keep the pipe from filling
        reader.start()
        try:
            proc.wait(after_seconds)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(60)
    proc.stderr.close()


def _measure(template: Path, scratch: Path, args: list[str]) -> tuple[float, int]:
    """Duration and stderr lines of one uninterrupted run on a copy of the template."""
    shutil.copytree(template, scratch, symlinks=True)
    started = time.monotonic()
    proc = cli(scratch, *args)
    return time.monotonic() - started, len(proc.stderr.splitlines())


def _after(root: Path, scenario: Scenario, args: list[str]) -> tuple[dict[str, list[str]], int]:
    cli(root, *args)  # the same command again succeeds
    verified = cli(root, "content", "verify", check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    cli(root, "images", "check", scenario.image)
    cli(root, "gc")
    return _leftovers(root), _usage(root)


def _kill_points(scenario: Scenario, template: Path, work: Path, count: int,
                 signals: tuple[signal.Signals, ...]) -> None:
    baseline_root = work / "baseline"
    duration, lines = _measure(template, baseline_root, scenario.args(0))
    cli(baseline_root, "gc")
    baseline = _usage(baseline_root)
    assert _leftovers(baseline_root) == {"leases": [], "ingests": [], "active": []}

    def point(i: int) -> str:
        sig = signals[(i // 2) % len(signals)]  # each signal at time points and at progress points
        root = work / f"p{i}"
        shutil.copytree(template, root, symlinks=True)
        half = i // 2
        per = max(1, count // 2)
        if i % 2 == 0:  # by time: spread over the measured duration
            by_lines, by_time = None, duration * (half + 0.5) / per
        else:  # by progress: after the k-th line of the uninterrupted run's stderr
            by_lines, by_time = 1 + (half * max(1, lines)) // per, None
        args = scenario.args(i + 1)
        _run_killed(root, args, sig, after_lines=by_lines, after_seconds=by_time)
        left, usage = _after(root, scenario, args)
        where = f"point {i} ({sig.name}, {'line ' + str(by_lines) if by_lines else f'{by_time:.2f}s'})"
        assert left == {"leases": [], "ingests": [], "active": []}, where
        assert usage == baseline, where
        shutil.rmtree(root, ignore_errors=True)
        return where

    with ThreadPoolExecutor(PARALLEL) as pool:
        done = list(pool.map(point, range(count)))
    assert len(done) == count


@pytest.fixture
def scenarios(registry: RegistryProcess, tmp_path: Path) -> dict[str, Scenario]:
    samples.push(registry.url, "crash/app", "v1", IMAGE)
    ref = f"{registry.host}/crash/app:v1"
    archive = tmp_path / "app.tar"
    seed = tmp_path / "seed"
    cli(seed, "pull", ref)
    cli(seed, "export", str(archive), ref)

    def empty(root: Path) -> None:
        root.mkdir(parents=True)

    def pulled_no_unpack(root: Path) -> None:
        cli(root, "pull", "--no-unpack", ref)

    def pulled(root: Path) -> None:
        cli(root, "pull", ref)

    def garbage(root: Path) -> None:
        cli(root, "pull", ref)
        # garbage for gc: a second image's blobs and snapshot, unreferenced once its image is gone
        other = samples.build_image([samples.files_layer({"other.txt": b"other\n" * 1000})])
        samples.push(registry.url, "crash/other", "v1", other)
        cli(root, "pull", f"{registry.host}/crash/other:v1")
        cli(root, "images", "rm", f"{registry.host}/crash/other:v1")

    return {
        "pull": Scenario(args=lambda i: ["pull", ref], prepare=empty, image=ref),
        "import": Scenario(args=lambda i: ["import", str(archive)], prepare=empty, image=ref),
        "unpack": Scenario(args=lambda i: ["unpack", ref], prepare=pulled_no_unpack, image=ref),
        "push": Scenario(args=lambda i: ["push", f"{registry.host}/crash/pushed{i}:v1", ref], prepare=pulled,
                         image=ref),
        "gc": Scenario(args=lambda i: ["gc"], prepare=garbage, image=ref),
    }


@pytest.mark.timeout(900)
@pytest.mark.parametrize("command", ["pull", "import", "unpack", "push", "gc"])
def test_killed_then_rerun_leaves_a_clean_root(command: str, scenarios: dict[str, Scenario],
                                               tmp_path: Path) -> None:
    scenario = scenarios[command]
    template = tmp_path / "template"
    scenario.prepare(template)
    _kill_points(scenario, template, tmp_path / "work", POINTS, (signal.SIGKILL, signal.SIGTERM))
