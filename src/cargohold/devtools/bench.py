"""``make bench``: cargohold against containerd 1.6, skopeo, umoci and a raw ``curl | pigz | tar`` floor on the
same images, in one run, every run checked; medians, ratios and the issue's targets in a table and a chart.

Images (``benchimages``, deterministic, built once per bench run, pushed to one docker-registry on 127.0.0.1):
``main`` (4 layers, ~24k files, ~547 MB of tar, ~4x gzip; ``--scale N`` makes N times the files), ``many-layer``
(40 small layers), ``huge`` (one layer of ``--huge-mb`` MiB of files).

Scenarios (tools alternate run by run, their order rotated each run; each run on a brand-new filesystem, a
loop-mounted ext4 by default):

* ``pull``: ``cargohold pull`` (overlayfs) vs ``ctr images pull`` vs the raw floor (for each layer in turn:
  ``curl -sf BLOB | pigz -dc | tar --xattrs -x -C DIR``; no digest is verified, nothing is fsynced); then a
  second ``cargohold pull`` of the complete, unpacked image, which must fetch nothing and apply no layer.
* ``native``: ``cargohold pull --snapshotter native`` vs ``ctr images pull --snapshotter native``.
* ``transfer``: export, import (with unpack), copy to an oci-archive, flatten to a rootfs (``bench_transfer``).
* ``slow``: a rate-limited proxy (``--rate-mb`` MB/s, one token bucket for all connections) in front of the
  registry; the pure download time (``curl`` fetching every blob of the image) vs ``cargohold pull`` vs ``ctr``.
* ``rss``: peak RSS of the whole ``cargohold pull`` process tree, sampled every 20 ms, for the main image and
  the ``--scale``d one.
* ``many``, ``huge``: pull vs ``ctr`` vs the raw floor on those images (``--huge-runs`` runs for huge).

Checks (untimed; a failure fails the bench naming run, tool and path): per-layer reference listings made once
from the layer tars (type, mode, owner, size, sha256, link target, xattrs) against every snapshot's upper dir
(overlayfs), the top snapshot's tree (native), each raw-floor directory, and rootfs trees; ``images check``;
``ctr images check``; archives blob by blob.

Output: ``bench/results/`` (``--results-dir``): ``results.md``, ``results.json``, ``chart.png``. ``--quick``:
small images, 2 runs, results in a temporary directory.

Needs root (mounts), containerd/ctr, skopeo, umoci, docker-registry, curl, pigz, GNU tar, mkfs.ext4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from cargohold.devtools import bench_transfer, benchchart, benchimages, benchtree
from cargohold.devtools.benchnet import RateLimitedProxy
from cargohold.devtools.benchrun import (
    MIB,
    BenchError,
    FreshFS,
    Reference,
    Run,
    cargohold_cmd,
    check_cargohold_images,
    check_ctr_images,
    check_native,
    check_overlay,
    check_raw,
    ext4_works,
    fs_env,
    proc_cpu,
    timed,
    unmount_tree,
)
from cargohold.devtools.containerd import ContainerdError, containerd
from cargohold.devtools.registry import start_registry

NAMESPACE = "bench"
SCENARIOS = ("pull", "native", "transfer", "slow", "rss", "many", "huge")
Say = Callable[[str], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """``tool``'s median over ``rival``'s (or an absolute value when ``rival`` is empty) must be <= ``limit``."""

    scenario: str
    tool: str
    rival: str
    limit: float
    unit: str = "x"  # "x" ratio, "s" seconds, "MB"


TARGETS = (
    Target(scenario="pull overlayfs", tool="cargohold", rival="ctr", limit=0.25),
    Target(scenario="pull overlayfs", tool="cargohold", rival="raw-floor", limit=1.0),
    Target(scenario="second pull", tool="cargohold", rival="", limit=0.3, unit="s"),
    Target(scenario="pull native", tool="cargohold", rival="ctr", limit=0.35),
    Target(scenario="import", tool="cargohold", rival="ctr", limit=0.3),
    Target(scenario="export", tool="cargohold", rival="ctr", limit=0.25),
    Target(scenario="slow network", tool="cargohold", rival="download", limit=1.15),
    Target(scenario="many-layer", tool="cargohold", rival="ctr", limit=0.25),
    Target(scenario="many-layer", tool="cargohold", rival="raw-floor", limit=1.0),
    Target(scenario="huge", tool="cargohold", rival="ctr", limit=0.25),
    Target(scenario="huge", tool="cargohold", rival="raw-floor", limit=1.0),
)
RSS_LIMIT_MB = 120.0
RSS_FLAT = 1.25  # the scaled image's peak over the main image's


@dataclass(frozen=True, slots=True, kw_only=True)
class Pushed:
    image: benchimages.BenchImage
    ref: str  # host:port/repo:tag
    repo: str
    reference: Reference


class Bench:
    """One bench run: its work dir, registry, images and collected runs."""

    def __init__(self, args: argparse.Namespace, work: Path, fs_kind: str, say: Say) -> None:
        self.args, self.work, self.fs_kind, self.say = args, work, fs_kind, say
        self.logs = work / "logs"
        self.runs: list[Run] = []
        self.profiles: dict[str, str] = {}
        self.registry_url = ""

    def tools(self, *tools: str, run: int) -> tuple[str, ...]:
        """``tools`` in the order for run ``run`` (rotated each run, so that no tool always goes first), or only
        cargohold with ``--only cargohold`` (no rival, no ratio: for development)."""
        if self.args.only:
            return tuple(t for t in tools if t == self.args.only)
        k = (run - 1) % len(tools)
        return tools[k:] + tools[:k]

    def profile(self, scenario: str, p: Pushed) -> None:
        """One more, untimed pull with ``--profile`` (when this cargohold has it): where the time goes."""
        helptext = subprocess.run(cargohold_cmd(self.work, "pull", "--help"), capture_output=True, text=True).stdout
        if "--profile" not in helptext:
            return
        with self.fresh(f"profile-{scenario.replace(' ', '-')}", p.image) as fs:
            proc = subprocess.run(cargohold_cmd(fs / "root", "pull", "--profile", p.ref), capture_output=True,
                                  text=True, env=fs_env(fs), stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise BenchError(f"{scenario}: cargohold pull --profile exited {proc.returncode}: {proc.stderr.strip()}")
        self.profiles[scenario] = (proc.stdout + proc.stderr).strip()
        self.say(f"{scenario}: cargohold pull --profile (untimed):\n{self.profiles[scenario]}")

    def fresh(self, name: str, image: benchimages.BenchImage) -> FreshFS:
        size = max(2048 * MIB, 5 * image.tar_bytes + 1024 * MIB)
        return FreshFS(self.fs_kind, self.work / "fs" / name, size, keep_image=self.args.keep)

    def add(self, r: Run) -> None:
        self.runs.append(r)
        rss = f"  rss {r.rss_sum_mb:.0f} MB (largest process {r.rss_max_mb:.0f} MB)" if r.rss_sum_mb else ""
        self.say(f"run {r.run} {r.scenario:<15} {r.tool:<10} {r.seconds:7.2f}s  cpu {r.cpu_seconds:6.2f}s{rss}"
                 f"  ok: {r.check}")

    # -- the tools ------------------------------------------------------------------------------------------

    def cargohold_pull(self, scenario: str, run: int, fs: Path, p: Pushed, *, ref: str | None = None,
                       snapshotter: str = "overlayfs", rss: bool = False, second: bool = False) -> None:
        root, env = fs / "root", fs_env(fs)
        label = f"run {run} {scenario} cargohold"
        log = self.logs / f"{scenario.replace(' ', '-')}-cargohold-{run}.log"
        name = ref or p.ref
        t = timed(cargohold_cmd(root, "pull", "--snapshotter", snapshotter, "--output", "json", name), log,
                  env=env, rss=rss, what=f"{label}: cargohold pull")
        check_cargohold_images(label, root, name, snapshotter, env)
        snaps = root / "snapshots" / snapshotter / "snapshots"
        tree = (check_overlay if snapshotter == "overlayfs" else check_native)(label, snaps, p.reference)
        self.add(Run(scenario=scenario, tool="cargohold", run=run, seconds=t.seconds, cpu_seconds=t.cpu_seconds,
                     rss_sum_mb=t.rss_sum_mb, rss_max_mb=t.rss_max_mb,
                     check=f"images check complete; {tree}"))
        if not second:
            return
        label = f"run {run} second pull cargohold"
        t = timed(cargohold_cmd(root, "pull", "--snapshotter", snapshotter, "--output", "json", name), log,
                  env=env, what=f"{label}: cargohold pull")
        out = json.loads(t.stdout)
        statuses = sorted({layer["status"] for layer in out["unpack"]["layers"]})
        if out["fetched"] or statuses != ["exists"]:
            raise BenchError(f"{label}: the second pull fetched {out['fetched']} and left layer statuses "
                             f"{statuses}: expected nothing fetched and every layer 'exists'")
        self.add(Run(scenario="second pull", tool="cargohold", run=run, seconds=t.seconds,
                     cpu_seconds=t.cpu_seconds, check="nothing fetched, every layer exists"))

    def ctr_pull(self, scenario: str, run: int, fs: Path, p: Pushed, *, ref: str | None = None,
                 snapshotter: str = "overlayfs") -> None:
        label = f"run {run} {scenario} ctr"
        log = self.logs / f"{scenario.replace(' ', '-')}-ctr-{run}.log"
        name = ref or p.ref
        with containerd(fs, self.logs / f"containerd-{scenario.replace(' ', '-')}-{run}.log", env=fs_env(fs)) as (
                sock, pid):
            ctr = ["ctr", "--address", sock, "-n", NAMESPACE]
            daemon0 = proc_cpu(pid)
            t = timed([*ctr, "images", "pull", "--plain-http", "--snapshotter", snapshotter, name], log,
                      what=f"{label}: ctr images pull")
            daemon = proc_cpu(pid) - daemon0
            check_ctr_images(label, ctr, name, snapshotter)
        snaps = fs / "containerd/root" / f"io.containerd.snapshotter.v1.{snapshotter}" / "snapshots"
        tree = (check_overlay if snapshotter == "overlayfs" else check_native)(label, snaps, p.reference)
        # CPU of ctr and of the containerd daemon during the pull (the daemon does the work).
        self.add(Run(scenario=scenario, tool="ctr", run=run, seconds=t.seconds, cpu_seconds=t.cpu_seconds + daemon,
                     check=f"ctr images check complete; {tree}"))

    def raw_floor(self, scenario: str, run: int, fs: Path, p: Pushed) -> None:
        """For each layer in turn: ``curl -s BLOB | pigz -dc | tar -x`` into its own directory."""
        dirs = [fs / "raw" / str(n) for n in range(len(p.image.layers))]
        lines = ["set -eu -o pipefail"]
        for layer, d in zip(p.image.layers, dirs, strict=True):
            d.mkdir(parents=True)
            url = f"{self.registry_url}/v2/{p.repo}/blobs/{layer.digest}"
            lines.append(f"curl -sf '{url}' | pigz -dc | tar --xattrs '--xattrs-include=*' -x -C '{d}'")
        log = self.logs / f"{scenario.replace(' ', '-')}-raw-{run}.log"
        t = timed(["bash", "-c", "\n".join(lines)], log, env=fs_env(fs), what=f"run {run} {scenario} raw floor")
        check = check_raw(f"run {run} {scenario} raw-floor", dirs, p.reference)
        self.add(Run(scenario=scenario, tool="raw-floor", run=run, seconds=t.seconds, cpu_seconds=t.cpu_seconds,
                     check=check))

    def download(self, run: int, fs: Path, p: Pushed, base: str) -> None:
        """``curl`` fetching every blob of the image (manifest, config, layers) through the slow proxy."""
        blobs = p.image.blob_digests()
        cmd = ["curl", "-sf"]
        for digest in blobs:
            kind = "manifests" if digest == p.image.digest else "blobs"
            accept = ["-H", "Accept: application/vnd.oci.image.manifest.v1+json"] if kind == "manifests" else []
            cmd += [*accept, "-o", str(fs / digest.replace(":", "-")), f"{base}/v2/{p.repo}/{kind}/{digest}"]
        t = timed(cmd, self.logs / f"slow-download-{run}.log", what=f"run {run} slow network download")
        for digest, size in blobs.items():  # hashing is not timed
            path = fs / digest.replace(":", "-")
            if benchtree.hash_file(path) != (size, digest[7:]):
                raise BenchError(f"run {run} slow network download: {path} is not {digest} ({size} bytes)")
        self.add(Run(scenario="slow network", tool="download", run=run, seconds=t.seconds,
                     cpu_seconds=t.cpu_seconds, check=f"{len(blobs)} blobs verified"))

    # -- scenarios ------------------------------------------------------------------------------------------

    def pull(self, scenario: str, p: Pushed, runs: int, *, second: bool = False) -> None:
        self.profile(scenario, p)
        for run in range(1, runs + 1):
            for tool in self.tools("cargohold", "ctr", "raw-floor", run=run):
                with self.fresh(f"{scenario.replace(' ', '-')}-{tool}-{run}", p.image) as fs:
                    if tool == "cargohold":
                        self.cargohold_pull(scenario, run, fs, p, second=second)
                    elif tool == "ctr":
                        self.ctr_pull(scenario, run, fs, p)
                    else:
                        self.raw_floor(scenario, run, fs, p)

    def native(self, p: Pushed, runs: int) -> None:
        for run in range(1, runs + 1):
            for tool in self.tools("cargohold", "ctr", run=run):
                with self.fresh(f"native-{tool}-{run}", p.image) as fs:
                    if tool == "cargohold":
                        self.cargohold_pull("pull native", run, fs, p, snapshotter="native")
                    else:
                        self.ctr_pull("pull native", run, fs, p, snapshotter="native")

    def transfer(self, p: Pushed, runs: int) -> None:
        for run in range(1, runs + 1):
            for side in self.tools("cargohold", "rivals", run=run):
                with self.fresh(f"transfer-{side}-{run}", p.image) as fs:
                    for r in bench_transfer.run_transfer(run, side, fs, p.ref, self.logs, p.image.blob_digests(),
                                                         p.reference, lambda _msg: None):
                        self.add(r)

    def slow(self, p: Pushed, runs: int, port: int) -> None:
        rate = self.args.rate_mb * 1e6
        with RateLimitedProxy(("127.0.0.1", port), rate) as proxy:
            base = f"http://127.0.0.1:{proxy.port}"
            ref = f"127.0.0.1:{proxy.port}/{p.repo}:v1"
            self.say(f"slow network: proxy 127.0.0.1:{proxy.port} -> registry at {self.args.rate_mb:g} MB/s")
            for run in range(1, runs + 1):
                for tool in self.tools("download", "cargohold", "ctr", run=run):
                    with self.fresh(f"slow-{tool}-{run}", p.image) as fs:
                        if tool == "download":
                            self.download(run, fs, p, base)
                        elif tool == "cargohold":
                            self.cargohold_pull("slow network", run, fs, p, ref=ref)
                        else:
                            self.ctr_pull("slow network", run, fs, p, ref=ref)

    def rss(self, images: Sequence[Pushed], runs: int) -> None:
        for p in images:
            for run in range(1, runs + 1):
                with self.fresh(f"rss-{p.image.shape.name}-{run}", p.image) as fs:
                    self.cargohold_pull(f"rss {p.image.shape.name}", run, fs, p, rss=True)


# -- images -------------------------------------------------------------------------------------------------


def _reference(image: benchimages.BenchImage) -> Reference:
    raw = tuple(benchtree.layer_listing(layer.path, "raw") for layer in image.layers)
    overlay = tuple(benchtree.layer_listing(layer.path, "overlay") for layer in image.layers)
    return Reference(raw=raw, overlay=overlay, merged=benchtree.merge(raw))


def prepare(shape: benchimages.Shape, work: Path, registry_url: str, say: Say) -> Pushed:
    t0 = time.perf_counter()
    image = benchimages.build(shape, work / "images")
    built = time.perf_counter() - t0
    repo = f"bench/{shape.name}"
    benchimages.push(image, registry_url, repo, "v1")
    reference = _reference(image)
    for layer in image.layers:  # pushed and listed: the registry holds the bytes now
        layer.path.unlink()
    say(f"image {image.describe()}; built in {built:.1f}s, pushed and listed in "
        f"{time.perf_counter() - t0 - built:.1f}s (not measured)")
    return Pushed(image=image, ref=f"{registry_url.split('://', 1)[1]}/{repo}:v1", repo=repo, reference=reference)


# -- report -------------------------------------------------------------------------------------------------


def medians(runs: Sequence[Run]) -> dict[str, dict[str, float]]:
    """scenario -> tool -> median seconds."""
    out: dict[str, dict[str, float]] = {}
    for r in runs:
        out.setdefault(r.scenario, {})[r.tool] = 0.0
    for scenario, tools in out.items():
        for tool in tools:
            tools[tool] = statistics.median(r.seconds for r in runs if r.scenario == scenario and r.tool == tool)
    return out


def rows(runs: Sequence[Run]) -> list[dict[str, object]]:
    """The table: one row per scenario and tool, plus one per target (ratio, limit, pass/fail)."""
    timed_runs = [r for r in runs if r.rss_sum_mb is None]  # sampled runs are reported by their peak RSS
    meds = medians(timed_runs)
    out: list[dict[str, object]] = []
    for scenario, tools in meds.items():
        for tool, median in tools.items():
            n = sum(1 for r in timed_runs if r.scenario == scenario and r.tool == tool)
            row: dict[str, object] = {"scenario": scenario, "tool": tool, "median_s": median, "runs": n,
                                      "ratio": None, "rival": None, "target": None, "pass": None}
            targets = [t for t in TARGETS if t.scenario == scenario and t.tool == tool]
            rival = bench_transfer.RIVALS.get(scenario)
            if not targets and tool == "cargohold" and rival in tools:
                targets = [Target(scenario=scenario, tool=tool, rival=rival, limit=float("inf"))]
            if scenario == "slow network" and tool == "ctr":
                targets = [Target(scenario=scenario, tool=tool, rival="download", limit=float("inf"))]
            targets = [t for t in targets if not t.rival or t.rival in tools]
            if not targets:
                out.append(row)
            for t in targets:
                value = median if not t.rival else median / tools[t.rival] if tools.get(t.rival) else None
                out.append({**row, "rival": t.rival or None, "ratio": value if t.rival else None,
                            "target": None if t.limit == float("inf") else f"<= {t.limit:g}{t.unit}",
                            "pass": None if t.limit == float("inf") or value is None else value <= t.limit})
    rss = [r for r in runs if r.rss_sum_mb is not None]
    for name in sorted({r.scenario for r in rss}):
        peak = max(r.rss_sum_mb or 0.0 for r in rss if r.scenario == name)
        one = max(r.rss_max_mb or 0.0 for r in rss if r.scenario == name)
        out.append({"scenario": name, "tool": "cargohold", "median_s": None, "runs": sum(
            1 for r in rss if r.scenario == name), "ratio": None, "rival": None, "peak_rss_mb": peak,
            "largest_process_mb": one, "target": f"<= {RSS_LIMIT_MB:g} MB", "pass": peak <= RSS_LIMIT_MB})
    base = [r for r in out if r["scenario"] == "rss main"]
    for row in [r for r in out if str(r["scenario"]).startswith("rss main-x")]:
        if base:
            flat = float(row["peak_rss_mb"]) / float(base[0]["peak_rss_mb"])  # type: ignore[arg-type]
            out.append({"scenario": f"{row['scenario']} / rss main", "tool": "cargohold", "median_s": None,
                        "runs": row["runs"], "ratio": flat, "rival": "rss main",
                        "target": f"<= {RSS_FLAT:g}x", "pass": flat <= RSS_FLAT})
    return out


def versions() -> dict[str, str]:
    def first_line(cmd: Sequence[str]) -> str:
        try:
            proc = subprocess.run(list(cmd), capture_output=True, text=True)
        except OSError:
            return "missing"
        return ((proc.stdout or proc.stderr).strip().splitlines() or [""])[0]

    return {"containerd": first_line(["containerd", "--version"]), "ctr": first_line(["ctr", "--version"]),
            "skopeo": first_line(["skopeo", "--version"]), "umoci": first_line(["umoci", "--version"]),
            "curl": first_line(["curl", "--version"]), "pigz": first_line(["pigz", "--version"]),
            "tar": first_line(["tar", "--version"]), "python": sys.version.split()[0],
            "kernel": platform.release(), "docker-registry": first_line(["docker-registry", "--version"])}


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _cells(r: dict[str, Any]) -> tuple[str, str, str]:
    """A result row's ratio, median and pass cells, as both the table and results.md print them."""
    ratio = f"{r['ratio']:.2f}x {r['rival']}" if r.get("ratio") is not None else "-"
    ok = {True: "pass", False: "FAIL", None: "-"}[r.get("pass")]
    return ratio, _fmt(r.get("median_s"), ".2f"), ok


def results_md(report: dict[str, object]) -> str:
    lines = ["# make bench results", "",
             "Medians of alternating runs, each on a fresh filesystem; every run checked (see the README). "
             "Ratio = tool median / rival median.", "",
             "| scenario | tool | median s | runs | ratio vs rival | target | pass |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:  # type: ignore[attr-defined]
        ratio, median, ok = _cells(r)
        if r.get("peak_rss_mb") is not None:
            median = f"peak RSS {r['peak_rss_mb']:.0f} MB (largest process {r['largest_process_mb']:.0f} MB)"
        lines.append(f"| {r['scenario']} | {r['tool']} | {median} | {r['runs']} | {ratio} | "
                     f"{r.get('target') or '-'} | {ok} |")
    lines += ["", "## Images", ""]
    for img in report["images"].values():  # type: ignore[attr-defined]
        lines.append(f"- {img['describe']}")
    profiles = report.get("profiles") or {}
    for scenario, text in profiles.items():  # type: ignore[attr-defined]
        lines += ["", f"## Where the time goes: {scenario} (`cargohold pull --profile`, one untimed run)", "",
                  "```", text, "```"]
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]  # type: ignore[attr-defined]
    cfg = report["config"]
    lines += ["", f"Filesystem per run: {cfg['fs']}. Runs: {cfg['runs']} (huge: {cfg['huge_runs']}). "  # type: ignore[index]
              f"Slow network: {cfg['rate_mb']} MB/s.",  # type: ignore[index]
              "Raw floor: `curl -sf BLOB | pigz -dc | tar --xattrs -x -C DIR`, layer after layer (no digest "
              "verified, nothing fsynced). umoci: `umoci raw unpack` (no mtree, no runtime config). CPU seconds "
              "(results.json) of a `ctr images pull` include the containerd daemon's; of other ctr commands "
              "only ctr's.", ""]
    return "\n".join(lines)


def write_results(report: dict[str, object], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(results_md(report))
    groups = [(scenario, list(tools.items()))
              for scenario, tools in report["median_seconds"].items()]  # type: ignore[attr-defined]
    title = "make bench: median seconds (each group scaled to its tallest bar)"
    benchchart.write_chart(out / "chart.png", title, groups)


# -- main ---------------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cargohold.devtools.bench",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=None, help="runs per tool, alternating (default 5; --quick 2)")
    p.add_argument("--scale", type=int, default=1, help="also measure peak RSS on the main image with N times "
                   "the files per layer (default 1: only the main image)")
    p.add_argument("--huge-mb", type=int, default=None, help="MiB of files in the huge image (default 2048; "
                   "--quick 32)")
    p.add_argument("--huge-runs", type=int, default=None, help="runs for the huge image (default 3; --quick 1)")
    p.add_argument("--rate-mb", type=float, default=None,
                   help="the slow network's rate in MB/s (default 40; --quick 4)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (default all)")
    p.add_argument("--only", choices=["cargohold"], default=None,
                   help="run cargohold only (no rivals, no ratios): for development")
    p.add_argument("--fs", choices=["ext4", "tmpfs"], default=None,
                   help="fresh filesystem per run (default: ext4 loop image when it works, else tmpfs)")
    p.add_argument("--quick", action="store_true", help="small images, 2 runs, results in a temporary directory")
    p.add_argument("--results-dir", type=Path, default=None, help="default bench/results (--quick: a temp dir)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated images (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (registry, logs, ext4 images)")
    p.add_argument("--output", "-o", choices=["table", "json"], default="table")
    args = p.parse_args(argv)
    args.runs = args.runs or (2 if args.quick else 5)
    args.huge_mb = args.huge_mb or (32 if args.quick else 2048)
    args.huge_runs = args.huge_runs or (1 if args.quick else 3)
    args.rate_mb = args.rate_mb or (4.0 if args.quick else 40.0)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {unknown[0]!r}: choose from {', '.join(SCENARIOS)}")
    args.scenarios = chosen
    if min(args.runs, args.scale, args.huge_mb, args.huge_runs) < 1 or args.rate_mb <= 0:
        p.error("--runs, --scale, --huge-mb, --huge-runs and --rate-mb must be positive")
    return args


def _preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("the benchmark mounts filesystems: run it as root")
    needed = ["docker-registry", "curl", "pigz", "tar", "bash", "mkfs.ext4", "losetup",
              *bench_transfer.needed_commands()]
    missing = [c for c in needed if not shutil.which(c)]
    if missing:
        raise BenchError(f"missing commands: {', '.join(missing)} (scripts/install-system-deps.sh bench)")


def bench(args: argparse.Namespace, say: Say) -> dict[str, object]:
    """Build and push the images, run the scenarios; returns the report (``--output json``)."""
    _preflight()
    work = Path(tempfile.mkdtemp(prefix="cargohold-bench-"))
    (work / "logs").mkdir()
    try:
        fs_kind = args.fs or ("ext4" if ext4_works(work) else "tmpfs")
        say(f"work dir {work}; a fresh {fs_kind} filesystem per run; scenarios {','.join(args.scenarios)}")
        b = Bench(args, work, fs_kind, say)
        chosen = set(args.scenarios)
        with start_registry(work / "registry") as reg:
            b.registry_url = reg.url
            images: dict[str, Pushed] = {}
            if chosen & {"pull", "native", "transfer", "slow", "rss"}:
                images["main"] = prepare(benchimages.main_shape(quick=args.quick, seed=args.seed), work, reg.url,
                                         say)
            if "rss" in chosen and args.scale > 1:
                images["scaled"] = prepare(benchimages.main_shape(args.scale, quick=args.quick, seed=args.seed),
                                           work, reg.url, say)
            if "many" in chosen:
                images["many"] = prepare(benchimages.many_shape(quick=args.quick, seed=args.seed), work, reg.url,
                                         say)
            if "huge" in chosen:
                images["huge"] = prepare(benchimages.huge_shape(args.huge_mb, seed=args.seed), work, reg.url, say)
            if "pull" in chosen:
                b.pull("pull overlayfs", images["main"], args.runs, second=True)
            if "native" in chosen:
                b.native(images["main"], args.runs)
            if "transfer" in chosen:
                b.transfer(images["main"], args.runs)
            if "slow" in chosen:
                b.slow(images["main"], args.runs, int(reg.url.rsplit(":", 1)[1]))
            if "rss" in chosen:
                b.rss([images[k] for k in ("main", "scaled") if k in images], min(args.runs, 2))
            if "many" in chosen:
                b.pull("many-layer", images["many"], args.runs)
            if "huge" in chosen:
                b.pull("huge", images["huge"], args.huge_runs)
        return {
            "config": {"runs": args.runs, "huge_runs": args.huge_runs, "huge_mb": args.huge_mb,
                       "scale": args.scale, "rate_mb": args.rate_mb, "fs": fs_kind, "seed": args.seed,
                       "quick": args.quick, "scenarios": args.scenarios, "only": args.only,
                       "work_dir": str(work) if args.keep else None},
            "versions": versions(),
            "images": {k: {"describe": p.image.describe(), "digest": p.image.digest, "layers": len(p.image.layers),
                           "files": p.image.files, "tar_bytes": p.image.tar_bytes,
                           "compressed_bytes": p.image.gz_bytes} for k, p in images.items()},
            "runs": [asdict(r) for r in b.runs],
            "median_seconds": medians([r for r in b.runs if r.rss_sum_mb is None]),
            "rows": rows(b.runs),
            "profiles": b.profiles,
        }
    finally:
        unmount_tree(work)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def print_table(report: dict[str, object], out: Path) -> None:
    print()
    print(f"{'scenario':<26} {'tool':<10} {'median s':>9} {'runs':>4}  {'ratio':<18} {'target':<10} pass")
    for r in report["rows"]:  # type: ignore[attr-defined]
        ratio, median, ok = _cells(r)
        if r.get("peak_rss_mb") is not None:
            median = f"{r['peak_rss_mb']:.0f} MB"
        print(f"{r['scenario']:<26} {r['tool']:<10} {median:>9} {r['runs']:>4}  {ratio:<18} "
              f"{r.get('target') or '-':<10} {ok}")
    print(f"\nresults: {out}/results.md, results.json, chart.png")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stream = sys.stderr if args.output == "json" else sys.stdout

    def say(msg: str) -> None:
        print(msg, file=stream, flush=True)

    try:
        report = bench(args, say)
    except (BenchError, ContainerdError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted (everything unmounted and stopped)", file=sys.stderr)
        return 130
    out = args.results_dir or (Path(tempfile.mkdtemp(prefix="cargohold-bench-results-")) if args.quick
                               else Path("bench/results"))
    write_results(report, out)
    if args.output == "json":
        print(json.dumps(report, indent=2))
    else:
        print_table(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
