"""``make bench`` at a tiny size: both tools pull and unpack the generated image, the bench prints ratios and
leaves nothing mounted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cargohold.devtools import bench, samples

needs_containerd = pytest.mark.skipif(
    not all(shutil.which(c) for c in ("ctr", "containerd", "skopeo", "umoci")),
    reason="needs containerd and ctr, skopeo, umoci (Debian packages containerd, skopeo, umoci)",
)
needs_registry = pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs docker-registry")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a fresh filesystem per run")


def _bench_mounts() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if "cargohold-bench-" in line.split()[4]]


def test_generated_files_are_deterministic_small_and_compressible() -> None:
    a = bench.generate_files(5, 2 << 20, "layer0")
    b = bench.generate_files(5, 2 << 20, "layer0")
    assert a == b
    assert bench.generate_files(6, 2 << 20, "layer0") != a
    sizes = [len(d) for d in a.values()]
    assert 1024 <= min(sizes) and max(sizes) <= 32 * 1024
    assert sum(sizes) >= 2 << 20
    assert 100 < len(a) < 1000
    tar = samples.files_layer(a)
    ratio = len(tar) / len(samples.gzip_bytes(tar))
    assert 1.8 < ratio < 4.0


@needs_root
@needs_registry
@needs_containerd
def test_bench_runs_both_tools_and_prints_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cargohold.devtools.bench", "--size-mb", "4", "--runs", "1"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^run 1 cargohold +[\d.]+s .*ok: 4 snapshots, \d+ files$", out, re.M), out
    assert re.search(r"^run 1 ctr +[\d.]+s .*ok: 4 snapshots, \d+ files$", out, re.M), out
    assert re.search(r"^median cargohold +[\d.]+s$", out, re.M), out
    assert re.search(r"^median ctr +[\d.]+s$", out, re.M), out
    assert re.search(r"^ratio cargohold/ctr \(median\): \d+\.\d\dx$", out, re.M), out
    # The transfer half: every step by cargohold and its rival, checked, with a ratio each.
    for step, rival, check in [("export", "ctr", r"6 blobs"), ("import", "ctr", r"complete, unpacked"),
                               ("copy", "skopeo", r"6 blobs"), ("rootfs", "umoci", r"\d+ files")]:
        for tool in ("cargohold", rival):
            assert re.search(rf"^run 1 {step} +{tool} +[\d.]+s +ok: {check}$", out, re.M), out
        assert re.search(rf"^ratio {step} cargohold/{rival} \(median\): \d+\.\d\dx$", out, re.M), out
    assert _bench_mounts() == []


@needs_root
@needs_registry
@needs_containerd
def test_bench_json_output_on_tmpfs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cargohold.devtools.bench", "--size-mb", "2", "--layers", "2", "--runs", "1",
         "--fs", "tmpfs", "--output", "json"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["config"]["fs"] == "tmpfs"
    assert [(r["tool"], r["snapshots"], r["files"]) for r in report["runs"]] == [
        ("cargohold", 2, report["image"]["files"]), ("ctr", 2, report["image"]["files"])]
    medians = report["median_seconds"]
    assert report["ratio"] == pytest.approx(medians["cargohold"] / medians["ctr"])
    transfer = report["transfer"]
    assert sorted((r["step"], r["tool"]) for r in transfer["runs"]) == sorted(
        [("export", "cargohold"), ("export", "ctr"), ("import", "cargohold"), ("import", "ctr"),
         ("copy", "cargohold"), ("copy", "skopeo"), ("rootfs", "cargohold"), ("rootfs", "umoci")])
    assert set(transfer["ratios"]) == {"export", "import", "copy", "rootfs"}
    assert _bench_mounts() == []


def test_scan_tree_counts_files_and_names_wrong_or_missing_probes(tmp_path: Path) -> None:
    files = bench.generate_files(9, 64 << 10, "layer0")
    paths = sorted(files)
    for i, path in enumerate(paths):
        target = tmp_path / str(i % 2 + 1) / "fs" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[path])
    probes = {p: hashlib.sha256(files[p]).hexdigest() for p in paths[:3]}
    tree = bench.scan_tree(tmp_path, probes)
    assert (tree.files, tree.file_bytes, tree.bad) == (len(files), sum(map(len, files.values())), ())

    (tmp_path / "1" / "fs" / paths[0]).write_bytes(b"other bytes")
    (tmp_path / "2" / "fs" / paths[1]).unlink()
    tree = bench.scan_tree(tmp_path, probes)
    assert tree.files == len(files) - 1
    assert tree.bad == (paths[0], paths[1])
