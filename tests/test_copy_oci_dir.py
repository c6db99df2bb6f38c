"""`copy` to and from OCI layout directories (`oci:DIR[:REF]`), checked against skopeo's `oci:` transport both
ways, with the real registry and the deterministic samples."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from support.cli import cli

needs_skopeo = pytest.mark.skipif(not shutil.which("skopeo"), reason="needs skopeo (Debian package skopeo)")


def _skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                    *args], check=True, capture_output=True, timeout=300)


def _multi() -> samples.SampleIndex:
    base = samples.small_base_layer()
    return samples.build_index([samples.build_image([base, samples.files_layer({f"arch/{p}": p.encode()})],
                                                    platform=p) for p in ("linux/amd64", "linux/arm64")])


def _blob_names(directory: Path) -> set[str]:
    return {p.name for p in (directory / "blobs" / "sha256").iterdir()}


@needs_skopeo
def test_we_read_a_layout_skopeo_wrote(registry: RegistryProcess, tmp_path: Path) -> None:
    multi = _multi()
    samples.push(registry.url, "demo/multi", "v1", multi)
    layout = tmp_path / "layout"
    _skopeo("--all", f"docker://{registry.host}/demo/multi:v1", f"oci:{layout}:v1")
    root = tmp_path / "root"

    out = json.loads(cli(root, "copy", f"oci:{layout}:v1", f"{registry.host}/copied/multi:v2", "-o", "json").stdout)
    assert out["digest"] == str(multi.digest)  # the index byte for byte
    assert json.loads(cli(root, "inspect", f"{registry.host}/copied/multi:v2", "-o", "json").stdout)[
        "digest"] == str(multi.digest)

    # Only the platform asked for is read from the directory; the local image gets the layout's index.
    cli(root, "copy", "--platform", "linux/arm64", f"oci:{layout}", "local:team/multi:v1")
    check = json.loads(cli(root, "images", "check", "--platform", "linux/arm64", "team/multi:v1",
                           "-o", "json").stdout)
    assert check[0]["status"] == "complete"

    missing = cli(root, "copy", f"oci:{layout}:nope", "local:x:v1", check=False)
    assert missing.returncode == 1
    assert missing.stderr.splitlines()[-1] == f"cargohold: error: OCI layout {layout}: no image 'nope' (it holds v1)"


@needs_skopeo
def test_skopeo_reads_a_layout_we_wrote(registry: RegistryProcess, tmp_path: Path) -> None:
    img = samples.build_image([samples.small_base_layer()])
    samples.push(registry.url, "demo/app", "v1", img)
    multi = _multi()
    samples.push(registry.url, "demo/multi", "v1", multi)
    layout = tmp_path / "layout"
    root = tmp_path / "root"

    cli(root, "copy", f"docker://{registry.host}/demo/app:v1", f"oci:{layout}:app")
    cli(root, "copy", f"{registry.host}/demo/multi:v1", f"oci:{layout}:multi")
    index = json.loads((layout / "index.json").read_text())
    assert [(m["digest"], m["annotations"]["org.opencontainers.image.ref.name"]) for m in index["manifests"]] == [
        (str(img.digest), "app"), (str(multi.digest), "multi")]
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    wanted = {b.digest.hex for b in [img.manifest, *img.blobs, multi.index]}
    wanted |= {b.digest.hex for i in multi.images for b in [i.manifest, *i.blobs]}
    assert _blob_names(layout) == wanted
    assert not [p for p in layout.rglob(".*tmp-*")]  # no temp files left

    # skopeo reads both images back out of our directory, bytes unchanged.
    _skopeo(f"oci:{layout}:app", f"docker-archive:{tmp_path / 'app.tar'}:demo/app:v1")
    _skopeo("--all", f"oci:{layout}:multi", f"docker://{registry.host}/back/multi:v1")
    out = json.loads(cli(root, "inspect", f"{registry.host}/back/multi:v1", "-o", "json").stdout)
    assert out["digest"] == str(multi.digest)

    # Writing the same REF again replaces its entry.
    cli(root, "copy", f"{registry.host}/demo/app:v1", f"oci:{layout}:multi")
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["app", "multi"]
    assert index["manifests"][1]["digest"] == str(img.digest)


def test_a_corrupt_layout_blob_is_refused(registry: RegistryProcess, tmp_path: Path) -> None:
    img = samples.build_image([samples.small_base_layer()])
    samples.push(registry.url, "demo/app", "v1", img)
    layout, root = tmp_path / "layout", tmp_path / "root"
    cli(root, "copy", f"{registry.host}/demo/app:v1", f"oci:{layout}:v1")
    layer = layout / "blobs" / "sha256" / img.layers[0].digest.hex
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    proc = cli(tmp_path / "fresh", "copy", f"oci:{layout}:v1", "local:demo/app:v1", check=False)
    assert proc.returncode == 2  # bad input: a digest mismatch
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("cargohold: error: ") and str(layer) in last and str(img.layers[0].digest) in last
    assert cli(tmp_path / "fresh", "images", "ls", "-q").stdout == ""

    layer.unlink()
    proc = cli(tmp_path / "fresh", "copy", f"oci:{layout}:v1", "local:demo/app:v1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (f"cargohold: error: OCI layout {layout}: blob {img.layers[0].digest} "
                                   f"({img.layers[0].media_type}) missing: no blobs/sha256/{img.layers[0].digest.hex}")
