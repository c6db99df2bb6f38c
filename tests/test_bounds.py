"""Bounded work against a real docker-registry: index nesting, manifest sizes and entry counts are capped with
errors that name the cap, before cargohold downloads what a hostile image asks for."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess, push_manifest
from cargohold.errors import InvalidArgumentError
from cargohold.oci import mediatypes as mt
from cargohold.oci.digest import Digest
from cargohold.oci.limits import MAX_INDEX_DEPTH, MAX_INDEX_MANIFESTS, MAX_LAYERS
from cargohold.oci.manifest import Index, Manifest
from support.cli import cli
from support.faultproxy import FaultProxy


def index_of(entries: list[dict[str, object]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries}).encode()


def push_nesting(reg: RegistryProcess, repo: str, depth: int) -> Digest:
    """An image inside ``depth`` nested indexes; returns the outermost index's digest (tagged ``deep``)."""
    img = samples.build_image([samples.small_base_layer()])
    samples.push(reg.url, repo, "inner", img)
    entry: dict[str, object] = {"mediaType": img.manifest.media_type, "digest": str(img.digest),
                                "size": len(img.manifest.data), "platform": {"os": "linux", "architecture": "amd64"}}
    raw = b""
    for _ in range(depth):
        raw = index_of([entry])
        digest = push_manifest(reg.url, repo, str(Digest.from_bytes(raw)), raw, mt.OCI_INDEX)
        entry = {"mediaType": mt.OCI_INDEX, "digest": str(digest), "size": len(raw)}
    push_manifest(reg.url, repo, "deep", raw, mt.OCI_INDEX)
    return Digest.from_bytes(raw)


def test_deep_index_nesting_fails_fast_naming_the_cap(
        registry: RegistryProcess, fault_proxy: Callable[[RegistryProcess], FaultProxy], tmp_path: Path) -> None:
    push_nesting(registry, "nest", 1000)
    proxy = fault_proxy(registry)
    proc = cli(tmp_path / "root", "pull", "--no-unpack", f"{proxy.host}/nest:deep", check=False)
    assert proc.returncode != 0
    assert f"indexes nested more than {MAX_INDEX_DEPTH} deep (the limit of index nesting)" in proc.stderr
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    # Only the indexes within the cap were fetched, not a thousand.
    assert len(proxy.seen("GET", r"/manifests/")) <= MAX_INDEX_DEPTH + 2


def test_nesting_within_the_cap_pulls(registry: RegistryProcess, tmp_path: Path) -> None:
    push_nesting(registry, "nest", MAX_INDEX_DEPTH - 1)
    client = Client(tmp_path / "root")
    result = client.pull(f"{registry.host}/nest:deep", unpack=False)
    assert len(result.manifests) == 1
    assert client.check(f"{registry.host}/nest:deep").complete


def test_entry_counts_are_capped_naming_the_cap() -> None:
    layer = {"mediaType": mt.OCI_LAYER_GZIP, "digest": "sha256:" + "a" * 64, "size": 1}
    config = {"mediaType": mt.OCI_CONFIG, "digest": "sha256:" + "b" * 64, "size": 1}
    many_layers = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": config,
                              "layers": [layer] * (MAX_LAYERS + 1)}).encode()
    with pytest.raises(InvalidArgumentError, match=f"{MAX_LAYERS + 1} layers is over the limit of {MAX_LAYERS}"):
        Manifest.parse(many_layers)
    assert len(Manifest.parse(json.dumps({"config": config, "layers": [layer] * MAX_LAYERS}).encode()).layers) \
        == MAX_LAYERS
    entry = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "c" * 64, "size": 1}
    with pytest.raises(InvalidArgumentError,
                       match=f"{MAX_INDEX_MANIFESTS + 1} manifests is over the limit of {MAX_INDEX_MANIFESTS}"):
        Index.parse(index_of([entry] * (MAX_INDEX_MANIFESTS + 1)))
