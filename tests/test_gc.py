"""Garbage collection with real processes: gc in a loop while another process pulls, imports and unpacks
images that share layers; a pull killed with SIGKILL mid-unpack; a crash between the row transaction and the
file removal. Everything against the real docker-registry on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import closing
from pathlib import Path

from cargohold.client import Client
from cargohold.content.local import LocalStore
from cargohold.devtools import samples
from cargohold.metadata.gc import sweep_rows
from cargohold.oci.config import chain_ids
from cargohold.services import gc as gcservice
from cargohold.snapshots.server import SnapshotsServer
from support.cli import cli
from support.killed import KILLED_PULL

BASE = samples.files_layer({"etc/base.txt": b"shared base layer\n", "usr/lib/base.bin": bytes(range(256)) * 64})
MIDDLE = samples.files_layer({"usr/share/middle.txt": b"shared middle layer\n"})


def _top(i: int) -> bytes:
    return samples.files_layer({f"app/{i}.txt": f"image {i}\n".encode()})


def _images() -> list[samples.SampleImage]:
    """Three images sharing two layers, each with its own top."""
    return [samples.build_image([BASE, MIDDLE, _top(i)]) for i in range(3)]


WORKER = textwrap.dedent("""
    import json, sys
    from cargohold.client import Client

    root, host, archive, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = Client(root)
    for r in range(rounds):
        pulled = f"{host}/gc/app{r % 3}:v1"
        client.pull(pulled)
        imported = [i.name for i in client.import_archive(archive).images]
        for name in imported:
            client.unpack(name)
        report = {"round": r, "images": {}}
        for img in client.list_images():
            check = client.check(img.name)
            report["images"][img.name] = {"complete": check.complete, "unpacked": client.unpacked(img.name),
                                          "missing": [str(d.digest) for d in check.missing]}
        print(json.dumps(report), flush=True)
        if r % 2 == 0:  # drop them: the next round fetches the shared layers again while gc collects them
            client.remove_image(pulled)
            for name in imported:
                client.remove_image(name)
""")

GC_LOOP = textwrap.dedent("""
    import os, sys, time
    from cargohold.client import Client

    root, stop = sys.argv[1], sys.argv[2]
    client = Client(root)
    runs = removed = 0
    while not os.path.exists(stop):
        result, snapshots = client.gc()
        runs += 1
        removed += len(result.removed_blobs) + len(snapshots)
        time.sleep(0.01)
    print(runs, removed, flush=True)
""")


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_gc_in_a_loop_never_breaks_concurrent_pulls_imports_and_unpacks(registry, tmp_path: Path) -> None:
    images = _images()
    for i, img in enumerate(images):
        samples.push(registry.url, f"gc/app{i}", "v1", img)
    # The archive: an image sharing the base layers with the pulled ones, exported from a scratch root.
    samples.push(registry.url, "gc/archived", "v1", samples.build_image([BASE, MIDDLE, _top(9)]))
    archive = tmp_path / "archived.tar"
    with closing(Client(tmp_path / "scratch")) as scratch:
        scratch.pull(f"{registry.host}/gc/archived:v1", unpack=False)
        scratch.export(archive, [f"{registry.host}/gc/archived:v1"])
    root = tmp_path / "root"
    Client(root).close()  # create the root (and its database) before two processes race to
    stop = tmp_path / "stop"
    started = time.monotonic()
    collector = subprocess.Popen([sys.executable, "-c", GC_LOOP, str(root), str(stop)], env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = subprocess.run([sys.executable, "-c", WORKER, str(root), registry.host, str(archive), "50"],
                                env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        stop.touch()
        out, err = collector.communicate(timeout=60)
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert collector.returncode == 0, err[-3000:]
    runs, removed = map(int, out.split())
    # gc ran all along, and had work: what the even rounds dropped, while the next round fetched it again.
    assert runs >= 10 and removed >= 20, (runs, removed)
    reports = [json.loads(line) for line in worker.stdout.splitlines()]
    assert [r["round"] for r in reports] == list(range(50))
    for report in reports:
        assert report["images"], report
        for name, state in report["images"].items():
            assert state == {"complete": True, "unpacked": True, "missing": []}, (report["round"], name)
    assert time.monotonic() - started < 90
    # The CLI agrees after a final gc: every recorded image complete.
    cli(root, "gc")
    checked = json.loads(cli(root, "images", "check", "--output", "json").stdout)
    assert checked and all(c["status"] == "complete" for c in checked)




def _usage(root: Path) -> dict[str, list[str]]:
    """What gc is responsible for on disk: blob files, snapshot dirs, ingests, unpack lock files."""
    def names(path: Path) -> list[str]:
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    blobs = sorted(p.name for p in (root / "content" / "blobs").glob("*/*"))
    snapshots = sorted(str(p.relative_to(root)) for p in (root / "snapshots").glob("*/snapshots/*"))
    return {"blobs": blobs, "snapshots": snapshots,
            "ingests": names(root / "content" / "ingest"), "locks": names(root / "unpack" / "locks")}


def test_gc_cleans_up_after_a_pull_killed_mid_unpack(registry, tmp_path: Path) -> None:
    keep, killed = samples.build_image([BASE, _top(0)]), samples.build_image([BASE, MIDDLE, _top(7)])
    samples.push(registry.url, "gc/keep", "v1", keep)
    samples.push(registry.url, "gc/killed", "v1", killed)
    root = tmp_path / "root"
    with closing(Client(root)) as client:
        client.pull(f"{registry.host}/gc/keep:v1")
    cli(root, "gc")
    baseline = _usage(root)

    proc = subprocess.Popen([sys.executable, "-c", KILLED_PULL, str(root), f"{registry.host}/gc/killed:v1"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "applying", proc.stderr.read() if proc.stderr else ""
        # A partial ingest of this process, as a download cut short leaves it.
        with closing(Client(root)) as client:
            lease = client.store.leases.list()[0]
            assert lease.labels["cargohold.io/pid"].startswith(f"{proc.pid}:")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ingest = LocalStore(root).writer("default/cut-short")
    ingest.write(b"half a blob")
    # Left behind: the lease, the active extract snapshot, the blobs it fetched, its lock file.
    with closing(Client(root)) as client:
        assert [lease.id for lease in client.store.leases.list()]
        active = [i.key for i in client.snapshotter().walk() if i.key.startswith("extract-")]
        assert active
    assert _usage(root) != baseline

    # A gc while the ingest's writer is alive keeps that ingest; once the writer is gone it goes too.
    first = json.loads(cli(root, "gc", "--output", "json").stdout)
    assert ingest.status().offset == len(b"half a blob")
    ingest.close()
    assert len(first["expired_leases"]) == 1
    assert any(s["key"] in active for s in first["snapshots"])
    assert first["locks"]
    second = json.loads(cli(root, "gc", "--output", "json").stdout)
    assert second["ingests"] == ["default/cut-short"]
    with closing(Client(root)) as client:
        assert client.store.leases.list() == []
        assert not [i.key for i in client.snapshotter().walk() if i.key.startswith("extract-")]
        assert client.check(f"{registry.host}/gc/keep:v1").complete and client.unpacked(f"{registry.host}/gc/keep:v1")
    assert _usage(root) == baseline


def test_a_crash_between_the_row_transaction_and_file_removal_leaves_orphans_the_next_gc_removes(
        registry, tmp_path: Path) -> None:
    img = samples.build_image([BASE, _top(3)])
    samples.push(registry.url, "gc/crash", "v1", img)
    root = tmp_path / "root"
    with closing(Client(root)) as client:
        ref = f"{registry.host}/gc/crash:v1"
        client.pull(ref)
        before = _usage(root)
        client.remove_image(ref)
        rows = sweep_rows(client.db)  # phase 1 only: then "crash"
        assert {str(d) for _, d in rows.removed_records} == {str(b.digest) for b in [img.manifest, *img.blobs]}
        assert len(rows.removed_snapshots) == 2
        # The rows are gone, the files are still there: orphans.
        assert _usage(root) == before
        assert list(client.content.walk()) == []
        assert list(client.snapshotter().walk()) == []
    # The next gc (another process, as after a restart) finds no rows to delete and removes the orphans.
    done = json.loads(cli(root, "gc", "--output", "json").stdout)
    assert done["content"] == [] and done["snapshots"] == []
    assert set(done["blobs"]) == {str(b.digest) for b in [img.manifest, *img.blobs]}
    assert _usage(root)["blobs"] == [] and _usage(root)["snapshots"] == []
    again = json.loads(cli(root, "gc", "--output", "json").stdout)
    assert again["blobs"] == [] and again["content"] == []
    # Finishing twice is harmless too.
    with closing(Client(root)) as client:
        result, snaps = gcservice.finish(client.store, sweep_rows(client.db))
        assert result.removed_blobs == [] and snaps == []


def test_gc_removes_unreferenced_proxy_snapshots_through_the_proxy_and_reports_a_proxy_that_is_down(
        registry, tmp_path: Path) -> None:
    keep, drop = samples.build_image([BASE, _top(1)]), samples.build_image([BASE, MIDDLE, _top(2)])
    samples.push(registry.url, "gc/pkeep", "v1", keep)
    samples.push(registry.url, "gc/pdrop", "v1", drop)
    short = Path(tempfile.mkdtemp(prefix="ch-gc-"))  # a unix socket path must stay short
    try:
        sock = short / "s.sock"
        root = tmp_path / "root"
        root.mkdir()
        (root / "config.toml").write_text(f'[snapshotters.served]\naddress = "{sock}"\n')
        keep_ref, drop_ref = f"{registry.host}/gc/pkeep:v1", f"{registry.host}/gc/pdrop:v1"
        keep_chains = [str(c) for c in chain_ids(keep.diff_ids)]
        drop_chains = [str(c) for c in chain_ids(drop.diff_ids)]
        with SnapshotsServer("native", short / "daemon", sock):
            with closing(Client(root)) as client:
                client.pull(keep_ref, snapshotter="served")
                client.pull(drop_ref, snapshotter="served")
                served = client.snapshotter("served")
                served.prepare("stray-active")
                served.commit("stray", "stray-active")
                assert {i.key for i in served.walk()} == {*keep_chains, *drop_chains, "stray"}
            cli(root, "images", "rm", drop_ref)
            done = json.loads(cli(root, "gc", "--output", "json").stdout)
            removed = {s["key"] for s in done["snapshots"] if s["snapshotter"] == "served"}
            # drop's own layers and the stray go; the shared base (keep's parent) stays.
            assert removed == {*drop_chains[1:], "stray"}
            assert done["unreachable"] == []
            with closing(Client(root)) as client:
                assert {i.key for i in client.snapshotter("served").walk()} == set(keep_chains)
                assert client.unpacked(keep_ref, snapshotter="served")
        # The daemon is down: gc does the rest, says which proxy it could not reach, and exits 0.
        cli(root, "images", "rm", keep_ref)
        down = cli(root, "gc")
        assert "snapshotter served unreachable" in down.stdout and str(sock) in down.stdout
        with SnapshotsServer("native", short / "daemon", sock):
            again = json.loads(cli(root, "gc", "--output", "json").stdout)
            assert {s["key"] for s in again["snapshots"]} == set(keep_chains) and again["unreachable"] == []
            with closing(Client(root)) as client:
                assert list(client.snapshotter("served").walk()) == []
    finally:
        shutil.rmtree(short, ignore_errors=True)

