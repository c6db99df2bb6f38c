"""``make bench`` at a tiny size: every tool runs and is checked, the bench prints ratios and targets, writes
results.md, results.json and chart.png, and leaves nothing mounted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

needs_tools = pytest.mark.skipif(
    not all(shutil.which(c) for c in ("ctr", "containerd", "skopeo", "umoci", "docker-registry", "curl", "pigz")),
    reason="needs containerd/ctr, skopeo, umoci, docker-registry, curl, pigz (scripts/install-system-deps.sh bench)",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a fresh filesystem per run")


def _bench_mounts() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if "cargohold-bench-" in line.split()[4]]


@needs_root
@needs_tools
def test_quick_bench_checks_every_tool_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "cargohold.devtools.bench", "--quick", "--runs", "1", "--fs", "tmpfs",
         "--scenarios", "pull,transfer", "--results-dir", str(out), "--output", "json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["config"]["fs"] == "tmpfs"
    ran = sorted((r["scenario"], r["tool"]) for r in report["runs"])
    assert ran == sorted([
        ("pull overlayfs", "cargohold"), ("second pull", "cargohold"), ("pull overlayfs", "ctr"),
        ("pull overlayfs", "raw-floor"), ("export", "cargohold"), ("export", "ctr"), ("import", "cargohold"),
        ("import", "ctr"), ("copy", "cargohold"), ("copy", "skopeo"), ("rootfs", "cargohold"), ("rootfs", "umoci")])
    layers = report["images"]["main"]["layers"]
    for r in report["runs"]:
        if r["scenario"] == "pull overlayfs" and r["tool"] != "raw-floor":
            assert re.search(rf"complete; {layers} layers, \d+ entries$", r["check"]), r
        if r["scenario"] in ("export", "copy"):
            assert r["check"] == f"{layers + 2} blobs verified", r
    medians = report["median_seconds"]
    ratios = {(r["scenario"], r["rival"]): r for r in report["rows"] if r["ratio"] is not None}
    row = ratios[("pull overlayfs", "raw-floor")]
    pull = medians["pull overlayfs"]
    assert row["ratio"] == pytest.approx(pull["cargohold"] / pull["raw-floor"])
    assert row["target"] == "<= 1x" and row["pass"] is (row["ratio"] <= 1.0)
    assert set(ratios) >= {("pull overlayfs", "ctr"), ("export", "ctr"), ("import", "ctr"), ("copy", "skopeo"),
                           ("rootfs", "umoci")}
    md = (out / "results.md").read_text()
    assert "| pull overlayfs | cargohold |" in md and "containerd: containerd github.com/containerd" in md
    assert json.loads((out / "results.json").read_text())["runs"] == report["runs"]
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _bench_mounts() == []


@needs_root
@needs_tools
def test_quick_bench_slow_network_rss_many_and_huge(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cargohold.devtools.bench", "--quick", "--runs", "1", "--fs", "tmpfs", "--scale", "2",
         "--huge-mb", "4", "--rate-mb", "8", "--scenarios", "slow,rss,many,huge", "--results-dir",
         str(tmp_path), "--output", "json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert sorted((r["scenario"], r["tool"]) for r in report["runs"]) == sorted([
        ("slow network", "download"), ("slow network", "cargohold"), ("slow network", "ctr"),
        ("rss main", "cargohold"), ("rss main-x2", "cargohold"), ("many-layer", "cargohold"),
        ("many-layer", "ctr"), ("many-layer", "raw-floor"), ("huge", "cargohold"), ("huge", "ctr"),
        ("huge", "raw-floor")])
    runs = {(r["scenario"], r["tool"]): r for r in report["runs"]}
    # 8 MB/s through the proxy: the download of the main image's blobs cannot be faster than that.
    assert runs[("slow network", "download")]["seconds"] >= report["images"]["main"]["compressed_bytes"] / 8e6
    assert runs[("rss main", "cargohold")]["rss_sum_mb"] > 10
    for tool in ("cargohold", "ctr"):
        assert re.search(r"check complete; 12 layers, \d+ entries$", runs[("many-layer", tool)]["check"])
    rows = {(r["scenario"], r["tool"], r["rival"]): r for r in report["rows"]}
    assert rows[("slow network", "cargohold", "download")]["target"] == "<= 1.15x"
    assert rows[("slow network", "ctr", "download")]["target"] is None
    assert rows[("rss main-x2 / rss main", "cargohold", "rss main")]["target"] == "<= 1.25x"
    assert report["images"]["many"]["layers"] == 12 and report["images"]["huge"]["layers"] == 1
    assert _bench_mounts() == []


def test_bench_rejects_an_unknown_scenario() -> None:
    proc = subprocess.run([sys.executable, "-m", "cargohold.devtools.bench", "--scenarios", "pull,fast"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown scenario 'fast'" in proc.stderr and "Traceback" not in proc.stderr
