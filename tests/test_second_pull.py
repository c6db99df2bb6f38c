"""A second ``cargohold pull`` of an image already complete and unpacked: one resolve, no layer work, nothing
written; anything missing is still fetched or unpacked. And what the command line loads to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from cargohold.snapshots import overlay
from support.cli import cli


def four_layers() -> samples.SampleImage:
    return samples.build_image(
        [samples.small_base_layer(),
         *(samples.files_layer(samples.random_files(i, 30, prefix=f"layer{i}")) for i in range(1, 4))])


def store_state(root: Path) -> dict[str, Any]:
    """What a user sees of the store: image records (with their times), blobs with labels, snapshots, leases,
    and the files under the root (path, size, mtime)."""
    files = {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
             for p in sorted(root.rglob("*"))
             # The database's own files change when SQLite opens it; their contents are compared above.
             if p.is_file() and not p.name.startswith("metadata.db") and "/locks/" not in str(p)}
    return {cmd: json.loads(cli(root, *cmd.split(), "-o", "json").stdout)
            for cmd in ("images ls", "content ls", "snapshots ls", "leases ls")} | {"files": files}


def test_second_pull_does_no_layer_work_and_changes_nothing(registry: RegistryProcess, tmp_path: Path) -> None:
    img = four_layers()
    samples.push(registry.url, "second/app", "v1", img)
    ref = f"{registry.host}/second/app:v1"
    root = tmp_path / "root"
    first = json.loads(cli(root, "pull", "-o", "json", ref).stdout)
    blobs = {str(b.digest) for b in [img.manifest, *img.blobs]}
    assert set(first["fetched"]) == blobs
    before = store_state(root)

    again = json.loads(cli(root, "pull", "-o", "json", ref).stdout)
    assert again["fetched"] == [] and again["fetched_bytes"] == 0
    assert sorted(again["present"]) == sorted(blobs)
    assert again["manifests"] == [str(img.digest)]
    assert [(layer["digest"], layer["status"], layer["fetched"]) for layer in again["unpack"]["layers"]] == [
        (str(b.digest), "exists", False) for b in img.layers]
    assert again["unpack"]["chain_id"] == first["unpack"]["chain_id"]
    assert {k: again[k] for k in ("name", "digest", "media_type")} == {k: first[k] for k in ("name", "digest",
                                                                                           "media_type")}
    # The events: every blob exists, every layer's snapshot exists; nothing runs.
    lines = cli(root, "pull", ref).stderr.splitlines()
    steps = [line.split("]", 1)[1].split()[:2] for line in lines]
    assert ["fetch", "running"] not in steps and ["apply", "running"] not in steps, lines
    assert steps.count(["fetch", "exists"]) == len(blobs)
    assert steps.count(["apply", "exists"]) == len(img.layers)
    assert store_state(root) == before


def test_second_pull_fetches_a_missing_blob_and_unpacks_a_missing_snapshot(registry: RegistryProcess,
                                                                         tmp_path: Path) -> None:
    img = four_layers()
    samples.push(registry.url, "second/gaps", "v1", img)
    ref = f"{registry.host}/second/gaps:v1"
    root = tmp_path / "root"
    first = json.loads(cli(root, "pull", "-o", "json", ref).stdout)

    # A layer blob removed: fetched again, nothing applied.
    cli(root, "content", "rm", str(img.layers[2].digest))
    again = json.loads(cli(root, "pull", "-o", "json", ref).stdout)
    assert again["fetched"] == [str(img.layers[2].digest)]
    assert {layer["status"] for layer in again["unpack"]["layers"]} == {"exists"}
    checked = json.loads(cli(root, "images", "check", "-o", "json").stdout)
    assert checked[0]["status"] == "complete" and checked[0]["missing"] == []

    # The top snapshot removed: that layer is applied again, nothing fetched.
    snapshotter = first["unpack"]["snapshotter"]
    cli(root, "snapshots", "--snapshotter", snapshotter, "rm", first["unpack"]["chain_id"])
    again = json.loads(cli(root, "pull", "-o", "json", ref).stdout)
    assert again["fetched"] == []
    assert [layer["status"] for layer in again["unpack"]["layers"]] == ["exists", "exists", "exists", "unpacked"]
    checked = json.loads(cli(root, "images", "check", "-o", "json").stdout)
    assert checked[0]["status"] == "complete" and checked[0]["unpacked"][snapshotter] is True


def loaded_modules(tmp_path: Path, *args: str) -> set[str]:
    """The modules ``cargohold ARGS…`` has loaded when it ends (stderr not a terminal, as in scripts)."""
    out = tmp_path / "modules.json"
    code = ("import json, sys\n"
            "from cargohold.cli.main import main\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "finally:\n"
            f"    open({str(out)!r}, 'w').write(json.dumps(sorted(sys.modules)))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGOHOLD_")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(out.read_text()))


def heavy(modules: set[str], *prefixes: str) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


NEVER = ("grpc", "google.protobuf", "rich", "cargohold.devtools", "cargohold.cri", "cargohold.grpcserve",
         "cargohold.snapshots.proxy", "cargohold.snapshots.server")


def test_help_and_second_pull_load_no_grpc_rich_or_devtools(registry: RegistryProcess, tmp_path: Path) -> None:
    helped = loaded_modules(tmp_path, "--help")
    assert "click" in helped  # the probe sees what the command loaded
    assert heavy(helped, *NEVER) == []

    samples.push(registry.url, "second/imports", "v1", four_layers())
    ref = f"{registry.host}/second/imports:v1"
    root = tmp_path / "root"
    cli(root, "pull", ref)
    pulled = loaded_modules(tmp_path, "--root", str(root), "pull", ref)
    assert "cargohold.services.pull" in pulled
    assert heavy(pulled, *NEVER) == []


def default_snapshotter_in_new_process(root: Path) -> str:
    code = ("import sys\n"
            "from cargohold.snapshots.overlay import default_snapshotter_name\n"
            "print(default_snapshotter_name(sys.argv[1]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_overlay_support_is_probed_once_per_root_and_again_when_the_kernel_changes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    if default_snapshotter_in_new_process(root) != "overlayfs":  # not root, or no overlay here: nothing noted
        assert not (root / overlay.PROBE_NOTE).exists()
        return
    note = root / overlay.PROBE_NOTE
    stat = os.stat(root)
    status = Path("/proc/self/status").read_text()
    caps = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    expected = f"kernel={os.uname().release} euid={os.geteuid()} capeff={caps} dev={stat.st_dev}\n"
    assert note.read_text() == expected
    first = note.stat()

    # The next process takes the note as it is: not probed, not rewritten.
    assert default_snapshotter_in_new_process(root) == "overlayfs"
    assert (note.stat().st_ino, note.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    # Another kernel (or a damaged note): probed again, and the note names this one.
    for stale in ("kernel=0.0.0 euid=0 capeff=0 dev=1\n", "\xff garbage"):
        note.write_text(stale)
        assert default_snapshotter_in_new_process(root) == "overlayfs"
        assert note.read_text() == expected
    assert sorted(p.name for p in root.iterdir()) == [overlay.PROBE_NOTE]  # no probe directory or temp file left
