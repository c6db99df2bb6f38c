"""Archives between cargohold and the real tools: containerd 1.6's ``ctr images import/export`` (a private
containerd under a temp dir) and ``skopeo copy`` (oci-archive:, docker-archive:, dir:); archives laid out as
``docker save`` writes them; hostile entry names and links, which never reach outside the archive."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.treeutil import read_tree

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.containerd import containerd
from cargohold.errors import DigestMismatchError, InvalidArgumentError, NotFoundError, UnsafePathError
from cargohold.oci import mediatypes as mt
from support.cli import cli_bytes as cli

needs_ctr = pytest.mark.skipif(not (shutil.which("containerd") and shutil.which("ctr")),
                               reason="needs containerd and ctr (Debian package containerd)")
needs_skopeo = pytest.mark.skipif(not shutil.which("skopeo"), reason="needs skopeo (Debian package skopeo)")


def multi_arch() -> samples.SampleIndex:
    return samples.build_index([
        samples.build_image([samples.small_base_layer(), samples.files_layer({"etc/arch": p.encode()})], platform=p)
        for p in ("linux/amd64", "linux/arm64")])


def two_layer(**kw: object) -> samples.SampleImage:
    return samples.build_image(
        [samples.small_base_layer(), samples.files_layer(samples.random_files(11, 20, prefix="srv"))], **kw)


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


# -- docker save archives ------------------------------------------------------------------------------


def docker_save_tar(img: samples.SampleImage, tags: list[str]) -> bytes:
    """An archive as ``docker save`` (<= 24) writes it: ``<id>/layer.tar`` (uncompressed), ``<id>/json``,
    ``<id>/VERSION``, ``<config-hex>.json``, ``manifest.json``, ``repositories``; sorted like moby's."""
    files: dict[str, bytes] = {}
    layer_paths = []
    for i, tar in enumerate(img.uncompressed):
        v1 = hashlib.sha256(f"v1-{i}-{img.diff_ids[i]}".encode()).hexdigest()
        files[f"{v1}/VERSION"] = b"1.0"
        files[f"{v1}/json"] = json.dumps({"id": v1}).encode()
        files[f"{v1}/layer.tar"] = tar
        layer_paths.append(f"{v1}/layer.tar")
    files[f"{img.config.digest.hex}.json"] = img.config.data
    files["manifest.json"] = json.dumps([{"Config": f"{img.config.digest.hex}.json", "RepoTags": tags,
                                          "Layers": layer_paths}]).encode()
    files["repositories"] = b"{}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def test_docker_save_archive_builds_a_schema2_manifest(registry, tmp_path: Path) -> None:
    img = two_layer(docker=True)
    samples.push(registry.url, "dock", "v1", img)
    archive = tmp_path / "saved.tar"
    archive.write_bytes(docker_save_tar(img, ["sample:latest", "team/app:v2"]))
    client = Client(tmp_path / "root")
    res = client.import_archive(archive, snapshotter="native")
    assert res.format == "docker"
    names = sorted(i.name for i in res.images)
    assert names == ["docker.io/library/sample:latest", "docker.io/team/app:v2"]
    resolved = client.resolve_manifest("sample")
    assert resolved.manifest.media_type == mt.DOCKER_MANIFEST
    assert resolved.manifest.config.digest == img.config.digest
    assert [layer.digest for layer in resolved.manifest.layers] == list(img.diff_ids)
    assert {layer.media_type for layer in resolved.manifest.layers} == {mt.DOCKER_LAYER}
    assert client.check("sample").complete
    direct = Client(tmp_path / "direct")
    direct.pull(f"{registry.host}/dock:v1", snapshotter="native")
    assert tree_of(client, "sample", tmp_path) == tree_of(direct, f"{registry.host}/dock:v1", tmp_path)


def test_docker_layer_tar_reuses_the_stored_compressed_blob(registry, tmp_path: Path) -> None:
    img = two_layer(docker=True)
    samples.push(registry.url, "dock", "v1", img)
    client = Client(tmp_path / "root")
    client.pull(f"{registry.host}/dock:v1", snapshotter="native")  # labels blobs containerd.io/uncompressed
    archive = tmp_path / "saved.tar"
    archive.write_bytes(docker_save_tar(img, ["sample:latest"]))
    out = json.loads(cli(tmp_path / "root", "import", str(archive), "--snapshotter", "native",
                         "--output", "json").stdout)
    assert sorted(out["reused"]) == sorted(str(d) for d in img.diff_ids)
    resolved = client.resolve_manifest("sample")
    assert [(layer.digest, layer.media_type) for layer in resolved.manifest.layers] == [
        (layer.digest, mt.DOCKER_LAYER_GZIP) for layer in img.layers]
    for diff_id in img.diff_ids:
        assert not client.content.exists(diff_id)  # the tars were not stored
    assert client.check("sample").complete


def test_docker_layer_tar_not_matching_the_config_is_refused(tmp_path: Path) -> None:
    img = two_layer(docker=True)
    other = samples.build_image([samples.small_base_layer(), samples.files_layer({"x": b"other"})], docker=True)
    bad = samples.SampleImage(manifest=img.manifest, config=img.config, layers=img.layers, diff_ids=img.diff_ids,
                              uncompressed=(img.uncompressed[0], other.uncompressed[1]), platform=img.platform)
    archive = tmp_path / "bad.tar"
    archive.write_bytes(docker_save_tar(bad, ["bad:v1"]))
    client = Client(tmp_path / "root")
    with pytest.raises(DigestMismatchError, match=rf"layer\.tar.*{img.diff_ids[1].hex}"):
        client.import_archive(archive, unpack=False)
    assert client.list_images() == []


def test_reused_layer_tar_is_still_checked_against_the_config(registry, tmp_path: Path) -> None:
    """A layer tar some stored blob is labelled with stands in for that blob only if the config wants it."""
    img = two_layer(docker=True)
    other = samples.build_image([samples.small_base_layer(), samples.files_layer({"x": b"other"})], docker=True)
    samples.push(registry.url, "dock", "v1", img)
    samples.push(registry.url, "other", "v1", other)
    client = Client(tmp_path / "root")
    for ref in (f"{registry.host}/dock:v1", f"{registry.host}/other:v1"):
        client.pull(ref, snapshotter="native")  # both stored, labelled containerd.io/uncompressed
    swapped = samples.SampleImage(manifest=img.manifest, config=img.config, layers=img.layers, diff_ids=img.diff_ids,
                                  uncompressed=(img.uncompressed[0], other.uncompressed[1]), platform=img.platform)
    archive = tmp_path / "swapped.tar"
    archive.write_bytes(docker_save_tar(swapped, ["swapped:v1"]))
    with pytest.raises(DigestMismatchError, match=rf"layer\.tar.*expected {img.diff_ids[1]}, got {other.diff_ids[1]}"):
        client.import_archive(archive, unpack=False)
    assert sorted(i.name for i in client.list_images()) == [f"{registry.host}/dock:v1", f"{registry.host}/other:v1"]


# -- hostile names and links ----------------------------------------------------------------------------


def tar_of(*members: tuple[str, str, bytes | str]) -> bytes:
    """A tar of (kind, name, payload): ``file`` with bytes, ``sym``/``hard`` with a link target, names verbatim."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if isinstance(payload, bytes):
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = payload
                tar.addfile(info)
    return buf.getvalue()


def docker_layout(img: samples.SampleImage, layer_paths: list[str]) -> list[tuple[str, str, bytes | str]]:
    """The config and manifest.json of a docker archive whose layers are at ``layer_paths``."""
    manifest = [{"Config": f"{img.config.digest.hex}.json", "RepoTags": ["hostile:v1"], "Layers": layer_paths}]
    return [("file", f"{img.config.digest.hex}.json", img.config.data),
            ("file", "manifest.json", json.dumps(manifest).encode())]


def files_outside(root: Path, top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*") if root != p and root not in p.parents)


def test_docker_archive_links_resolve_inside_the_archive(tmp_path: Path) -> None:
    """An absolute symlink starts at the archive's root, a symlinked directory on the way is followed, a
    hardlink names an earlier entry: all inside the archive, as skopeo's and docker's archives need."""
    img = two_layer(docker=True)
    d0, d1 = (d.hex for d in img.diff_ids)
    archive = tmp_path / "linked.tar"
    archive.write_bytes(tar_of(
        ("file", f"store/{d0}.tar", img.uncompressed[0]),
        ("file", f"store/{d1}.tar", img.uncompressed[1]),
        ("sym", "layers", "store"),
        ("sym", "v0/layer.tar", f"/layers/{d0}.tar"),
        ("hard", "v1/layer.tar", f"store/{d1}.tar"),
        *docker_layout(img, ["v0/layer.tar", "v1/layer.tar"])))
    client = Client(tmp_path / "root")
    res = client.import_archive(archive, unpack=False)
    assert res.format == "docker" and [i.name for i in res.images] == ["docker.io/library/hostile:v1"]
    assert [layer.digest for layer in client.resolve_manifest("hostile:v1").manifest.layers] == list(img.diff_ids)
    assert client.check("hostile:v1").complete


@pytest.mark.parametrize("case", ["dotdot-name", "absolute-name", "symlink-out", "hardlink-out", "host-symlink"])
def test_hostile_entries_are_refused_and_nothing_leaves_the_archive(tmp_path: Path, monkeypatch, case: str
                                                                   ) -> None:
    img = two_layer(docker=True)
    d0, d1 = (d.hex for d in img.diff_ids)
    host = tmp_path / "host"  # a host file holding exactly the layer the archive's link asks for
    host.mkdir()
    (host / f"{d1}.tar").write_bytes(img.uncompressed[1])
    planted = host / "planted.txt"
    hostile: tuple[str, str, bytes | str] = {
        "dotdot-name": ("file", "blobs/sha256/../../../planted.txt", b"x"),
        "absolute-name": ("file", str(planted), b"x"),
        "symlink-out": ("sym", f"{d1}.tar", "../../etc/passwd"),
        "hardlink-out": ("hard", f"{d1}.tar", "/etc/passwd"),
        "host-symlink": ("sym", f"{d1}.tar", str(host / f"{d1}.tar")),  # read inside the archive: not there
    }[case]
    named = hostile[1] if hostile[0] == "file" else f"{d1}.tar: "  # the entry the error names
    error = NotFoundError if case == "host-symlink" else UnsafePathError
    layer1 = [("file", f"{d1}.tar", img.uncompressed[1])] if hostile[0] == "file" else []  # else the link is it
    archive = tmp_path / "hostile.tar"
    archive.write_bytes(tar_of(("file", f"{d0}.tar", img.uncompressed[0]), *layer1, hostile,
                               *docker_layout(img, [f"{d0}.tar", f"{d1}.tar"])))
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = files_outside(root, tmp_path)
    client = Client(root)
    with pytest.raises(error, match=re.escape(named)):
        client.import_archive(archive, unpack=False)
    assert client.list_images() == []
    assert files_outside(root, tmp_path) == before and not planted.exists()
    assert not [p for p in root.rglob("*") if p.name in ("planted.txt", "passwd")]
    proc = cli(root, "import", str(archive), "--no-unpack", check=False)
    assert proc.returncode == (1 if error is NotFoundError else 2) and named in proc.stderr.decode()


def test_index_entry_without_a_manifest_media_type_is_refused_and_nothing_recorded(tmp_path: Path) -> None:
    """An index.json entry must say it is a manifest: else its config and layers would go unchecked."""
    img = two_layer()
    untyped = {"digest": str(img.digest), "size": len(img.manifest.data)}
    index = {"schemaVersion": 2, "manifests": [
        {**untyped, "mediaType": mt.OCI_MANIFEST, "annotations": {"io.containerd.image.name": "example.com/a:v1"}},
        {**untyped, "annotations": {"io.containerd.image.name": "example.com/b:v1"}}]}
    archive = tmp_path / "untyped.tar"
    archive.write_bytes(tar_of(("file", "oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                               ("file", "index.json", json.dumps(index).encode()),
                               *[("file", f"blobs/sha256/{b.digest.hex}", b.data) for b in [img.manifest, *img.blobs]]))
    client = Client(tmp_path / "root")
    with pytest.raises(InvalidArgumentError, match=rf"index\.json manifest 1 \({img.digest}\): media type ''"):
        client.import_archive(archive, unpack=False)
    assert client.list_images() == []
