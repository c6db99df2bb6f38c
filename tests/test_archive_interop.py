"""Archives between cargohold and the real tools: containerd 1.6's ``ctr images import/export`` (a private
containerd under a temp dir) and ``skopeo copy`` (oci-archive:, docker-archive:, dir:)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.treeutil import read_tree

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.containerd import containerd
from cargohold.oci import mediatypes as mt

needs_ctr = pytest.mark.skipif(not (shutil.which("containerd") and shutil.which("ctr")),
                               reason="needs containerd and ctr (Debian package containerd)")
needs_skopeo = pytest.mark.skipif(not shutil.which("skopeo"), reason="needs skopeo (Debian package skopeo)")


def multi_arch() -> samples.SampleIndex:
    return samples.build_index([
        samples.build_image([samples.small_base_layer(), samples.files_layer({"etc/arch": p.encode()})], platform=p)
        for p in ("linux/amd64", "linux/arm64")])


def two_layer() -> samples.SampleImage:
    return samples.build_image(
        [samples.small_base_layer(), samples.files_layer(samples.random_files(11, 20, prefix="srv"))])


def tree_of(client: Client, ref: str, tmp_path: Path) -> dict[str, tuple]:
    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    client.mount(ref, mnt, snapshotter="native")
    try:
        return read_tree(mnt)
    finally:
        client.unmount(mnt)


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ctr() -> Iterator[list[str]]:
    """``ctr`` talking to a private containerd whose root, state and socket live in a short temp dir."""
    base = Path(tempfile.mkdtemp(prefix="ch-ctrd-"))
    try:
        with containerd(base, base / "containerd.log") as (sock, _):
            yield ["ctr", "--address", sock]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(*cmd: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def skopeo(*args: str) -> str:
    return run("skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", *args)


@needs_ctr
def test_ctr_imports_our_export_and_finds_it_complete(ctr: list[str], registry, tmp_path: Path) -> None:
    index, single = multi_arch(), two_layer()
    samples.push(registry.url, "multi", "v1", index)
    samples.push(registry.url, "single", "v1", single)
    refs = [f"{registry.host}/multi:v1", f"{registry.host}/single:v1"]
    client = Client(tmp_path / "root")
    for ref in refs:
        client.pull(ref, unpack=False)
    out = tmp_path / "both.tar"
    client.export(out, refs)
    ns = [*ctr, "-n", f"t{uuid.uuid4().hex[:6]}"]
    run(*ns, "images", "import", str(out))
    check = run(*ns, "images", "check")
    for ref, digest in zip(refs, (index.digest, single.digest), strict=True):
        line = next(ln for ln in check.splitlines() if ln.startswith(ref + " "))
        assert str(digest) in line and "complete" in line.split(), check


@needs_ctr
def test_we_import_ctr_export_with_the_same_digest(ctr: list[str], registry, tmp_path: Path) -> None:
    index = multi_arch()
    samples.push(registry.url, "multi", "v1", index)
    ref = f"{registry.host}/multi:v1"
    ns = [*ctr, "-n", f"t{uuid.uuid4().hex[:6]}"]
    run(*ns, "images", "pull", "--plain-http", ref)
    out = tmp_path / "ctr.tar"
    run(*ns, "images", "export", str(out), ref)
    client = Client(tmp_path / "root")
    res = client.import_archive(out, snapshotter="native")
    assert [(i.name, i.target.digest) for i in res.images] == [(ref, index.digest)]
    assert client.check(ref).complete
    direct = Client(tmp_path / "direct")
    direct.pull(ref, snapshotter="native")
    assert tree_of(client, ref, tmp_path) == tree_of(direct, ref, tmp_path)


@needs_skopeo
def test_skopeo_reads_our_export_preserving_digests(registry, tmp_path: Path) -> None:
    img = two_layer()
    samples.push(registry.url, "single", "v1", img)
    ref = f"{registry.host}/single:v1"
    client = Client(tmp_path / "root")
    client.pull(ref, unpack=False)
    out = tmp_path / "ours.tar"
    client.export(out, [ref])

    # oci-archive: finds the image by org.opencontainers.image.ref.name (the tag); dir: keeps every byte
    oci_dir = tmp_path / "oci-dir"
    skopeo(f"oci-archive:{out}:v1", f"dir:{oci_dir}")
    assert sha256_file(oci_dir / "manifest.json") == str(img.digest)
    for blob in img.blobs:
        assert sha256_file(oci_dir / blob.digest.hex) == str(blob.digest)

    # docker-archive: reads manifest.json; skopeo decompresses layers, so the config digest is kept and the
    # layers become the uncompressed tars (digest = diffID)
    docker_dir = tmp_path / "docker-dir"
    skopeo(f"docker-archive:{out}", f"dir:{docker_dir}")
    manifest = json.loads((docker_dir / "manifest.json").read_text())
    assert manifest["config"]["digest"] == str(img.config.digest)
    assert [layer["digest"] for layer in manifest["layers"]] == [str(d) for d in img.diff_ids]
    for diff_id, tar in zip(img.diff_ids, img.uncompressed, strict=True):
        assert (docker_dir / diff_id.hex).read_bytes() == tar


@needs_skopeo
def test_we_import_skopeo_archives(registry, tmp_path: Path) -> None:
    img, index = two_layer(), multi_arch()
    samples.push(registry.url, "single", "v1", img)
    samples.push(registry.url, "multi", "v1", index)
    ref, multi = f"{registry.host}/single:v1", f"{registry.host}/multi:v1"
    direct = Client(tmp_path / "direct")
    direct.pull(ref, snapshotter="native")
    want = tree_of(direct, ref, tmp_path)

    oci = tmp_path / "skopeo-oci.tar"
    skopeo(f"docker://{ref}", f"oci-archive:{oci}:{ref}")  # ref.name holds the full reference
    client = Client(tmp_path / "oci")
    res = client.import_archive(oci, snapshotter="native")
    assert [(i.name, i.target.digest) for i in res.images] == [(ref, img.digest)]
    assert client.check(ref).complete and tree_of(client, ref, tmp_path) == want

    every = tmp_path / "skopeo-all.tar"
    skopeo("--all", f"docker://{multi}", f"oci-archive:{every}:{multi}")
    client = Client(tmp_path / "all")
    res = client.import_archive(every, all_platforms=True, unpack=False)
    assert [(i.name, i.target.digest) for i in res.images] == [(multi, index.digest)]
    assert client.check(multi, all_platforms=True).complete

    # docker-archive: <diffid>.tar layers, <config>.json, <id>/layer.tar symlinks; no manifest to keep
    dock = tmp_path / "skopeo-docker.tar"
    skopeo(f"docker://{ref}", f"docker-archive:{dock}:{ref}")
    client = Client(tmp_path / "docker")
    res = client.import_archive(dock, snapshotter="native")
    assert res.format == "docker" and [i.name for i in res.images] == [ref]
    resolved = client.resolve_manifest(ref)
    assert resolved.manifest.media_type == mt.DOCKER_MANIFEST
    assert resolved.manifest.config.digest == img.config.digest
    assert [layer.digest for layer in resolved.manifest.layers] == list(img.diff_ids)
    assert client.check(ref).complete and tree_of(client, ref, tmp_path) == want

    # into a store that pulled the image already: the compressed blobs are reused, the tars not stored
    res = direct.import_archive(dock, snapshotter="native")
    assert sorted(map(str, res.reused)) == sorted(map(str, img.diff_ids))
    resolved = direct.resolve_manifest(ref)
    assert [layer.digest for layer in resolved.manifest.layers] == [b.digest for b in img.layers]
    assert not any(direct.content.exists(d) for d in img.diff_ids)
    assert direct.check(ref).complete
    assert os.listdir(tmp_path / "direct" / "content" / "ingest") == []
