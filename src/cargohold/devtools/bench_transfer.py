"""The transfer half of ``make bench``: moving an image, cargohold against the tool people use for each job.

On the benchmark image (already in a local registry), each run and tool gets a fresh filesystem:

* export       ``cargohold export``                 vs ``ctr images export``  (from each tool's own store)
* import       ``cargohold import`` (with unpack)   vs ``ctr images import`` (with unpack), into a new store
* copy         ``cargohold copy REF oci-archive:``  vs ``skopeo copy docker://REF oci-archive:``
* rootfs       ``cargohold rootfs``                 vs ``umoci unpack`` (image already local to both)

Only the named command is timed; the set-up (pulling into the store, starting containerd, laying out an OCI
directory for umoci) is not. Every result is checked: archives are read back, rootfs trees are counted.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cargohold.devtools.containerd import containerd, tail

STEPS = ("export", "import", "copy", "rootfs")
RIVALS = {"export": "ctr", "import": "ctr", "copy": "skopeo", "rootfs": "umoci"}


class TransferError(Exception):
    """A step failed (the message names the command and its log)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    run: int
    step: str
    tool: str
    seconds: float
    check: str  # what was verified, e.g. "4 layers" or "5731 files"


def needed_commands() -> list[str]:
    return ["containerd", "ctr", "skopeo", "umoci"]


def _timed(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> float:
    os.sync()
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        rc = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise TransferError(f"{cmd[0]} {' '.join(cmd[1:3])} exited {rc} (log {log}):\n{tail(log)}")
    return seconds


def _setup(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
    _timed(cmd, log, env)


def _archive_layers(path: Path) -> int:
    """Blob entries of an OCI layout archive (a truncated archive fails here)."""
    with tarfile.open(path, "r:*") as tar:
        names = tar.getnames()
    if "index.json" not in names:
        raise TransferError(f"{path}: no index.json in the archive")
    return sum(1 for n in names if n.startswith("blobs/sha256/"))


def _count_files(root: Path) -> int:
    files = 0
    for _, _, names in os.walk(root):
        files += len(names)
    return files


def _cargohold(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cargohold.cli.main", "--root", str(root), "--plain-http", *args]


def run_transfer(run: int, tool: str, fs: Path, ref: str, logs: Path, expect_files: int,
                 say: Callable[[str], None]) -> list[StepResult]:
    """All steps for ``tool`` ("cargohold" or "rivals") on the fresh filesystem ``fs``."""
    env = {**os.environ, "TMPDIR": str(fs / "tmp")}
    (fs / "tmp").mkdir(exist_ok=True)
    log = logs / f"transfer-{tool}-{run}.log"
    results: list[StepResult] = []

    def record(step: str, who: str, seconds: float, check: str) -> None:
        results.append(StepResult(run=run, step=step, tool=who, seconds=seconds, check=check))
        say(f"run {run} {step:<7} {who:<9} {seconds:7.2f}s  ok: {check}")

    if tool == "cargohold":
        root = fs / "root"
        _setup(_cargohold(root, "pull", "--no-unpack", ref), log, env)
        out = fs / "export.tar"
        record("export", "cargohold", _timed(_cargohold(root, "export", str(out), ref), log, env),
               f"{_archive_layers(out)} blobs")
        seconds = _timed(_cargohold(fs / "root2", "import", "--snapshotter", "overlayfs", str(out)), log, env)
        check = subprocess.run(_cargohold(fs / "root2", "images", "check"), capture_output=True, text=True, env=env)
        if check.returncode != 0:
            raise TransferError(f"cargohold images check after import: {check.stdout}{check.stderr}")
        record("import", "cargohold", seconds, "complete, unpacked")
        copied = fs / "copy.tar"
        record("copy", "cargohold",
               _timed(_cargohold(fs / "root3", "copy", ref, f"oci-archive:{copied}"), log, env),
               f"{_archive_layers(copied)} blobs")
        flat = fs / "rootfs"
        seconds = _timed(_cargohold(root, "rootfs", ref, str(flat)), log, env)
        record("rootfs", "cargohold", seconds, _files_check(_count_files(flat), expect_files, flat))
        return results

    # The rivals: containerd's ctr, skopeo, umoci.
    short = fs / "c1"
    short.mkdir()
    out = fs / "export.tar"
    with containerd(short, logs / f"containerd-transfer-{run}-a.log", env=env) as (sock, _):
        ctr = ["ctr", "--address", sock, "-n", "bench"]
        _setup([*ctr, "images", "pull", "--plain-http", ref], log, env)
        record("export", "ctr", _timed([*ctr, "images", "export", str(out), ref], log, env),
               f"{_archive_layers(out)} blobs")
    second = fs / "c2"
    second.mkdir()
    with containerd(second, logs / f"containerd-transfer-{run}-b.log", env=env) as (sock, _):
        ctr = ["ctr", "--address", sock, "-n", "bench"]
        seconds = _timed([*ctr, "images", "import", str(out)], log, env)
        listing = subprocess.run([*ctr, "images", "check"], capture_output=True, text=True, env=env).stdout
        if "complete" not in listing:
            raise TransferError(f"ctr images check after import:\n{listing}")
        record("import", "ctr", seconds, "complete, unpacked")
    copied = fs / "copy.tar"
    skopeo = ["skopeo", "copy", "--quiet", "--src-tls-verify=false"]
    record("copy", "skopeo", _timed([*skopeo, f"docker://{ref}", f"oci-archive:{copied}"], log, env),
           f"{_archive_layers(copied)} blobs")
    layout = fs / "layout"
    _setup([*skopeo, f"docker://{ref}", f"oci:{layout}:bench"], log, env)
    bundle = fs / "bundle"
    seconds = _timed(["umoci", "unpack", "--image", f"{layout}:bench", str(bundle)], log, env)
    record("rootfs", "umoci", seconds, _files_check(_count_files(bundle / "rootfs"), expect_files, bundle))
    return results


def _files_check(found: int, expected: int, where: Path) -> str:
    # The generated image holds only regular files below layerN/ (plus the base directories' entries).
    if found < expected:
        raise TransferError(f"{where}: {found} files, expected at least {expected}")
    return f"{found} files"


def medians(results: Sequence[StepResult]) -> dict[str, dict[str, float]]:
    """step -> tool -> median seconds."""
    out: dict[str, dict[str, float]] = {}
    for step in STEPS:
        for tool in ("cargohold", RIVALS[step]):
            times = [r.seconds for r in results if r.step == step and r.tool == tool]
            if times:
                out.setdefault(step, {})[tool] = statistics.median(times)
    return out


def ratios(meds: dict[str, dict[str, float]]) -> dict[str, float]:
    """step -> cargohold / rival (median seconds); below 1 is faster."""
    return {step: tools["cargohold"] / tools[RIVALS[step]] for step, tools in meds.items()
            if "cargohold" in tools and RIVALS[step] in tools and tools[RIVALS[step]] > 0}


def missing_commands() -> list[str]:
    return [c for c in needed_commands() if not shutil.which(c)]
