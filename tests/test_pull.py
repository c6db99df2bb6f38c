"""``cargohold pull --no-unpack`` against a real docker-registry: blobs, labels, platforms, media types, CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.errors import DigestMismatchError, NotFoundError, UnsupportedMediaTypeError
from cargohold.oci import mediatypes as mt
from cargohold.oci.digest import Digest
from support.cli import cargohold_cmd, cli


def two_layer_image(**kw: object) -> samples.SampleImage:
    return samples.build_image(
        [samples.small_base_layer(), samples.files_layer(samples.random_files(3, 40, prefix="opt"))], **kw
    )


def assert_blob(client: Client, blob: samples.Blob) -> None:
    assert client.content.read_all(blob.digest) == blob.data


def test_pull_fetches_every_blob_with_gc_and_source_labels(registry, tmp_path: Path) -> None:
    img = two_layer_image()
    samples.push(registry.url, "team/app", "v1", img)
    client = Client(tmp_path / "root")
    result = client.pull(f"{registry.host}/team/app:v1")

    assert result.image.name == f"{registry.host}/team/app:v1"
    assert result.image.target.digest == img.digest
    assert result.image.target.media_type == mt.OCI_MANIFEST
    for blob in [img.manifest, *img.blobs]:
        assert_blob(client, blob)
    labels = client.content.info(img.digest).labels
    assert labels["containerd.io/gc.ref.content.config"] == str(img.config.digest)
    assert labels["containerd.io/gc.ref.content.l.0"] == str(img.layers[0].digest)
    assert labels["containerd.io/gc.ref.content.l.1"] == str(img.layers[1].digest)
    for blob in [img.manifest, *img.blobs]:
        assert client.content.info(blob.digest).labels[
            f"containerd.io/distribution.source.{registry.host}"] == "team/app"
    assert client.check(result.image.name).complete

    # A second pull of the same image fetches nothing and adds a second source repository to the label.
    samples.push(registry.url, "other/app", "v1", img)
    again = client.pull(f"{registry.host}/other/app:v1")
    assert again.fetched == ()
    assert client.content.info(img.layers[0].digest).labels[
        f"containerd.io/distribution.source.{registry.host}"] == "team/app,other/app"


def test_multi_arch_platform_selection(registry, tmp_path: Path) -> None:
    images = {p: samples.build_image([samples.small_base_layer(), samples.files_layer({"arch": p.encode()})],
                                     platform=p)
              for p in ("linux/amd64", "linux/arm64", "linux/arm/v7")}
    index = samples.build_index(list(images.values()))
    samples.push(registry.url, "multi", "v1", index)
    ref = f"{registry.host}/multi:v1"

    one = Client(tmp_path / "one")
    res = one.pull(ref, platforms=["linux/arm64"])
    assert [d.digest for d in res.manifests] == [images["linux/arm64"].digest]
    assert one.content.exists(index.digest)
    assert_blob(one, images["linux/arm64"].layers[1])
    for other in ("linux/amd64", "linux/arm/v7"):
        assert not one.content.exists(images[other].layers[1].digest)
        assert not one.content.exists(images[other].digest)
    idx_labels = one.content.info(index.digest).labels
    assert idx_labels["containerd.io/gc.ref.content.m.1"] == str(images["linux/arm64"].digest)
    assert one.check(ref, platforms=["linux/arm64"]).complete
    assert not one.check(ref, all_platforms=True).complete

    every = Client(tmp_path / "all")
    res = every.pull(ref, all_platforms=True)
    assert sorted(str(d.digest) for d in res.manifests) == sorted(str(i.digest) for i in images.values())
    for img in images.values():
        for blob in [img.manifest, *img.blobs]:
            assert_blob(every, blob)
    assert every.check(ref, all_platforms=True).complete


def test_octet_stream_config_image_is_fetched_whole(registry, tmp_path: Path) -> None:
    img = samples.build_image([samples.small_base_layer(), samples.files_layer({"x": b"y"})], docker=True,
                              config_media_type=mt.OCTET_STREAM)
    samples.push(registry.url, "legacy", "v1", img)
    client = Client(tmp_path / "root")
    res = client.pull(f"{registry.host}/legacy:v1")
    assert res.image.target.media_type == mt.DOCKER_MANIFEST
    for blob in [img.manifest, *img.blobs]:
        assert_blob(client, blob)
    resolved = client.resolve_manifest(f"{registry.host}/legacy:v1")
    assert resolved.manifest.config.media_type == mt.OCTET_STREAM
    assert resolved.diff_ids == img.diff_ids


def test_unknown_layer_media_type_is_a_clear_error(registry, tmp_path: Path) -> None:
    img = samples.build_image([samples.small_base_layer()], layer_media_types=["application/x-mystery-layer"])
    samples.push(registry.url, "mystery", "v1", img)
    client = Client(tmp_path / "root")
    with pytest.raises(UnsupportedMediaTypeError, match=r"application/x-mystery-layer.*" + img.layers[0].digest.hex):
        client.pull(f"{registry.host}/mystery:v1")
    # As containerd: content of a type not understood is carried as an opaque blob; only unpacking fails.
    client.pull(f"{registry.host}/mystery:v1", unpack=False)
    assert client.content.read_all(img.layers[0].digest) == img.layers[0].data


def test_corrupt_blob_in_registry_is_never_committed(registry, tmp_path: Path) -> None:
    img = two_layer_image()
    samples.push(registry.url, "corrupt", "v1", img)
    bad = img.layers[1].digest
    data = next(registry.storage.rglob(f"blobs/sha256/{bad.hex[:2]}/{bad.hex}/data"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))

    client = Client(tmp_path / "root")
    with pytest.raises(DigestMismatchError, match=bad.hex):
        client.pull(f"{registry.host}/corrupt:v1")
    assert not client.content.exists(bad)
    assert not (tmp_path / "root" / "content" / "blobs" / "sha256" / bad.hex).exists()
    with pytest.raises(NotFoundError):
        client.image(f"{registry.host}/corrupt:v1")


def test_cli_pull_json_ls_get_check_and_errors(registry, tmp_path: Path) -> None:
    img = two_layer_image(compression="zstd")
    samples.push(registry.url, "cli/app", "v2", img)
    root = tmp_path / "root"
    ref = f"{registry.host}/cli/app:v2"

    out = json.loads(cli(root, "pull", "--no-unpack", ref, "--output", "json").stdout)
    assert out["digest"] == str(img.digest)
    assert sorted(out["fetched"]) == sorted(str(b.digest) for b in [img.manifest, *img.blobs])

    listed = json.loads(cli(root, "images", "ls", "--output", "json").stdout)
    assert [(i["name"], i["digest"]) for i in listed] == [(ref, str(img.digest))]

    got = subprocess.run(cargohold_cmd(root, "content", "get",
                          str(img.layers[0].digest)), capture_output=True, timeout=60)
    assert got.returncode == 0 and got.stdout == img.layers[0].data

    check = json.loads(cli(root, "images", "check", ref, "--output", "json").stdout)
    assert check == [{"name": ref, "status": "complete", "required": 4, "missing": [], "remote": [],
                      "unpacked": {"native": False, "overlayfs": False}}]

    # Remove a layer blob: check says incomplete, names it, exits 1.
    cli(root, "content", "rm", str(img.layers[1].digest))
    proc = cli(root, "images", "check", ref, "--output", "json", check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)[0]["missing"] == [str(img.layers[1].digest)]

    missing = cli(root, "pull", f"{registry.host}/cli/app:nope", check=False)
    assert missing.returncode == 1
    assert "cli/app:nope" in missing.stderr and "not found" in missing.stderr.lower()

    bad_ref = cli(root, "pull", "Bad/Ref", check=False)
    assert bad_ref.returncode == 2
    assert "must be lowercase" in bad_ref.stderr

    # Tag, inspect, rm
    cli(root, "images", "tag", ref, "local/app:copy")
    insp = json.loads(cli(root, "images", "inspect", "local/app:copy", "--output", "json").stdout)
    assert insp["digest"] == str(img.digest)
    assert [layer["diff_id"] for layer in insp["manifest"]["layers"]] == [str(d) for d in img.diff_ids]
    cli(root, "images", "rm", "local/app:copy")
    names = [i["name"] for i in json.loads(cli(root, "images", "ls", "--output", "json").stdout)]
    assert names == [ref]
    assert Digest.parse(insp["manifest"]["layers"][0]["chain_id"]) == img.diff_ids[0]
