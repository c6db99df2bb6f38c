"""`images ls` columns and filters, `images inspect`'s runtime settings and `images prune`, on images pulled
from a real docker-registry."""

from __future__ import annotations

import json
from pathlib import Path

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from support.cli import cli


def _app(text: bytes = b"hello\n") -> samples.SampleImage:
    return samples.build_image([samples.small_base_layer(), samples.files_layer({"app/run": text})],
                               cmd=("/app/run",), created="2024-02-03T04:05:06Z")


def test_images_ls_sizes_platforms_created_and_filters(registry: RegistryProcess, tmp_path: Path) -> None:
    app, other = _app(), _app(b"other\n")
    samples.push(registry.url, "demo/app", "v1", app)
    samples.push(registry.url, "demo/other", "v1", other)
    root = tmp_path / "root"
    ref, other_ref = f"{registry.host}/demo/app:v1", f"{registry.host}/demo/other:v1"
    cli(root, "pull", "--snapshotter", "native", ref)
    cli(root, "pull", "--no-unpack", other_ref)

    listed = {i["name"]: i for i in json.loads(cli(root, "images", "ls", "--snapshotter", "native",
                                                   "-o", "json").stdout)}
    assert listed[ref]["blob_size"] == blobs_of(app)
    assert listed[ref]["platforms"] == ["linux/amd64"]
    assert listed[ref]["config_created"] == "2024-02-03T04:05:06Z"
    assert listed[ref]["unpacked_size"] > 0
    assert listed[other_ref]["unpacked_size"] is None  # pulled without unpacking

    table = cli(root, "images", "ls", "--snapshotter", "native").stdout.splitlines()
    assert table[0].split() == ["REF", "TYPE", "DIGEST", "PLATFORMS", "SIZE", "UNPACKED", "CREATED"]
    row = next(line for line in table if line.startswith(other_ref))
    assert row.split()[3:] == ["linux/amd64", f"{blobs_of(other) / 1024:.1f}", "KiB", "-", "2024-02-03T04:05:06Z"]

    assert cli(root, "images", "ls", "-q", "--filter", "name~=demo/app").stdout == f"{ref}\n"
    assert cli(root, "images", "ls", "-q", "--filter", f"target.digest=={other.digest}").stdout == f"{other_ref}\n"
    both = cli(root, "images", "ls", "-q", "--filter", f"name=={ref}", "--filter", f"name=={other_ref}").stdout
    assert both.splitlines() == sorted([ref, other_ref])
    assert cli(root, "images", "ls", "-q", "--filter", 'labels."nope"').stdout == ""

    bad = cli(root, "images", "ls", "--filter", "name~=[", check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("cargohold: error: filter 'name~=[': bad regular expression"), bad.stderr


def blobs_of(img: samples.SampleImage) -> int:
    return len(img.manifest.data) + len(img.config.data) + sum(len(b.data) for b in img.layers)


def test_images_inspect_shows_runtime_settings(registry: RegistryProcess, tmp_path: Path) -> None:
    samples.push(registry.url, "demo/app", "v1", _app())
    root = tmp_path / "root"
    ref = f"{registry.host}/demo/app:v1"
    cli(root, "pull", "--no-unpack", ref)
    doc = json.loads(cli(root, "images", "inspect", ref, "-o", "json").stdout)
    assert doc["config"]["Cmd"] == ["/app/run"]
    assert doc["config"]["created"] == "2024-02-03T04:05:06Z"
    assert doc["config"]["Env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    text = cli(root, "images", "inspect", ref).stdout
    assert 'cmd:       ["/app/run"]' in text
    assert "created:   2024-02-03T04:05:06Z" in text


def test_images_prune_dangling_then_all_but_used(registry: RegistryProcess, tmp_path: Path) -> None:
    app, other = _app(), _app(b"other\n")
    samples.push(registry.url, "demo/app", "v1", app)
    samples.push(registry.url, "demo/other", "v1", other)
    root = tmp_path / "root"
    ref, other_ref = f"{registry.host}/demo/app:v1", f"{registry.host}/demo/other:v1"
    cli(root, "pull", "--snapshotter", "native", ref)
    cli(root, "pull", "--no-unpack", other_ref)
    dangling = f"{registry.host}/demo/other@{other.digest}"
    cli(root, "images", "tag", other_ref, dangling)

    dry = cli(root, "images", "prune", "--dry-run")
    assert dry.stdout == f"{dangling}\n"
    assert "would remove 1 image" in dry.stderr
    pruned = cli(root, "images", "prune")
    assert pruned.stdout == f"{dangling}\n"
    assert "removed 1 image; run `cargohold gc`" in pruned.stderr
    assert sorted(cli(root, "images", "ls", "-q").stdout.splitlines()) == sorted([ref, other_ref])
    assert cli(root, "images", "prune").stdout == ""

    # A container's rootfs was prepared from demo/app: --all keeps it and removes the rest.
    client = Client(root, default_snapshotter="native")
    try:
        client.prepare_rootfs("c1", ref)
    finally:
        client.close()
    out = json.loads(cli(root, "images", "prune", "--all", "-o", "json").stdout)
    assert out == {"dry_run": False, "removed": [other_ref], "in_use": [ref]}
    assert cli(root, "images", "ls", "-q").stdout == f"{ref}\n"
