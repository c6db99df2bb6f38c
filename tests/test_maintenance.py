"""Crash leftovers made visible and removable (`content active|abort`, `leases ls|rm`), blob verification with
quarantine (`content verify`) and repair (`images check --repair`), through the real CLI against the real
docker-registry on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

from cargohold.client import Client
from cargohold.content.local import LocalStore
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from support.cli import cli
from support.killed import KILLED_PULL

IMAGE = samples.build_image([
    samples.files_layer({"etc/base.txt": b"maintenance base\n"}),
    samples.files_layer({"app/one.txt": b"one\n" * 100}),
])

# Starts a download, writes some of it, holds a lease naming this process, then waits to be killed.
HALF_DONE = textwrap.dedent("""
    import sys, time
    from cargohold.client import Client

    client = Client(sys.argv[1])
    writer = client.content.writer("layer-download", total=1000)
    writer.write(b"x" * 300)
    lease = client.store.leases.create(labels={"cargohold.io/pid": __import__(
        "cargohold.metadata.leases", fromlist=["process_token"]).process_token(), "purpose": "test"})
    client.store.leases.add_resource(lease.id, "content", "sha256:" + "0" * 64)
    print(lease.id, flush=True)
    time.sleep(60)
""")


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_killed_download_is_listed_by_content_active_and_its_lease_by_leases_ls_and_both_removable(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-c", HALF_DONE, str(root)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lease_id = proc.stdout.readline().strip()
        assert lease_id, proc.stderr.read() if proc.stderr else ""
        # While the writer lives: listed as held by its pid, abort refuses naming the pid.
        live = json.loads(cli(root, "content", "active", "--output", "json").stdout)
        assert [(i["ref"], i["offset"], i["total"], i["locked"]) for i in live] == [("layer-download", 300, 1000, True)]
        assert live[0]["holder"] == f"pid {proc.pid}"
        refused = cli(root, "content", "abort", "layer-download", check=False)
        assert refused.returncode == 1
        assert f"pid {proc.pid}" in refused.stderr and "layer-download" in refused.stderr
        assert "Traceback" not in refused.stderr
        leases = json.loads(cli(root, "leases", "ls", "--output", "json").stdout)
        assert [(lease["id"], lease["alive"], lease["resources"]) for lease in leases] == [(lease_id, True, 1)]
        assert leases[0]["process"].startswith(f"{proc.pid}:")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    dead = json.loads(cli(root, "content", "active", "--output", "json").stdout)
    assert [(i["ref"], i["offset"], i["locked"]) for i in dead] == [("layer-download", 300, False)]
    table = cli(root, "content", "active").stdout
    assert "layer-download" in table and "none (dead)" in table
    assert json.loads(cli(root, "leases", "ls", "--output", "json").stdout)[0]["alive"] is False
    assert "(dead)" in cli(root, "leases", "ls").stdout

    assert cli(root, "content", "abort", "layer-download").stdout.split() == ["layer-download"]
    assert json.loads(cli(root, "content", "active", "--output", "json").stdout) == []
    assert list((root / "content" / "ingest").iterdir()) == []
    again = cli(root, "content", "abort", "layer-download", check=False)
    assert again.returncode == 1 and "ingest ref" in again.stderr and "layer-download" in again.stderr

    unknown = cli(root, "leases", "rm", "no-such-lease", lease_id, check=False)
    assert unknown.returncode == 1 and "lease no-such-lease: not found" in unknown.stderr
    assert len(json.loads(cli(root, "leases", "ls", "--output", "json").stdout)) == 1  # nothing removed
    assert cli(root, "leases", "rm", lease_id).stdout.split() == [lease_id]
    assert json.loads(cli(root, "leases", "ls", "--output", "json").stdout) == []


def test_verify_quarantines_a_corrupt_blob_and_check_repair_fetches_it_back(registry: RegistryProcess,
                                                                           tmp_path: Path) -> None:
    samples.push(registry.url, "maint/app", "v1", IMAGE)
    ref = f"{registry.host}/maint/app:v1"
    root = tmp_path / "root"
    cli(root, "pull", ref)
    assert cli(root, "content", "verify").stdout.startswith("verified 4 blobs: 0 bad")

    layer = IMAGE.layers[1]
    blob = LocalStore(root).blob_path(layer.digest)
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, other bytes
    config = LocalStore(root).blob_path(IMAGE.config.digest)
    config.write_bytes(config.read_bytes() + b"\n")  # another size: its digest no longer matches either

    bad = cli(root, "content", "verify", "--output", "json", check=False)
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["checked"] == 4
    assert sorted(b["digest"] for b in report["bad"]) == sorted([str(layer.digest), str(IMAGE.config.digest)])
    quarantined = root / "content" / "quarantine" / "sha256" / layer.digest.hex
    assert quarantined.read_bytes() == original[:-1] + bytes([original[-1] ^ 0xFF])  # moved, not deleted
    assert not blob.exists()
    assert {b["quarantined"] for b in report["bad"]} == {
        str(quarantined), str(root / "content" / "quarantine" / "sha256" / IMAGE.config.digest.hex)}

    check = cli(root, "images", "check", "--output", "json", check=False)
    assert check.returncode == 1
    assert sorted(json.loads(check.stdout)[0]["missing"]) == sorted([str(layer.digest), str(IMAGE.config.digest)])

    repaired = cli(root, "images", "check", "--repair", "--output", "json")
    assert json.loads(repaired.stdout)[0]["status"] == "complete"
    assert f"repaired {layer.digest}" in repaired.stderr
    assert blob.read_bytes() == original
    assert cli(root, "content", "verify").stdout.startswith("verified 4 blobs: 0 bad")
    assert cli(root, "content", "verify", str(layer.digest)).stdout.startswith("verified 1 blobs: 0 bad")
    assert quarantined.exists()  # kept for whoever wants to look at it

    # Damaged again: the second bad copy is kept beside the first.
    blob.write_bytes(b"second bad copy")
    assert cli(root, "content", "verify", str(layer.digest), check=False).returncode == 1
    assert quarantined.read_bytes()[:-1] == original[:-1]
    assert quarantined.with_name(f"{layer.digest.hex}.1").read_bytes() == b"second bad copy"


def test_verify_names_a_bad_or_unknown_digest_argument(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with closing(Client(root)):
        pass
    bad = cli(root, "content", "verify", "sha256:xyz", check=False)
    assert bad.returncode == 2 and "sha256:xyz" in bad.stderr and "Traceback" not in bad.stderr
    missing = "sha256:" + "1" * 64
    gone = cli(root, "content", "verify", missing, check=False)
    assert gone.returncode == 1 and missing in gone.stderr and "Traceback" not in gone.stderr


DOWN = "127.0.0.1:9/gone/app:v1"


def test_repair_fetches_a_quarantined_blob_from_its_recorded_source_when_the_image_registry_is_down(
        registry: RegistryProcess, tmp_path: Path) -> None:
    samples.push(registry.url, "maint/src", "v1", IMAGE)
    root = tmp_path / "root"
    cli(root, "pull", f"{registry.host}/maint/src:v1")
    cli(root, "images", "tag", f"{registry.host}/maint/src:v1", DOWN)  # a loopback port nobody listens on
    cli(root, "images", "rm", f"{registry.host}/maint/src:v1")
    layer = IMAGE.layers[0]
    blob = LocalStore(root).blob_path(layer.digest)
    blob.write_bytes(b"garbage")
    assert cli(root, "content", "verify", check=False).returncode == 1
    repaired = cli(root, "images", "check", "--repair", DOWN, "--output", "json")
    assert json.loads(repaired.stdout)[0]["status"] == "complete"
    assert blob.read_bytes() == layer.data




def test_the_next_pull_removes_the_lease_and_extract_snapshot_of_a_pull_killed_mid_unpack(
        registry: RegistryProcess, tmp_path: Path) -> None:
    samples.push(registry.url, "maint/killed", "v1", IMAGE)
    ref = f"{registry.host}/maint/killed:v1"
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PULL, str(root), ref], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "applying", proc.stderr.read() if proc.stderr else ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with closing(Client(root)) as client:
        left = [i.key for i in client.snapshotter().walk() if i.key.startswith("extract-")]
        assert left and client.store.leases.list()
        sn = client.default_snapshotter
    snapshots = root / "snapshots" / sn / "snapshots"
    assert len(list(snapshots.iterdir())) >= len(left)  # the killed unpack's directories

    cli(root, "pull", ref)  # no gc: the pull itself cleans up after the dead one

    assert json.loads(cli(root, "leases", "ls", "--output", "json").stdout) == []
    listed = json.loads(cli(root, "snapshots", "ls", "--output", "json").stdout)
    assert not [s for s in listed if s["key"].startswith("extract-")]
    assert len(listed) == len(IMAGE.layers)
    assert len(list(snapshots.iterdir())) == len(IMAGE.layers)  # the killed unpack's directory is gone


def test_check_finds_snapshot_directories_damaged_or_removed_and_repair_unpacks_again(
        registry: RegistryProcess, tmp_path: Path) -> None:
    samples.push(registry.url, "maint/snap", "v1", IMAGE)
    ref = f"{registry.host}/maint/snap:v1"
    root = tmp_path / "root"
    cli(root, "pull", ref)
    cli(root, "images", "check", ref)
    listed = json.loads(cli(root, "snapshots", "ls", "--output", "json").stdout)
    assert len(listed) == 2
    with closing(Client(root)) as client:
        sn = client.default_snapshotter
        ids = {r["key"]: r["id"] for r in client.db.query("SELECT key, id, parent FROM snapshots")}
        parents = {r["key"]: r["parent"] for r in client.db.query("SELECT key, parent FROM snapshots")}
    base = next(k for k, p in parents.items() if not p)
    top = next(k for k, p in parents.items() if p)
    base_fs = root / "snapshots" / sn / "snapshots" / str(ids[base]) / "fs"
    shutil.rmtree(base_fs / "etc")  # damaged from under us: a top-level entry gone

    damaged = cli(root, "images", "check", ref, check=False)
    assert damaged.returncode == 1
    assert f"snapshot {base} ({sn}) damaged" in damaged.stderr and "missing ['etc']" in damaged.stderr

    repaired = cli(root, "images", "check", "--repair", ref)
    assert f"snapshot {base} ({sn}) damaged, removed" in repaired.stderr
    assert f"{ref}: unpacked again into {sn}" in repaired.stderr
    cli(root, "images", "check", ref)
    with closing(Client(root)) as client:
        rows = {r["key"]: r["id"] for r in client.db.query("SELECT key, id FROM snapshots")}
    assert set(rows) == {base, top}
    assert (root / "snapshots" / sn / "snapshots" / str(rows[base]) / "fs" / "etc" / "base.txt").read_bytes() \
        == b"maintenance base\n"

    # A whole snapshot directory removed: the same.
    shutil.rmtree(root / "snapshots" / sn / "snapshots" / str(rows[top]))
    gone = cli(root, "images", "check", ref, check=False)
    assert gone.returncode == 1 and "is missing" in gone.stderr
    cli(root, "images", "check", "--repair", ref)
    cli(root, "images", "check", ref)
