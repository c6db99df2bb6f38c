"""Looking before pulling: `inspect`, `tags` and `digest` against a real docker-registry, with the deterministic
samples. Nothing of what is looked at lands in the store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cargohold.devtools import modern, samples
from cargohold.devtools.registry import RegistryProcess
from cargohold.oci import mediatypes as mt
from support.cli import cli, cli_bytes
from support.faultproxy import FaultProxy


def _app() -> samples.SampleImage:
    return samples.build_image([samples.small_base_layer(), samples.files_layer({"app/run": b"hello\n"})],
                               cmd=("/app/run", "--serve"), created="2024-02-03T04:05:06Z")


def _blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and "blobs" in p.parts]


def test_inspect_manifest_shows_layers_and_config_and_stores_nothing(registry: RegistryProcess, tmp_path: Path
                                                                      ) -> None:
    img = _app()
    samples.push(registry.url, "demo/app", "v1", img)
    ref = f"{registry.host}/demo/app:v1"
    root = tmp_path / "root"

    doc = json.loads(cli(root, "inspect", ref, "-o", "json").stdout)
    assert doc["digest"] == str(img.digest)
    assert doc["media_type"] == mt.OCI_MANIFEST
    assert [(layer["digest"], layer["size"], layer["mediaType"]) for layer in doc["manifest"]["layers"]] == [
        (str(b.digest), len(b.data), mt.OCI_LAYER_GZIP) for b in img.layers]
    assert doc["config"]["Cmd"] == ["/app/run", "--serve"]
    assert doc["config"]["created"] == "2024-02-03T04:05:06Z"
    assert doc["config"]["platform"] == "linux/amd64"
    assert doc["manifest"]["size"] == len(img.manifest.data) + len(img.config.data) + sum(
        len(b.data) for b in img.layers)

    text = cli(root, "inspect", ref).stdout
    assert f"digest:    {img.digest}" in text
    assert 'cmd:       ["/app/run", "--serve"]' in text
    assert "layers:    2" in text
    assert str(img.layers[1].digest) in text

    assert cli_bytes(root, "inspect", ref, "--raw").stdout == img.manifest.data
    assert cli_bytes(root, "inspect", ref, "--config").stdout == img.config.data
    assert _blob_files(root) == []
    assert cli(root, "images", "ls", "-q").stdout == ""


def test_inspect_index_lists_platforms_and_picks_one(registry: RegistryProcess, tmp_path: Path) -> None:
    graph = modern.buildkit_index()
    modern.push_graph(registry.url, "demo/multi", "v1", graph)
    ref = f"{registry.host}/demo/multi:v1"
    root = tmp_path / "root"
    arm = modern.platform_image("linux/arm64")

    doc = json.loads(cli(root, "inspect", ref, "--platform", "linux/arm64", "-o", "json").stdout)
    assert doc["digest"] == str(graph.digest)
    assert [m.get("platform") for m in doc["manifests"] if m["kind"] == "image"] == ["linux/amd64", "linux/arm64"]
    assert sum(m["kind"] == "attestation" for m in doc["manifests"]) == 2
    assert doc["manifest"]["digest"] == str(arm.digest)
    assert doc["config"]["platform"] == "linux/arm64"

    assert cli_bytes(root, "inspect", ref, "--raw").stdout == graph.root.data
    assert cli_bytes(root, "inspect", ref, "--config", "--platform", "linux/arm64").stdout == arm.config.data
    text = cli(root, "inspect", ref, "--platform", "linux/arm64").stdout
    assert f"manifest:  {arm.digest} (linux/arm64)" in text
    assert "attestation for sha256:" in text

    # No runnable entry for the platform: the index is still shown; --config says why it has nothing.
    text = cli(root, "inspect", ref, "--platform", "windows/amd64").stdout
    assert "no manifest matches windows/amd64" in text
    proc = cli(root, "inspect", ref, "--platform", "windows/amd64", "--config", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"cargohold: error: {ref}: no manifest of the index matches windows/amd64")
    assert _blob_files(root) == []


def test_digest_prints_the_digest_only(registry: RegistryProcess, tmp_path: Path) -> None:
    graph = modern.buildkit_index()
    modern.push_graph(registry.url, "demo/multi", "v1", graph)
    proc = cli(tmp_path / "root", "digest", f"{registry.host}/demo/multi:v1")
    assert proc.stdout == f"{graph.digest}\n"


def test_tags_lists_every_tag(registry: RegistryProcess, tmp_path: Path) -> None:
    img = _app()
    names = ["v1", "v2", "latest", "1.0", "beta"]
    for name in names:
        samples.push(registry.url, "demo/app", name, img)
    root = tmp_path / "root"
    proc = cli(root, "tags", f"{registry.host}/demo/app", "--page-size", "2")
    # In the registry's order (Debian's docker-registry 2.8 sends one page whatever n says).
    assert sorted(proc.stdout.splitlines()) == sorted(names)
    assert sorted(json.loads(cli(root, "tags", f"{registry.host}/demo/app:v1", "-o", "json").stdout)) == sorted(
        names)


def test_tags_follow_link_pagination(registry: RegistryProcess, fault_proxy: Callable[[RegistryProcess], FaultProxy],
                                     tmp_path: Path) -> None:
    """A registry that pages (distribution 3, Harbor, ...): the proxy answers pages as such a registry does,
    each with a Link to the next; every page is read, in order, and a Link back to a page read is refused."""
    samples.push(registry.url, "demo/app", "v1", _app())
    proxy = fault_proxy(registry)
    tags_path = "^/v2/demo/app/tags/list$"
    pages = [(["1.0", "beta"], "last=beta&n=2"), (["latest", "v1"], "last=v1&n=2"), (["v2"], None)]
    for tags, nxt in pages:
        link = {"Link": f'</v2/demo/app/tags/list?{nxt}>; rel="next"'} if nxt else {}
        proxy.add_fault(tags_path, method="GET", status=200, headers={"Content-Type": "application/json", **link},
                        body=json.dumps({"name": "demo/app", "tags": tags}).encode())
    proc = cli(tmp_path / "root", "tags", f"{proxy.host}/demo/app", "--page-size", "2")
    assert proc.stdout.splitlines() == ["1.0", "beta", "latest", "v1", "v2"]
    assert [r.query for r in proxy.seen("GET", tags_path)] == ["n=2", "last=beta&n=2", "last=v1&n=2"]

    proxy.add_fault(tags_path, method="GET", status=200,
                    headers={"Content-Type": "application/json", "Link": '</v2/demo/app/tags/list?n=2>; rel="next"'},
                    body=json.dumps({"name": "demo/app", "tags": ["v1"]}).encode())
    proc = cli(tmp_path / "root", "tags", f"{proxy.host}/demo/app", "--page-size", "2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"cargohold: error: {proxy.host}: tags of {proxy.host}/demo/app: "
                                   "pagination loops at demo/app/tags/list?n=2")


def test_missing_things_get_one_clear_error(registry: RegistryProcess, tmp_path: Path) -> None:
    root = tmp_path / "root"
    samples.push(registry.url, "demo/app", "v1", _app())
    for args, named in ((("inspect", f"{registry.host}/demo/app:nope"), f"{registry.host}/demo/app:nope"),
                        (("digest", f"{registry.host}/demo/app:nope"), f"{registry.host}/demo/app:nope"),
                        (("tags", f"{registry.host}/demo/none"), f"tags of {registry.host}/demo/none")):
        proc = cli(root, *args, check=False)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith(f"cargohold: error: {named}: not found"), proc.stderr
        assert "Traceback" not in proc.stderr
    proc = cli(root, "inspect", f"{registry.host}/demo/app:v1", "--raw", "--config", check=False)
    assert proc.returncode == 2
    assert "--raw and --config" in proc.stderr
