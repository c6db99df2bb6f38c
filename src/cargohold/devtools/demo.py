"""``make demo``: a local registry on 127.0.0.1 with generated sample images, then cargohold's main job on it.

Every step runs the real ``cargohold`` command line against an embedded default data root, and prints what it
ran and what came out.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cargohold.devtools import samples
from cargohold.devtools.registry import start_registry
from cargohold.oci import mediatypes as mt


def _run(args: list[str], root: Path, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cargohold.cli.main", "--root", str(root), *args]
    shown = "cargohold --root " + shlex.quote(str(root)) + " " + " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {shown}", flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.stdout:
        print(proc.stdout.rstrip(), flush=True)
    if proc.stderr:
        print(proc.stderr.rstrip(), file=sys.stderr, flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo step failed (exit {proc.returncode}): {shown}")
    return proc


def seed(base_url: str) -> dict[str, str]:
    """Push the sample images; returns name -> reference."""
    host = base_url.split("://", 1)[1]
    base = samples.small_base_layer()
    app = samples.files_layer(samples.random_files(7, 200, prefix="srv/app"))
    refs = {}
    img = samples.build_image([base, app], compression="gzip", level=6)
    samples.push(base_url, "demo/app", "v1", img)
    refs["app"] = f"{host}/demo/app:v1"
    # Same layers, compressed differently: the "missing blobs" case containerd users hit.
    img_zstd = samples.build_image([base, app], compression="zstd")
    samples.push(base_url, "demo/app-zstd", "v1", img_zstd)
    refs["app-zstd"] = f"{host}/demo/app-zstd:v1"
    multi = samples.build_index(
        [samples.build_image([base, samples.files_layer({f"arch/{p}": p.encode()})], platform=p)
         for p in ("linux/amd64", "linux/arm64", "linux/arm/v7")]
    )
    samples.push(base_url, "demo/multi", "v1", multi)
    refs["multi"] = f"{host}/demo/multi:v1"
    legacy = samples.build_image([base], docker=True, config_media_type=mt.OCTET_STREAM)
    samples.push(base_url, "demo/legacy", "v1", legacy)
    refs["legacy"] = f"{host}/demo/legacy:v1"
    return refs


def main() -> None:
    keep = os.environ.get("CARGOHOLD_DEMO_ROOT")
    work = Path(tempfile.mkdtemp(prefix="cargohold-demo-"))
    root = Path(keep) if keep else work / "root"
    if keep and root.exists():
        shutil.rmtree(root)
    try:
        with start_registry(work / "registry") as reg:
            print(f"registry: {reg.url} (storage {reg.storage})")
            refs = seed(reg.url)
            for name, ref in refs.items():
                print(f"pushed {name}: {ref}")
            _run(["pull", refs["app"]], root)
            # Same diffIDs, other compression: the snapshots are reused, yet every blob is fetched.
            _run(["pull", refs["app-zstd"]], root)
            _run(["pull", "--no-unpack", "--platform", "linux/arm64", refs["multi"]], root)
            _run(["pull", refs["legacy"], "--snapshotter", "native", "--output", "json"], root)
            _run(["images", "ls"], root)
            _run(["images", "inspect", refs["app-zstd"]], root)
            _run(["images", "check", refs["app"], refs["app-zstd"], refs["legacy"]], root)
            _run(["images", "check", "--platform", "linux/arm64", refs["multi"], "--output", "json"], root)
            _run(["snapshots", "tree"], root)
            _run(["unpack", refs["app"], "--snapshotter", "native"], root)
            flat = work / "rootfs"
            _run(["rootfs", refs["app"], str(flat)], root)
            print(f"rootfs: {sum(1 for _ in flat.rglob('*'))} entries under {flat}; etc/os-release: "
                  f"{(flat / 'etc' / 'os-release').read_text().splitlines()[0]}")
            mnt = work / "mnt"
            mnt.mkdir()
            _run(["mount", refs["app-zstd"], str(mnt)], root)
            try:
                print(f"mounted {mnt}: {sorted(p.name for p in mnt.iterdir())}")
            finally:
                _run(["unmount", str(mnt)], root)
            # Move images: an archive written whole, imported back after the image and its content are gone.
            archive = work / "app-zstd.tar"
            _run(["export", str(archive), refs["app-zstd"]], root)
            _run(["images", "rm", refs["app-zstd"]], root)
            _run(["gc"], root)
            _run(["import", str(archive)], root)
            _run(["images", "check", refs["app-zstd"]], root)
            multi = work / "multi.tar"
            _run(["export", "--platform", "linux/arm64", str(multi), refs["multi"]], root)
            # Push to a second registry, and copy registry -> oci-archive as skopeo would.
            with start_registry(work / "registry2") as reg2:
                host2 = reg2.url.split("://", 1)[1]
                _run(["push", f"{host2}/mirror/app:v1", refs["app"]], root)
                _run(["copy", f"{host2}/mirror/app:v1", f"oci-archive:{work / 'copy.tar'}", "--output", "json"],
                     root)
        print(f"\ndemo done; data root: {root}" + ("" if keep else " (temporary, removed)"))
        bindir = Path(sys.executable).parent
        print(f"the commands are {bindir / 'cargohold'} and {bindir / 'cargohold-registry'}; "
              f"`. {bindir / 'activate'}` puts them on your shell's PATH (see the README's tour)")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
