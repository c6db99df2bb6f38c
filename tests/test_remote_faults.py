"""Bad registries cost little and explain themselves: wrong descriptor sizes, unknown manifest media types,
stalled transfers and a dead mirror. Real parts: docker-registry (also in pull-through proxy mode as a mirror)
and the fault-injecting TCP proxy in front of it."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cargohold.client import Client
from cargohold.content.local import LocalStore
from cargohold.devtools.registry import RegistryProcess, push_blob, push_manifest, start_registry
from cargohold.errors import SizeMismatchError, UnavailableError, UnsupportedMediaTypeError
from cargohold.events import Event
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.remotes.fetch import fetch_blob
from cargohold.remotes.resolver import Resolver
from support.cli import cli
from support.faultproxy import FaultProxy

ProxyFactory = Callable[[RegistryProcess], FaultProxy]
CONFIG = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()


def layer_bytes(n: int, seed: int = 7) -> bytes:
    return bytes((i * seed + i // 251) % 256 for i in range(n))


def push_image(reg: RegistryProcess, repo: str, tag: str, layers: list[bytes], *,
               sizes: list[int] | None = None) -> bytes:
    """Push an image whose manifest announces ``sizes`` for its layers (their real sizes by default)."""
    for blob in (CONFIG, *layers):
        push_blob(reg.url, repo, blob)
    doc = {
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": str(Digest.from_bytes(CONFIG)), "size": len(CONFIG)},
        "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": str(Digest.from_bytes(b)),
                    "size": (sizes[i] if sizes else len(b))} for i, b in enumerate(layers)],
    }
    raw = json.dumps(doc).encode()
    push_manifest(reg.url, repo, tag, raw, mt.OCI_MANIFEST)
    return raw


def ingests(root: Path) -> list[str]:
    ingest = root / "content" / "ingest"
    return sorted(os.listdir(ingest)) if ingest.exists() else []


@pytest.mark.parametrize("announced", [10**15, 99_999], ids=["huge", "one-short"])
def test_wrong_descriptor_size_is_a_size_mismatch_and_leaves_no_partial(
        registry: RegistryProcess, tmp_path: Path, announced: int) -> None:
    layer = layer_bytes(100_000)
    digest = Digest.from_bytes(layer)
    push_image(registry, "sized", "bad", [layer], sizes=[announced])
    push_image(registry, "sized", "good", [layer])
    root = tmp_path / "root"
    client = Client(root)
    with pytest.raises(SizeMismatchError) as info:
        client.pull(f"{registry.host}/sized:bad", unpack=False)
    assert str(info.value) == f"content {digest}: size mismatch: expected {announced} bytes, got 100000"
    assert all(not (root / "content" / "ingest" / name / "data").stat().st_size for name in ingests(root))
    # Nothing of the bad pull stands in the way of the right one.
    client.pull(f"{registry.host}/sized:good", unpack=False)
    assert client.content.read_all(digest) == layer
    proc = cli(tmp_path / "cli-root", "pull", "--no-unpack", f"{registry.host}/sized:bad", check=False)
    assert proc.returncode != 0 and "HTTP 416" not in proc.stderr
    assert f"cargohold: error: content {digest}: size mismatch: expected {announced} bytes" in proc.stderr


def test_range_past_the_end_is_a_size_mismatch(registry: RegistryProcess, tmp_path: Path) -> None:
    layer = layer_bytes(50_000)
    push_image(registry, "short", "v1", [layer])
    desc = Descriptor(media_type=mt.OCI_LAYER_GZIP, digest=Digest.from_bytes(layer), size=len(layer) + 10)
    fetcher = Resolver().fetcher(f"{registry.host}/short:v1")
    with pytest.raises(SizeMismatchError, match=f"content {desc.digest}: size mismatch: expected 50010 bytes, "
                                                "got 50000"):
        fetcher.fetch(desc, offset=len(layer))


def test_unknown_manifest_media_type_is_named_not_fetched_as_a_blob(
        registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path) -> None:
    raw = push_image(registry, "odd", "img", [layer_bytes(1000)])
    odd = "application/vnd.example.image.manifest.v1+json"
    index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": odd, "digest": str(Digest.from_bytes(raw)), "size": len(raw),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    push_manifest(registry.url, "odd", "v1", index, mt.OCI_INDEX)
    proxy = fault_proxy(registry)
    with pytest.raises(UnsupportedMediaTypeError, match=re.escape(f"unsupported manifest media type '{odd}'")):
        Client(tmp_path / "root").pull(f"{proxy.host}/odd:v1", all_platforms=True, unpack=False)
    assert not proxy.seen("GET", f"/blobs/{Digest.from_bytes(raw)}")


def test_stalled_transfer_reports_itself_and_resumes(
        registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path) -> None:
    layer = layer_bytes(200_000)
    push_image(registry, "slow", "v1", [layer])
    proxy = fault_proxy(registry)
    proxy.add_fault(r"/blobs/", method="GET", stall_after=1000, stall_seconds=3)
    events: list[Event] = []
    resolver = Resolver(on_event=events.append, stall_timeout=0.5)
    desc = Descriptor(media_type=mt.OCI_LAYER_GZIP, digest=Digest.from_bytes(layer), size=len(layer))
    store = LocalStore(tmp_path / "store")
    start = time.monotonic()
    fetch_blob(resolver.fetcher(f"{proxy.host}/slow:v1"), store, desc)
    assert time.monotonic() - start < 2.5
    assert store.read_all(desc.digest) == layer
    stalls = [e for e in events if e.action == "fetch" and e.status == "info"]
    assert [e.message for e in stalls] == [f"no data for 0.5 s from {proxy.host}"]
    assert [r.range for r in proxy.seen("GET", "/blobs/")] == [None, "bytes=1000-"]


def test_stalled_transfer_gives_up_after_fetch_timeout(
        registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path) -> None:
    layer = layer_bytes(20_000)
    push_image(registry, "slow", "v1", [layer])
    proxy = fault_proxy(registry)
    proxy.add_fault(r"/blobs/", method="GET", stall_after=0, stall_seconds=3, times=50)
    resolver = Resolver(stall_timeout=0.3, fetch_timeout=1.0)
    desc = Descriptor(media_type=mt.OCI_LAYER_GZIP, digest=Digest.from_bytes(layer), size=len(layer))
    start = time.monotonic()
    with pytest.raises(UnavailableError, match=rf"{desc.digest}: no data for \d+ s at byte 0 of 20000; giving up "
                                               r"\(fetch_timeout 1 s\)"):
        fetch_blob(resolver.fetcher(f"{proxy.host}/slow:v1"), LocalStore(tmp_path / "store"), desc)
    assert time.monotonic() - start < 3


def test_dead_mirror_is_skipped_for_the_rest_of_the_pull(
        registry: RegistryProcess, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    layers = [layer_bytes(30_000, seed) for seed in range(3, 11)]
    push_image(registry, "app", "v1", layers)
    ref = f"{registry.host}/app:v1"

    start = time.monotonic()
    Client(tmp_path / "plain", max_concurrent_downloads=1).pull(ref, unpack=False)
    plain = time.monotonic() - start

    mirror = start_registry(tmp_path_factory.mktemp("mirror"), proxy_remote=registry.url)
    hosts_dir = tmp_path / "hosts"
    (hosts_dir / registry.host).mkdir(parents=True)
    (hosts_dir / registry.host / "hosts.toml").write_text(
        f'server = "http://{registry.host}"\n\n[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if event.action == "fetch" and event.status == "done":
            mirror.stop()  # mid-pull: the first blobs came from the mirror, the rest cannot

    try:
        client = Client(tmp_path / "mirrored", hosts_dir=hosts_dir, on_event=on_event, max_concurrent_downloads=1)
        start = time.monotonic()
        client.pull(ref, unpack=False)
        mirrored = time.monotonic() - start
    finally:
        mirror.stop()
    for blob in layers:
        assert client.content.read_all(Digest.from_bytes(blob)) == blob
    skipped = [e for e in events if e.action == "host" and "skipping it for the rest of this operation" in e.message]
    assert len(skipped) == 1 and skipped[0].item == f"mirror http://{mirror.host}/v2"
    mirror_errors = [e for e in events if e.action == "host" and e.status == "error" and mirror.host in e.item]
    assert len(mirror_errors) == 2  # the failed request, then the one notice
    assert mirrored - plain < 1.0, f"pull through a dead mirror took {mirrored:.2f} s, without it {plain:.2f} s"
