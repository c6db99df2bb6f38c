"""The OCI model: digests, references, platforms, manifests, indexes and configs parsed from real bytes."""

from __future__ import annotations

import json

import pytest

from cargohold.devtools.samples import build_image, build_index, files_layer, small_base_layer
from cargohold.errors import InvalidArgumentError, UnsupportedMediaTypeError
from cargohold.oci import mediatypes as mt
from cargohold.oci.config import ImageConfig, chain_ids, looks_like_image_config
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import Index, Manifest, parse_manifest_or_index
from cargohold.oci.platform import Platform, PlatformMatcher
from cargohold.oci.reference import Reference

EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_digest_strict_format() -> None:
    assert str(Digest.from_bytes(b"")) == EMPTY
    assert Digest.parse(EMPTY).short == "e3b0c44298fc"
    for bad in ["sha256:abc", "md5:" + "a" * 32, "sha256:" + "A" * 64, "nocolon", "sha256:" + "g" * 64]:
        with pytest.raises(InvalidArgumentError, match="invalid digest"):
            Digest.parse(bad)
    assert Digest.parse("sha512:" + "0" * 128).algorithm == "sha512"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("user/app", "docker.io/user/app:latest"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
        ("localhost/app", "localhost/app:latest"),
        ("repo@" + EMPTY, "docker.io/library/repo@" + EMPTY),
        ("ghcr.io/o/r:t@" + EMPTY, "ghcr.io/o/r:t@" + EMPTY),
    ],
)
def test_reference_normalisation(text: str, want: str) -> None:
    assert str(Reference.parse(text)) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Alpine", "lowercase"),
        ("", "empty"),
        ("a/../b", "path component"),
        ("repo@sha256:123", "invalid digest"),
        ("repo:-bad", "tag"),
        ("https://host/repo", "scheme"),
    ],
)
def test_reference_errors_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(InvalidArgumentError, match=why):
        Reference.parse(text)


def test_platform_normalisation_and_order() -> None:
    assert str(Platform.parse("linux/x86_64")) == "linux/amd64"
    assert str(Platform.parse("linux/aarch64")) == "linux/arm64"
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64"
    assert str(Platform.parse("linux/arm")) == "linux/arm/v7"
    arm7 = PlatformMatcher([Platform.parse("linux/arm/v7")])
    cands = [Platform.parse(p) for p in ["linux/arm/v5", "linux/amd64", "linux/arm/v6", "linux/arm/v7"]]
    ranked = sorted((arm7.rank(c), str(c)) for c in cands if arm7.rank(c) is not None)
    assert [name for _, name in ranked] == ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]
    assert arm7.best(cands) == 3
    assert not arm7.match(Platform.parse("linux/arm/v8"))
    with pytest.raises(InvalidArgumentError, match="os/arch"):
        Platform.parse("linux//amd64")


def test_manifest_keeps_raw_bytes_and_digest() -> None:
    img = build_image([small_base_layer()])
    m = Manifest.parse(img.manifest.data, mt.OCI_MANIFEST)
    assert m.raw == img.manifest.data
    assert m.digest == img.digest
    assert m.config.digest == img.config.digest
    assert [layer.digest for layer in m.layers] == [b.digest for b in img.layers]


def test_index_and_shape_detection_without_media_type() -> None:
    idx = build_index([build_image([small_base_layer()], platform=p) for p in ("linux/amd64", "linux/arm64")])
    doc = json.loads(idx.index.data)
    del doc["mediaType"]
    parsed = parse_manifest_or_index(json.dumps(doc).encode())
    assert isinstance(parsed, Index)
    assert [str(d.platform) for d in parsed.manifests] == ["linux/amd64", "linux/arm64"]


def test_schema1_is_refused_clearly() -> None:
    raw = json.dumps({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}).encode()
    with pytest.raises(UnsupportedMediaTypeError, match="schema 1 is not supported, convert it"):
        parse_manifest_or_index(raw, mt.DOCKER_MANIFEST_SCHEMA1_SIGNED)
    with pytest.raises(UnsupportedMediaTypeError, match="schema 1 is not supported, convert it"):
        parse_manifest_or_index(raw)


def test_unknown_media_type_names_the_descriptor() -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="application/x-mystery"):
        parse_manifest_or_index(b'{"schemaVersion":2,"mediaType":"application/x-mystery"}', "application/x-mystery")


def test_octet_stream_config_is_an_image_config() -> None:
    img = build_image([small_base_layer(), files_layer({"a": b"1"})], docker=True,
                      config_media_type=mt.OCTET_STREAM)
    assert img.config.media_type == mt.OCTET_STREAM
    assert mt.is_config(mt.OCTET_STREAM)
    assert looks_like_image_config(img.config.data)
    assert not looks_like_image_config(b"\x1f\x8b binary")
    cfg = ImageConfig.parse(img.config.data)
    assert cfg.diff_ids == img.diff_ids


def test_chain_ids_follow_the_spec() -> None:
    a, b, c = (Digest.from_bytes(x) for x in (b"a", b"b", b"c"))
    ids = chain_ids([a, b, c])
    assert ids[0] == a
    assert ids[1] == Digest.from_bytes(f"{a} {b}".encode())
    assert ids[2] == Digest.from_bytes(f"{ids[1]} {c}".encode())
