"""``make bench``: cargohold against the real tools on the same image, in one run, with ratios.

One local docker-registry on 127.0.0.1 serves a generated image (``--size-mb`` MiB of file data in
``--layers`` gzip layers of many small files, deterministic).

Pull: runs alternate between cargohold and containerd 1.6's ``ctr images pull``; every run pulls *and unpacks*
into the overlayfs snapshotter on a brand-new filesystem (tmpfs, or a loop-mounted ext4 image) that is
unmounted afterwards, so no run pays for an earlier run's deletions. containerd runs as a private daemon with
its root, state and socket on that filesystem; only the ``ctr images pull`` is timed.

Transfer (``bench_transfer``): export and import against ``ctr``, registry -> oci-archive against ``skopeo
copy``, flattening to a rootfs against ``umoci unpack``.

    python -m cargohold.devtools.bench [--size-mb 500] [--layers 4] [--runs 3] [--fs ext4|tmpfs]
                                       [--only cargohold|ctr] [--no-transfer] [--keep] [--output table|json]

Needs root (mounts), ``containerd``/``ctr``, ``skopeo``, ``umoci`` and ``docker-registry``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from cargohold.devtools import bench_transfer, samples
from cargohold.devtools.containerd import ContainerdError, containerd
from cargohold.devtools.containerd import tail as _tail
from cargohold.devtools.registry import start_registry

MIB = 1 << 20
REPO, TAG = "bench/layers", "v1"
NAMESPACE = "bench"
TOOLS = ("cargohold", "ctr")

# Text-like files: random bytes mapped onto a skewed alphabet, so Huffman coding gains as on source files.
_ALPHABET = b" etaoinshrdlucmfwypvbgkqjxz\n_ETAOINSHRDL.,0123456789/-=:;(){}<>"
_TEXT_TABLE = bytes(_ALPHABET[min(len(_ALPHABET) - 1, int((b / 256) ** 1.8 * len(_ALPHABET)))]
                    for b in range(256))


class BenchError(Exception):
    """A step of the benchmark failed (the message says which and where its log is)."""


# -- image --------------------------------------------------------------------------------------------------


PROBE_EVERY = 499  # every 499th generated file's digest is checked in each run's unpacked tree


@dataclass(frozen=True, slots=True, kw_only=True)
class Expected:
    """What the generated image's unpacked tree must hold."""

    files: int
    file_bytes: int
    probes: dict[str, str]  # path -> sha256 hex of a sample of the files
    gen_seconds: float  # generating files and tars (the rest of the build is gzip and digests)


def generate_files(seed: int, nbytes: int, prefix: str) -> dict[str, bytes]:
    """Deterministic files totalling about ``nbytes``: sizes log-uniform in 1-32 KiB, compressing ~2-3x.

    Each file is a slice of a seeded random pool (60% mapped to a text-like alphabet, 10% left
    incompressible) repeated to its size, which is fast enough for hundreds of MiB (``random_files`` is not).
    """
    rng = random.Random(seed)
    pool = rng.randbytes(8 * MIB)
    text_pool = pool.translate(_TEXT_TABLE)
    lo, hi = math.log(1024), math.log(32 * 1024)
    files: dict[str, bytes] = {}
    total = i = 0
    while total < nbytes:
        size = int(math.exp(rng.uniform(lo, hi)))
        kind = rng.random()
        if kind < 0.6:
            src, unique = text_pool, max(256, int(size / rng.uniform(1.3, 2.6)))
        elif kind < 0.9:
            src, unique = pool, max(256, int(size / rng.uniform(2.0, 4.0)))
        else:
            src, unique = pool, size
        off = rng.randrange(len(src) - unique)
        data = (src[off:off + unique] * (size // unique + 1))[:size]
        files[f"{prefix}/{i // 2000:03d}/{i // 50 % 40:02d}/f{i:06d}.dat"] = data
        total += size
        i += 1
    return files


def build_bench_image(size_mb: int, layers: int, seed: int) -> tuple[samples.SampleImage, Expected]:
    """``size_mb`` MiB of generated files in ``layers`` gzip layers (one directory tree per layer)."""
    per_layer = size_mb * MIB // layers
    tars: list[bytes] = []
    count = total = 0
    probes: dict[str, str] = {}
    t0 = time.perf_counter()
    for n in range(layers):
        files = generate_files(seed * 1000 + n, per_layer, f"layer{n}")
        for path, data in files.items():
            if count % PROBE_EVERY == 0:
                probes[path] = hashlib.sha256(data).hexdigest()
            count += 1
            total += len(data)
        tars.append(samples.files_layer(files))
        del files
    gen_seconds = time.perf_counter() - t0
    expect = Expected(files=count, file_bytes=total, probes=probes, gen_seconds=gen_seconds)
    return samples.build_image(tars, compression="gzip"), expect


# -- fresh filesystems --------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], what: str) -> None:
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


def ext4_works(work: Path) -> bool:
    """Whether mkfs.ext4 exists and a loop-mounted ext4 image mounts here."""
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        return False
    try:
        with FreshFS("ext4", work / "probe", 64 * MIB):
            return True
    except (BenchError, OSError):
        return False
    finally:
        shutil.rmtree(work / "probe", ignore_errors=True)


class FreshFS:
    """A new, empty filesystem at ``base/mnt`` for one run; unmounted (and its image removed) on exit."""

    def __init__(self, kind: str, base: Path, size: int, *, keep_image: bool = False) -> None:
        self.kind, self.base, self.size, self.keep_image = kind, base, size, keep_image
        self.mnt = base / "mnt"
        self.image = base / "fs.ext4"

    def __enter__(self) -> Path:
        self.mnt.mkdir(parents=True)
        try:
            if self.kind == "tmpfs":
                _run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.mnt)],
                     "mounting tmpfs")
            else:
                with open(self.image, "wb") as f:
                    f.truncate(self.size)
                # Initialise inode tables and journal now, not in a kernel thread during the measurement.
                _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                      str(self.image)], "mkfs.ext4")
                _run(["mount", "-o", "loop", str(self.image), str(self.mnt)], "mounting ext4 loop image")
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
            shutil.rmtree(self.mnt, ignore_errors=True)


# -- runs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    run: int
    tool: str
    seconds: float
    cpu_seconds: float
    snapshots: int  # committed snapshots after the pull
    files: int  # regular files in the snapshots' upper dirs
    file_bytes: int
    bad_files: tuple[str, ...]  # probed files missing or with other bytes


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True, kw_only=True)
class Tree:
    files: int
    file_bytes: int
    bad: tuple[str, ...]  # probed paths missing or with other bytes


def scan_tree(snapshot_dirs: Path, probes: dict[str, str]) -> Tree:
    """Regular files and bytes in every ``<id>/fs`` upper directory below ``snapshot_dirs`` (both tools'
    overlayfs layout), and which probed files are missing or differ."""
    if not snapshot_dirs.is_dir():
        return Tree(files=0, file_bytes=0, bad=tuple(probes))
    uppers = [d / "fs" for d in snapshot_dirs.iterdir() if (d / "fs").is_dir()]
    bad = []
    for path, want in probes.items():
        found = next((u / path for u in uppers if (u / path).is_file()), None)
        if found is None or hashlib.sha256(found.read_bytes()).hexdigest() != want:
            bad.append(path)
    files = size = 0
    stack = list(uppers)
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    files += 1
                    size += e.stat(follow_symlinks=False).st_size
    return Tree(files=files, file_bytes=size, bad=tuple(bad))


def _env(fs: Path) -> dict[str, str]:
    tmp = fs / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def cargohold_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cargohold.cli.main", "--root", str(root), *args]


def run_cargohold(run: int, fs: Path, ref: str, logs: Path, probes: dict[str, str]) -> RunResult:
    """Time ``cargohold --root FS/root pull --snapshotter overlayfs REF``; check what it unpacked."""
    root = fs / "root"
    log = logs / f"cargohold-{run}.log"
    env = _env(fs)
    cmd = cargohold_cmd(root, "--plain-http", "pull", "--snapshotter", "overlayfs", ref)
    os.sync()
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(log, "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env).returncode
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if rc != 0:
        raise BenchError(f"cargohold pull exited {rc} (log {log}):\n{_tail(log)}")
    ls_cmd = cargohold_cmd(root, "snapshots", "--snapshotter", "overlayfs", "ls", "--output", "json")
    ls = subprocess.run(ls_cmd, capture_output=True, text=True, env=env)
    if ls.returncode != 0:
        raise BenchError(f"cargohold snapshots ls exited {ls.returncode}: {ls.stderr.strip()}")
    committed = sum(1 for s in json.loads(ls.stdout) if str(s["kind"]).lower() == "committed")
    tree = scan_tree(root / "snapshots" / "overlayfs" / "snapshots", probes)
    return RunResult(run=run, tool="cargohold", seconds=seconds, cpu_seconds=cpu, snapshots=committed,
                     files=tree.files, file_bytes=tree.file_bytes, bad_files=tree.bad)


def run_ctr(run: int, fs: Path, ref: str, logs: Path, probes: dict[str, str]) -> RunResult:
    """Time ``ctr images pull --plain-http REF`` (fetch + unpack into overlayfs); check what it unpacked."""
    log = logs / f"ctr-{run}.log"
    with containerd(fs, logs / f"containerd-{run}.log", env=_env(fs)) as (sock, pid):
        ctr = ["ctr", "--address", sock, "-n", NAMESPACE]
        os.sync()
        cpu0, dcpu0, t0 = _children_cpu(), _proc_cpu(pid), time.perf_counter()
        with open(log, "wb") as out:
            rc = subprocess.run([*ctr, "images", "pull", "--plain-http", ref], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        seconds = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0 + _proc_cpu(pid) - dcpu0
        if rc != 0:
            raise BenchError(f"ctr images pull exited {rc} (log {log}):\n{_tail(log)}")
        check = subprocess.run([*ctr, "images", "check"], capture_output=True, text=True).stdout
        line = next((ln for ln in check.splitlines() if ln.startswith(ref + " ")), "")
        if "complete" not in line.split() or "true" not in line.split():
            raise BenchError(f"ctr images check: {ref} is not complete and unpacked:\n{check}")
        snaps = subprocess.run([*ctr, "snapshots", "ls"], capture_output=True, text=True).stdout
        committed = sum(1 for ln in snaps.splitlines()[1:] if ln.split()[-1:] == ["Committed"])
    tree = scan_tree(fs / "containerd/root/io.containerd.snapshotter.v1.overlayfs/snapshots", probes)
    return RunResult(run=run, tool="ctr", seconds=seconds, cpu_seconds=cpu, snapshots=committed,
                     files=tree.files, file_bytes=tree.file_bytes, bad_files=tree.bad)


# -- main ---------------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cargohold.devtools.bench",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=500, help="MiB of file data in the image (default 500)")
    p.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    p.add_argument("--runs", type=int, default=3, help="runs per tool, alternating (default 3)")
    p.add_argument("--fs", choices=["ext4", "tmpfs"], default=None,
                   help="fresh filesystem per run (default: ext4 loop image when it works, else tmpfs)")
    p.add_argument("--only", choices=TOOLS, default=None, help="run one tool only (no ratio)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated image (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (registry, logs, ext4 images)")
    p.add_argument("--output", "-o", choices=["table", "json"], default="table")
    p.add_argument("--no-transfer", action="store_true",
                   help="skip the transfer half (export/import vs ctr, copy vs skopeo, rootfs vs umoci)")
    args = p.parse_args(argv)
    if args.size_mb < 1 or args.layers < 1 or args.runs < 1:
        p.error("--size-mb, --layers and --runs must be at least 1")
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _preflight(tools: Sequence[str], transfer: bool) -> None:
    if os.geteuid() != 0:
        raise BenchError("the benchmark mounts filesystems: run it as root")
    needed = ["docker-registry", *(["containerd", "ctr"] if "ctr" in tools else []),
              *(bench_transfer.needed_commands() if transfer else [])]
    missing = [c for c in needed if not shutil.which(c)]
    if missing:
        raise BenchError(f"missing commands: {', '.join(missing)} (scripts/install-system-deps.sh bench)")


def _version(cmd: str) -> str:
    try:
        return subprocess.run([cmd, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _check(r: RunResult, layers: int, expect: Expected, logs: Path) -> None:
    if (r.snapshots, r.files, r.file_bytes) != (layers, expect.files, expect.file_bytes) or r.bad_files:
        bad = f"; wrong or missing: {', '.join(r.bad_files[:5])}" if r.bad_files else ""
        raise BenchError(
            f"{r.tool} run {r.run} left {r.snapshots} committed snapshots, {r.files} files, {r.file_bytes} "
            f"bytes; expected {layers}, {expect.files}, {expect.file_bytes}{bad} (logs in {logs})")


def measure(args: argparse.Namespace, tools: Sequence[str], work: Path, fs_kind: str, ref: str,
            expect: Expected, say: Say) -> list[RunResult]:
    """Alternate the tools ``args.runs`` times, each on a fresh filesystem; every run is checked."""
    logs = work / "logs"
    fs_size = max(2048, 4 * args.size_mb + 1024) * MIB
    results: list[RunResult] = []
    for run in range(1, args.runs + 1):
        for tool in tools:
            with FreshFS(fs_kind, work / f"{tool}-{run}", fs_size, keep_image=args.keep) as fs:
                runner = run_cargohold if tool == "cargohold" else run_ctr
                r = runner(run, fs, ref, logs, expect.probes)
            _check(r, args.layers, expect, logs)
            results.append(r)
            say(f"run {run} {tool:<9} {r.seconds:7.2f}s  cpu {r.cpu_seconds:6.2f}s  ok: "
                f"{r.snapshots} snapshots, {r.files} files")
    return results


def measure_transfer(args: argparse.Namespace, work: Path, fs_kind: str, ref: str, expect: Expected, say: Say
                     ) -> list[bench_transfer.StepResult]:
    """The transfer steps, cargohold and its rivals alternating, each run on fresh filesystems."""
    logs = work / "logs"
    fs_size = max(2048, 8 * args.size_mb + 1024) * MIB
    results: list[bench_transfer.StepResult] = []
    for run in range(1, args.runs + 1):
        for tool in ("cargohold", "rivals"):
            with FreshFS(fs_kind, work / f"transfer-{tool}-{run}", fs_size, keep_image=args.keep) as fs:
                try:
                    results.extend(bench_transfer.run_transfer(run, tool, fs, ref, logs, expect.files, say))
                except (bench_transfer.TransferError, ContainerdError) as exc:
                    raise BenchError(str(exc)) from exc
    return results


def bench(args: argparse.Namespace, say: Say) -> dict[str, object]:
    """Build and push the image, run the measurements; returns the report (see ``--output json``)."""
    tools = (args.only,) if args.only else TOOLS
    transfer = not args.no_transfer and not args.only
    _preflight(tools, transfer)
    work = Path(tempfile.mkdtemp(prefix="cargohold-bench-"))
    (work / "logs").mkdir()
    try:
        fs_kind = args.fs or ("ext4" if ext4_works(work) else "tmpfs")
        say(f"work dir {work}; a fresh {fs_kind} filesystem per run")
        t0 = time.perf_counter()
        image, expect = build_bench_image(args.size_mb, args.layers, args.seed)
        build_s = time.perf_counter() - t0
        tar_bytes = sum(len(t) for t in image.uncompressed)
        gz_bytes = sum(b.descriptor.size for b in image.layers)
        say(f"image: {args.layers} layers, {expect.files} files, {expect.file_bytes / MIB:.1f} MiB of files, "
            f"tar {tar_bytes / MIB:.1f} MiB, gzip {gz_bytes / MIB:.1f} MiB ({tar_bytes / gz_bytes:.2f}x); "
            f"built in {build_s:.1f}s (files+tar {expect.gen_seconds:.1f}s, "
            f"gzip+digests {build_s - expect.gen_seconds:.1f}s)")
        with start_registry(work / "registry") as reg:
            ref = f"{reg.url.split('://', 1)[1]}/{REPO}:{TAG}"
            t0 = time.perf_counter()
            samples.push(reg.url, REPO, TAG, image)
            push_s = time.perf_counter() - t0
            digest = str(image.digest)
            del image  # hundreds of MiB we no longer need (tmpfs runs use RAM)
            say(f"pushed {ref} ({digest}) in {push_s:.1f}s (not part of the measurement)")
            results = measure(args, tools, work, fs_kind, ref, expect, say)
            moved = measure_transfer(args, work, fs_kind, ref, expect, say) if transfer else []
        medians = {t: statistics.median(r.seconds for r in results if r.tool == t) for t in tools}
        return {
            "config": {"size_mb": args.size_mb, "layers": args.layers, "runs": args.runs, "fs": fs_kind,
                       "seed": args.seed, "work_dir": str(work) if args.keep else None},
            "versions": {"python": sys.version.split()[0], "containerd": _version("containerd"),
                         "ctr": _version("ctr")},
            "image": {"ref": ref, "digest": digest, "files": expect.files,
                      "file_bytes": expect.file_bytes, "tar_bytes": tar_bytes, "compressed_bytes": gz_bytes,
                      "build_seconds": round(build_s, 3), "push_seconds": round(push_s, 3)},
            "runs": [asdict(r) for r in results],
            "median_seconds": medians,
            "ratio": medians["cargohold"] / medians["ctr"] if len(medians) == 2 else None,
            "transfer": {
                "runs": [asdict(r) for r in moved],
                "median_seconds": bench_transfer.medians(moved),
                "ratios": bench_transfer.ratios(bench_transfer.medians(moved)),
            },
        }
    finally:
        unmount_tree(work)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


class Say:
    """Progress lines: stdout in table mode, stderr in json mode (stdout then holds only the JSON)."""

    def __init__(self, to_stderr: bool) -> None:
        self.stream = sys.stderr if to_stderr else sys.stdout

    def __call__(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)


def print_table(report: dict[str, object]) -> None:
    runs = report["runs"]
    assert isinstance(runs, list)
    print(f"\n{'run':>3}  {'tool':<9}  {'seconds':>8}  {'cpu s':>7}  {'snapshots':>9}  {'files':>7}")
    for r in runs:
        print(f"{r['run']:>3}  {r['tool']:<9}  {r['seconds']:8.2f}  {r['cpu_seconds']:7.2f}  "
              f"{r['snapshots']:>9}  {r['files']:>7}")
    medians = report["median_seconds"]
    assert isinstance(medians, dict)
    for tool, m in medians.items():
        print(f"median {tool:<9} {m:8.2f}s")
    if report["ratio"] is not None:
        print(f"ratio cargohold/ctr (median): {report['ratio']:.2f}x")
    transfer = report["transfer"]
    assert isinstance(transfer, dict)
    for step, tools in transfer["median_seconds"].items():
        line = "  ".join(f"{tool} {sec:.2f}s" for tool, sec in tools.items())
        print(f"transfer {step:<7} median  {line}")
    for step, ratio in transfer["ratios"].items():
        print(f"ratio {step} cargohold/{bench_transfer.RIVALS[step]} (median): {ratio:.2f}x")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report = bench(args, Say(args.output == "json"))
    except (BenchError, ContainerdError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted (everything unmounted and stopped)", file=sys.stderr)
        return 130
    if args.output == "json":
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
