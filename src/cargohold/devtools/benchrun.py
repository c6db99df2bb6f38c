"""What every bench scenario shares: fresh filesystems, timed commands (wall, CPU, optionally the peak RSS of the
whole process tree), and the checks of a run's result against the reference listings."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cargohold.devtools import benchtree
from cargohold.devtools.containerd import tail

MIB = 1 << 20


class BenchError(Exception):
    """A step of the benchmark failed or a check found a difference (the message names run, tool and path)."""


# -- fresh filesystems --------------------------------------------------------------------------------------


def run_quiet(cmd: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}: {proc.stderr.strip()}")


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base``, deepest (latest) first."""
    prefix = str(base).rstrip("/")
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found[::-1]


def unmount_tree(base: Path) -> None:
    """Unmount everything at or below ``base``; lazily when busy. Never raises."""
    for _ in range(3):
        points = mounts_under(base)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)


class FreshFS:
    """A new, empty filesystem at ``base/mnt`` for one run (a loop-mounted ext4 image, initialised eagerly, or
    a tmpfs); unmounted and its image removed on exit."""

    def __init__(self, kind: str, base: Path, size: int, *, keep_image: bool = False) -> None:
        self.kind, self.base, self.size, self.keep_image = kind, base, size, keep_image
        self.mnt = base / "mnt"
        self.image = base / "fs.ext4"

    def __enter__(self) -> Path:
        self.mnt.mkdir(parents=True)
        try:
            if self.kind == "tmpfs":
                run_quiet(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.mnt)],
                          "mounting tmpfs")
            else:
                with open(self.image, "wb") as f:
                    f.truncate(self.size)
                # Initialise inode tables and journal now, not in a kernel thread during the measurement.
                run_quiet(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                           str(self.image)], "mkfs.ext4")
                run_quiet(["mount", "-o", "loop", str(self.image), str(self.mnt)], "mounting ext4 loop image")
            (self.mnt / "tmp").mkdir()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        unmount_tree(self.mnt)
        if self.kind == "ext4":
            loops = subprocess.run(["losetup", "-j", str(self.image)], capture_output=True, text=True).stdout
            for line in loops.splitlines():
                subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True)
            if not self.keep_image:
                self.image.unlink(missing_ok=True)
        if not mounts_under(self.mnt):
            shutil.rmtree(self.base, ignore_errors=True)


def ext4_works(work: Path) -> bool:
    """Whether mkfs.ext4 exists and a loop-mounted ext4 image mounts here."""
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        return False
    try:
        with FreshFS("ext4", work / "probe", 64 * MIB):
            return True
    except (BenchError, OSError):
        return False


def fs_env(fs: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(fs / "tmp")}


# -- timing -------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeRSS:
    """Samples VmRSS of a process and all its descendants every ``every`` seconds in a thread; keeps the peak
    of the sum and the largest single process."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid, self.every = pid, every
        self.peak_sum_kib = self.peak_one_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo += _children(p)
            sizes = [_rss_kib(p) for p in pids]
            self.peak_sum_kib = max(self.peak_sum_kib, sum(sizes))
            self.peak_one_kib = max(self.peak_one_kib, max(sizes, default=0))
            self.samples += 1
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True, slots=True, kw_only=True)
class Timed:
    seconds: float
    cpu_seconds: float  # user + system of the command and its children (not of daemons it talks to)
    rss_sum_mb: float | None = None
    rss_max_mb: float | None = None
    stdout: str = ""


def proc_cpu(pid: int) -> float:
    """User + system seconds of a running process (e.g. the containerd daemon a ``ctr`` command drives)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmd: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None, rss: bool = False,
          what: str = "") -> Timed:
    """Run ``cmd`` (stderr appended to ``log``, stdout kept), timed; a non-zero exit is a BenchError."""
    os.sync()
    with open(log, "ab") as err:
        err.write(f"$ {' '.join(cmd)}\n".encode())
        err.flush()
        cpu0, t0 = _children_cpu(), time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None)
        sampler = TreeRSS(proc.pid) if rss else None
        out, _ = proc.communicate()
        seconds = time.perf_counter() - t0
        if sampler is not None:
            sampler.stop()
        cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        raise BenchError(f"{what or ' '.join(cmd)} exited {proc.returncode} (log {log}):\n{tail(log)}")
    return Timed(seconds=seconds, cpu_seconds=cpu, stdout=out.decode(errors="replace"),
                 rss_sum_mb=sampler.peak_sum_kib / 1024 if sampler else None,
                 rss_max_mb=sampler.peak_one_kib / 1024 if sampler else None)


def cargohold_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cargohold.cli.main", "--root", str(root), "--plain-http", *args]


# -- results ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One timed, checked run."""

    scenario: str
    tool: str
    run: int
    seconds: float
    cpu_seconds: float
    check: str  # what was verified
    rss_sum_mb: float | None = None
    rss_max_mb: float | None = None
    extra: dict[str, object] = field(default_factory=dict)


# -- checks -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Reference:
    """Reference listings of one image, made once from its layer tars."""

    raw: tuple[benchtree.Listing, ...]
    overlay: tuple[benchtree.Listing, ...]
    merged: benchtree.Listing


def _fail(label: str, where: Path, problems: list[str]) -> BenchError:
    return BenchError(f"{label}: {where} differs from the reference:\n  " + "\n  ".join(problems))


def _layer_of(root: Path) -> list[int]:
    return sorted(int(n[5:]) for n in os.listdir(root) if re.fullmatch(r"layer\d+", n))


def snapshot_roots(snapshots: Path) -> list[Path]:
    """The snapshot directories' roots (``<id>/fs`` for overlayfs and cargohold's native, ``<id>`` for
    containerd's native)."""
    if not snapshots.is_dir():
        return []
    return [d / "fs" if (d / "fs").is_dir() else d for d in sorted(snapshots.iterdir()) if d.is_dir()]


def check_overlay(label: str, snapshots: Path, ref: Reference) -> str:
    """Every layer's upper dir against its overlay-view listing; each upper dir is matched to its layer by the
    ``layerN`` directory only layer N creates."""
    seen: dict[int, Path] = {}
    for root in snapshot_roots(snapshots):
        layers = _layer_of(root)
        if len(layers) != 1:
            raise BenchError(f"{label}: snapshot {root} holds layers {layers}, expected exactly one")
        if layers[0] in seen:
            raise BenchError(f"{label}: layer {layers[0]} unpacked twice ({seen[layers[0]]}, {root})")
        seen[layers[0]] = root
    if sorted(seen) != list(range(len(ref.overlay))):
        raise BenchError(f"{label}: snapshots under {snapshots} hold layers {sorted(seen)}, "
                         f"expected 0..{len(ref.overlay) - 1}")
    entries = 0
    for n, root in seen.items():
        problems = benchtree.compare(ref.overlay[n], benchtree.read_tree(root))
        if problems:
            raise _fail(f"{label} layer {n}", root, problems)
        entries += len(ref.overlay[n])
    return f"{len(seen)} layers, {entries} entries"


def check_merged(label: str, root: Path, ref: Reference, *, skip: Sequence[str] = ()) -> str:
    """A flattened tree (a native snapshot's, a rootfs) against the merged listing."""
    problems = benchtree.compare(ref.merged, benchtree.read_tree(root, skip=skip))
    if problems:
        raise _fail(label, root, problems)
    return f"{len(ref.merged)} entries"


def check_native(label: str, snapshots: Path, ref: Reference) -> str:
    """The top snapshot (the one holding every layer's ``layerN``) against the merged listing."""
    roots = snapshot_roots(snapshots)
    want = list(range(len(ref.raw)))
    top = [r for r in roots if _layer_of(r) == want]
    if len(top) != 1:
        raise BenchError(f"{label}: {len(top)} snapshots under {snapshots} hold every layer, expected 1")
    return check_merged(label, top[0], ref)


def check_raw(label: str, dirs: Sequence[Path], ref: Reference) -> str:
    for n, d in enumerate(dirs):
        problems = benchtree.compare(ref.raw[n], benchtree.read_tree(d))
        if problems:
            raise _fail(f"{label} layer {n}", d, problems)
    return f"{len(dirs)} layers, {sum(map(len, ref.raw))} entries"


def check_cargohold_images(label: str, root: Path, name: str, snapshotter: str, env: Mapping[str, str]) -> None:
    """``cargohold images check``: complete, and unpacked into ``snapshotter``."""
    proc = subprocess.run(cargohold_cmd(root, "images", "check", "--output", "json", name), capture_output=True,
                          text=True, env=dict(env))
    try:
        rows = json.loads(proc.stdout)
    except ValueError:
        rows = []
    ok = (proc.returncode == 0 and len(rows) == 1 and rows[0]["status"] == "complete"
          and rows[0]["unpacked"].get(snapshotter) is True)
    if not ok:
        raise BenchError(f"{label}: cargohold images check {name}: exit {proc.returncode}: "
                         f"{proc.stdout.strip()} {proc.stderr.strip()}")


def check_ctr_images(label: str, ctr: Sequence[str], name: str, snapshotter: str = "overlayfs") -> None:
    """``ctr images check``: the image's line says complete (blobs) and that it is unpacked."""
    out = subprocess.run([*ctr, "images", "check", "--snapshotter", snapshotter], capture_output=True,
                         text=True).stdout
    line = next((ln for ln in out.splitlines() if ln.split()[:1] == [name]), "")
    if "complete" not in line or not line.split() or line.split()[-1] != "true":
        raise BenchError(f"{label}: ctr images check: {name} is not complete and unpacked:\n{out}")
