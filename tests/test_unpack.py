"""Pull with unpack on the real snapshotters: the missing-blob scenario, trees against an independent model,
labels, dedup across processes, remote (lazy) snapshotters, and refusal of bad layers."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.treeutil import expected_tree, inode_groups, read_tree

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.samples import Entry
from cargohold.errors import DigestMismatchError, UnsafePathError
from cargohold.metadata import labels as L
from cargohold.oci import mediatypes as mt
from cargohold.snapshots.base import Kind
from support.cli import cargohold_cmd, cli

SNAPSHOTTERS = ["overlayfs", "native"]

BASE = [
    Entry(path="bin", kind="dir", mode=0o755),
    Entry(path="bin/sh", data=b"#!/bin/true\n", mode=0o755),
    Entry(path="bin/ls", kind="hardlink", link="bin/sh"),
    Entry(path="etc", kind="dir", mode=0o755),
    Entry(path="etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
    Entry(path="etc/gone", data=b"deleted by layer 2\n"),
    Entry(path="opt", kind="dir", mode=0o755),
    Entry(path="opt/old", kind="dir", mode=0o755),
    Entry(path="opt/old/a", data=b"hidden by opaque\n"),
    Entry(path="opt/old/b", data=b"hidden by opaque too\n"),
    Entry(path="srv", kind="dir", mode=0o750, uid=1000, gid=1000),
    Entry(path="srv/tool", data=b"setuid tool", mode=0o4755, uid=1000, gid=1000),
    Entry(path="var", kind="dir", mode=0o755),
    Entry(path="var/doomed", kind="dir", mode=0o755),
    Entry(path="var/doomed/x", data=b"x"),
]
TOP = [
    Entry(path="etc", kind="dir", mode=0o755),
    Entry(path="etc/.wh.gone"),
    Entry(path="etc/motd", data=b"hello from layer 2\n", mode=0o600),
    Entry(path="etc/link-to-passwd", kind="symlink", link="passwd"),
    Entry(path="etc/abs-link", kind="symlink", link="/etc/motd"),
    Entry(path="opt", kind="dir", mode=0o755),
    Entry(path="opt/old", kind="dir", mode=0o700),
    Entry(path="opt/old/.wh..wh..opq"),
    Entry(path="opt/old/c", data=b"new in opaque dir\n"),
    Entry(path="var", kind="dir", mode=0o755),
    Entry(path="var/.wh.doomed"),
    Entry(path="var/fifo", kind="fifo", mode=0o640),
    Entry(path="var/null", kind="char", mode=0o666, devmajor=1, devminor=3),
    Entry(path="var/sh-again", kind="hardlink", link="bin/sh"),
]


def rich_image(compression: str = "gzip", level: int | None = None) -> samples.SampleImage:
    return samples.build_image([samples.tar_layer(BASE), samples.tar_layer(TOP)], compression=compression,
                               level=level)


def committed(client: Client, snapshotter: str) -> dict[str, dict[str, str]]:
    return {i.key: dict(i.labels) for i in client.snapshotter(snapshotter).walk() if i.kind == Kind.COMMITTED}


def active_keys(client: Client, snapshotter: str) -> list[str]:
    return [i.key for i in client.snapshotter(snapshotter).walk() if i.kind != Kind.COMMITTED]


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_missing_blobs_scenario_leaves_both_images_complete(registry, tmp_path: Path, snapshotter: str) -> None:
    big = samples.files_layer(samples.random_files(11, 120, prefix="usr/share"))
    a = samples.build_image([samples.tar_layer(BASE), big], compression="gzip", level=1)
    b = samples.build_image([samples.tar_layer(BASE), big], compression="gzip", level=9)
    c = samples.build_image([samples.tar_layer(BASE), big], compression="zstd")
    assert a.diff_ids == b.diff_ids == c.diff_ids
    assert a.layers[1].digest != b.layers[1].digest != c.layers[1].digest
    for name, img in (("a", a), ("b", b), ("c", c)):
        samples.push(registry.url, f"shared/{name}", "v1", img)

    client = Client(tmp_path / "root")
    ra = client.pull(f"{registry.host}/shared/a:v1", snapshotter=snapshotter)
    assert ra.unpack is not None and ra.unpack.unpacked == 2
    rb = client.pull(f"{registry.host}/shared/b:v1", snapshotter=snapshotter)
    assert rb.unpack is not None and rb.unpack.unpacked == 0  # snapshots reused ...
    rc = client.pull(f"{registry.host}/shared/c:v1", snapshotter=snapshotter)
    for img, res in ((b, rb), (c, rc)):
        for blob in [img.manifest, *img.blobs]:  # ... but every blob of B and C is in the store
            assert client.content.read_all(blob.digest) == blob.data
        assert res.unpack is not None
        assert {str(d) for d in res.unpack.fetched} >= {str(layer.digest) for layer in img.layers
                                                        if layer.digest != a.layers[0].digest}
    check = json.loads(cli(tmp_path / "root", "images", "check", "--output", "json").stdout)
    assert {r["name"]: r["status"] for r in check} == {
        f"{registry.host}/shared/{n}:v1": "complete" for n in "abc"
    }
    assert all(r["unpacked"][snapshotter] for r in check)
    assert len(committed(client, snapshotter)) == 2


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_unpacked_tree_matches_independent_model(registry, tmp_path: Path, snapshotter: str) -> None:
    img = rich_image()
    samples.push(registry.url, "rich", "v1", img)
    client = Client(tmp_path / "root")
    res = client.pull(f"{registry.host}/rich:v1", snapshotter=snapshotter)
    assert res.unpack is not None and res.unpack.chain_id.hex in {k.split(":")[-1]
                                                                   for k in committed(client, snapshotter)}
    want = expected_tree([BASE, TOP])

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    client.mount(f"{registry.host}/rich:v1", mnt, snapshotter=snapshotter)
    try:
        got = read_tree(mnt)
        assert got == want
        groups = inode_groups(mnt)
        if snapshotter == "native":
            assert {"bin/sh", "bin/ls", "var/sh-again"} in groups
        else:
            # Linking to a lower layer's file copies it up: the new link joins the copy, as with containerd.
            assert {"bin/sh", "var/sh-again"} in groups
        with pytest.raises(OSError):
            (mnt / "etc" / "new").write_text("read-only view")
        if snapshotter == "overlayfs":
            mounts = Path("/proc/self/mounts").read_text()
            assert f" {mnt} overlay " in mounts
    finally:
        client.unmount(mnt)
    assert not any(f" {mnt} " in line for line in Path("/proc/self/mounts").read_text().splitlines())
    assert active_keys(client, snapshotter) == []

    flat = tmp_path / "flat"
    client.rootfs(f"{registry.host}/rich:v1", flat)
    assert read_tree(flat) == want


def test_labels_as_containerd_writes_them(registry, tmp_path: Path) -> None:
    layers = [samples.tar_layer([Entry(path=f"l{i}", data=str(i).encode())]) for i in range(60)]
    img = samples.build_image(layers, compression="gzip")
    samples.push(registry.url, "many", "v1", img)
    client = Client(tmp_path / "root")
    ref = f"{registry.host}/many:v1"
    res = client.pull(ref, snapshotter="overlayfs", layer_labels=True)
    assert res.unpack is not None
    snaps = committed(client, "overlayfs")
    chain_ids = client.resolve_manifest(ref).chain_ids
    for i, chain in enumerate(chain_ids):
        labels = snaps[str(chain)]
        assert labels[L.SNAPSHOT_REF] == str(chain)
        assert labels[L.CRI_IMAGE_REF] == ref
        assert labels[L.CRI_MANIFEST_DIGEST] == str(img.digest)
        assert labels[L.CRI_LAYER_DIGEST] == str(img.layers[i].digest)
        value = labels[L.CRI_IMAGE_LAYERS]
        assert len(L.CRI_IMAGE_LAYERS) + len(value) <= 4096
        digests = value.split(",")
        assert digests == [str(layer.digest) for layer in img.layers[i:i + len(digests)]]
        if i == 0:
            assert len(digests) < 60  # truncated at containerd's label size limit
    for layer, diff_id in zip(img.layers, img.diff_ids, strict=True):
        assert client.content.info(layer.digest).labels[L.UNCOMPRESSED] == str(diff_id)
    assert client.content.info(img.config.digest).labels[f"{L.LABEL_GC_REF_SNAPSHOT}.overlayfs"] == str(chain_ids[-1])


def test_octet_stream_config_unpacks(registry, tmp_path: Path) -> None:
    img = samples.build_image([samples.tar_layer(BASE)], docker=True, config_media_type=mt.OCTET_STREAM)
    samples.push(registry.url, "legacy", "v1", img)
    client = Client(tmp_path / "root")
    res = client.pull(f"{registry.host}/legacy:v1", snapshotter="native")
    assert res.unpack is not None and res.unpack.unpacked == 1
    flat = tmp_path / "flat"
    client.rootfs(f"{registry.host}/legacy:v1", flat)
    assert read_tree(flat) == expected_tree([BASE])


def test_remote_snapshotter_is_not_force_fed(registry, tmp_path: Path) -> None:
    """A remote/lazy snapshotter that has a layer's snapshot gets no blob fetched for it."""
    big = samples.files_layer(samples.random_files(5, 50, prefix="data"))
    a = samples.build_image([big], compression="gzip", level=1)
    b = samples.build_image([big], compression="gzip", level=9)
    samples.push(registry.url, "lazy/a", "v1", a)
    samples.push(registry.url, "lazy/b", "v1", b)
    client = Client(tmp_path / "root")
    client.pull(f"{registry.host}/lazy/a:v1", snapshotter="overlayfs")
    client.snapshotter("overlayfs").remote = True
    res = client.pull(f"{registry.host}/lazy/b:v1", snapshotter="overlayfs")
    assert res.unpack is not None and [o.status for o in res.unpack.layers] == ["exists"]
    assert not client.content.exists(b.layers[0].digest)


def test_concurrent_unpacks_of_one_chain_do_the_work_once(registry, tmp_path: Path) -> None:
    img = samples.build_image([samples.tar_layer(BASE), samples.files_layer(samples.random_files(2, 300))])
    samples.push(registry.url, "race", "v1", img)
    root = tmp_path / "root"
    ref = f"{registry.host}/race:v1"
    Client(root)  # create the root before racing
    procs = [subprocess.Popen(cargohold_cmd(root, "pull",
                               "--snapshotter", "overlayfs", ref, "--output", "json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    statuses = [layer["status"] for o in outs for layer in o["unpack"]["layers"]]
    assert statuses.count("unpacked") == 2 and statuses.count("exists") == 4
    client = Client(root)
    assert len(committed(client, "overlayfs")) == 2
    assert active_keys(client, "overlayfs") == []

    # Threads in one process too.
    other = samples.build_image([samples.files_layer({"t": b"threads"})])
    samples.push(registry.url, "race2", "v1", other)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: Client(root).pull(f"{registry.host}/race2:v1",
                                                            snapshotter="native"), range(4)))
    assert sum(r.unpack.unpacked for r in results if r.unpack) == 1


BAD_LAYERS = {
    "dotdot": [Entry(path="../escape", data=b"x")],
    "absolute": [Entry(path="/abs-escape", data=b"x")],
    "hardlink-out": [Entry(path="h", kind="hardlink", link="../../../etc/passwd")],
    "whiteout-dotdot": [Entry(path="d", kind="dir"), Entry(path="d/.wh..."),],
}


@pytest.mark.parametrize("case", sorted(BAD_LAYERS))
@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_breakouts_are_refused_and_nothing_is_committed(registry, tmp_path: Path, case: str,
                                                        snapshotter: str) -> None:
    sentinel_dir = tmp_path / "outside"
    sentinel_dir.mkdir()
    img = samples.build_image([samples.tar_layer(BASE), samples.tar_layer(BAD_LAYERS[case])])
    repo = f"bad-{case}"
    samples.push(registry.url, repo, "v1", img)
    client = Client(tmp_path / "root")
    with pytest.raises(UnsafePathError) as err:
        client.pull(f"{registry.host}/{repo}:v1", snapshotter=snapshotter)
    named = BAD_LAYERS[case][-1].path.lstrip("/")
    assert named in str(err.value), f"error does not name the entry {named!r}: {err.value}"
    chains = {str(c) for c in _chains(img)}
    assert str(_chains(img)[0]) in committed(client, snapshotter)
    assert not chains.difference({str(_chains(img)[0])}).intersection(committed(client, snapshotter))
    assert active_keys(client, snapshotter) == []
    assert not Path("/tmp/escape").exists() and not Path("/abs-escape").exists()
    assert sorted(os.listdir(tmp_path)) == ["outside", "root"]
    assert Path("/etc/passwd").read_bytes().startswith(b"root:")


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_absolute_symlink_parent_is_kept_inside_the_root(registry, tmp_path: Path, snapshotter: str) -> None:
    """An absolute symlink target is read as inside the root (as a chroot would), never as the host's path."""
    layer = [Entry(path="lnk", kind="symlink", link="/tmp"), Entry(path="lnk/cargohold-escape-probe", data=b"x")]
    img = samples.build_image([samples.tar_layer(BASE), samples.tar_layer(layer)])
    samples.push(registry.url, "abs-link", "v1", img)
    client = Client(tmp_path / "root")
    client.pull(f"{registry.host}/abs-link:v1", snapshotter=snapshotter)
    assert not Path("/tmp/cargohold-escape-probe").exists()
    flat = tmp_path / "flat"
    client.rootfs(f"{registry.host}/abs-link:v1", flat)
    assert (flat / "tmp" / "cargohold-escape-probe").read_bytes() == b"x"
    assert os.readlink(flat / "lnk") == "/tmp"


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_symlink_parent_climbing_past_the_root_is_clamped_at_it(registry, tmp_path: Path, snapshotter: str
                                                                ) -> None:
    """A relative symlink target whose '..' climbs past the root stops at the root, as in a chroot."""
    layer = [Entry(path="d", kind="dir"), Entry(path="d/lnk", kind="symlink", link="../../.."),
             Entry(path="d/lnk/escape", data=b"x")]
    img = samples.build_image([samples.tar_layer(BASE), samples.tar_layer(layer)])
    samples.push(registry.url, "climb", "v1", img)
    client = Client(tmp_path / "root")
    client.pull(f"{registry.host}/climb:v1", snapshotter=snapshotter)
    assert not Path("/tmp/escape").exists() and not (tmp_path / "escape").exists()
    assert sorted(os.listdir(tmp_path)) == ["root"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    client.mount(f"{registry.host}/climb:v1", mnt, snapshotter=snapshotter)
    try:
        assert (mnt / "escape").read_bytes() == b"x"
        assert os.readlink(mnt / "d/lnk") == "../../.."
    finally:
        client.unmount(mnt)


def _chains(img: samples.SampleImage) -> list:
    from cargohold.oci.config import chain_ids

    return chain_ids(list(img.diff_ids))


def test_diff_id_mismatch_commits_nothing(registry, tmp_path: Path) -> None:
    good = samples.build_image([samples.tar_layer(BASE)])
    # Same compressed layer, but the config claims another diffID.
    lying = samples.build_image([samples.tar_layer(TOP)])
    doc = json.loads(good.config.data)
    doc["rootfs"]["diff_ids"] = [str(lying.diff_ids[0])]
    config = samples.Blob(media_type=mt.OCI_CONFIG, data=json.dumps(doc).encode())
    manifest_doc = json.loads(good.manifest.data)
    manifest_doc["config"] = config.descriptor.to_dict()
    manifest = samples.Blob(media_type=mt.OCI_MANIFEST, data=json.dumps(manifest_doc).encode())
    bad = samples.SampleImage(manifest=manifest, config=config, layers=good.layers, diff_ids=lying.diff_ids,
                              uncompressed=good.uncompressed, platform=good.platform)
    samples.push(registry.url, "liar", "v1", bad)
    client = Client(tmp_path / "root")
    for sn in SNAPSHOTTERS:
        with pytest.raises(DigestMismatchError, match=lying.diff_ids[0].hex):
            client.pull(f"{registry.host}/liar:v1", snapshotter=sn)
        assert committed(client, sn) == {}
        assert active_keys(client, sn) == []


def test_cli_unpack_snapshots_mount_rootfs(registry, tmp_path: Path) -> None:
    img = rich_image(compression="zstd")
    samples.push(registry.url, "tour", "v1", img)
    root = tmp_path / "root"
    ref = f"{registry.host}/tour:v1"
    cli(root, "pull", "--no-unpack", ref)
    assert json.loads(cli(root, "snapshots", "--snapshotter", "native", "ls", "--output", "json").stdout) == []
    out = json.loads(cli(root, "unpack", ref, "--snapshotter", "native", "--output", "json").stdout)
    assert [layer["status"] for layer in out["layers"]] == ["unpacked", "unpacked"]
    snaps = json.loads(cli(root, "snapshots", "--snapshotter", "native", "ls", "--output", "json").stdout)
    assert [(s["kind"], s["parent"]) for s in snaps if s["key"] == out["chain_id"]] == [
        ("Committed", out["layers"][0]["chain_id"])]
    assert all(s["labels"][L.SNAPSHOT_REF] == s["key"] for s in snaps)
    tree = cli(root, "snapshots", "--snapshotter", "native", "tree").stdout
    assert out["layers"][0]["chain_id"] in tree and out["chain_id"] in tree

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli(root, "mount", "--snapshotter", "overlayfs", ref, str(mnt))
    try:
        assert (mnt / "etc" / "motd").read_bytes() == b"hello from layer 2\n"
        assert not (mnt / "etc" / "gone").exists()
    finally:
        cli(root, "unmount", str(mnt))
    assert not (mnt / "etc").exists()
    flat = tmp_path / "flat"
    cli(root, "rootfs", ref, str(flat))
    assert read_tree(flat) == expected_tree([BASE, TOP])
    usage = json.loads(cli(root, "snapshots", "--snapshotter", "native", "usage", "--output", "json").stdout)
    assert all(u["size"] > 0 for u in usage)
    check = json.loads(cli(root, "images", "check", ref, "--output", "json").stdout)
    assert check[0]["unpacked"] == {"native": True, "overlayfs": True}


def test_gc_removes_what_no_image_references(registry, tmp_path: Path) -> None:
    keep = samples.build_image([samples.tar_layer(BASE)])
    drop = samples.build_image([samples.tar_layer(BASE), samples.tar_layer(TOP)])
    samples.push(registry.url, "keep", "v1", keep)
    samples.push(registry.url, "drop", "v1", drop)
    root = tmp_path / "root"
    client = Client(root)
    client.pull(f"{registry.host}/keep:v1", snapshotter="overlayfs")
    client.pull(f"{registry.host}/drop:v1", snapshotter="overlayfs")
    chains = [str(c) for c in _chains(drop)]
    assert set(committed(client, "overlayfs")) == set(chains)

    dry = json.loads(cli(root, "gc", "--dry-run", "--output", "json").stdout)
    assert dry["content"] == [] and dry["snapshots"] == []
    cli(root, "images", "rm", f"{registry.host}/drop:v1")
    dry = json.loads(cli(root, "gc", "--dry-run", "--output", "json").stdout)
    assert [s["key"] for s in dry["snapshots"]] == [chains[1]]
    assert set(committed(client, "overlayfs")) == set(chains)  # a dry run removes nothing

    done = json.loads(cli(root, "gc", "--output", "json").stdout)
    only_drop = {str(b.digest) for b in [drop.manifest, drop.config, drop.layers[1]]}
    assert set(done["content"]) == only_drop and set(done["blobs"]) == only_drop
    assert [s["key"] for s in done["snapshots"]] == [chains[1]]
    assert set(committed(client, "overlayfs")) == {chains[0]}
    for blob in [keep.manifest, *keep.blobs]:
        assert client.content.read_all(blob.digest) == blob.data
    assert not (root / "content" / "blobs" / "sha256" / drop.layers[1].digest.hex).exists()
    assert json.loads(cli(root, "images", "check", "--output", "json").stdout)[0]["status"] == "complete"
