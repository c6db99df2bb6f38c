"""The transfer scenarios of ``make bench``: moving an image, cargohold against the tool people use for each job.

On the benchmark image (already in the local registry), each run and side gets a fresh filesystem:

* export       ``cargohold export``                 vs ``ctr images export``  (from each tool's own store)
* import       ``cargohold import`` (with unpack)   vs ``ctr images import`` (with unpack), into a new store
* copy         ``cargohold copy REF oci-archive:``  vs ``skopeo copy docker://REF oci-archive:``
* rootfs       ``cargohold rootfs``                 vs ``umoci raw unpack`` (image already local to both; ``raw
  unpack`` writes only the rootfs: no mtree manifest, no runtime config, as ``cargohold rootfs``)

Only the named command is timed; the set-up (pulling into the store, starting containerd, laying out an OCI
directory for umoci) is not. Every result is checked, untimed: archives blob by blob (each ``blobs/sha256/``
entry hashes to its name, and every blob of the image is there), imports with ``images check`` and the snapshot
trees, rootfs trees against the merged reference listing.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

from cargohold.devtools.benchrun import (
    BenchError,
    Reference,
    Run,
    cargohold_cmd,
    check_cargohold_images,
    check_ctr_images,
    check_merged,
    check_overlay,
    fs_env,
    timed,
)
from cargohold.devtools.containerd import containerd

STEPS = ("export", "import", "copy", "rootfs")
RIVALS = {"export": "ctr", "import": "ctr", "copy": "skopeo", "rootfs": "umoci"}
NAMESPACE = "bench"


def check_archive(label: str, path: Path, blobs: Mapping[str, int]) -> str:
    """Every ``blobs/sha256/<hex>`` entry of the OCI archive hashes to its name and every blob of the image
    (``blobs``: digest -> size) is in it."""
    found: dict[str, int] = {}
    with tarfile.open(path, "r|*") as tar:
        for m in tar:
            name = m.name.lstrip("./")
            if not (m.isreg() and name.startswith("blobs/sha256/")):
                continue
            f = tar.extractfile(m)
            assert f is not None
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            digest = "sha256:" + name.rsplit("/", 1)[1]
            if "sha256:" + h.hexdigest() != digest:
                raise BenchError(f"{label}: {path}: entry {m.name} hashes to sha256:{h.hexdigest()}")
            found[digest] = m.size
    missing = [d for d in blobs if found.get(d) != blobs[d]]
    if missing:
        raise BenchError(f"{label}: {path}: blobs missing or of another size: {', '.join(missing)}")
    return f"{len(found)} blobs verified"


def run_transfer(run: int, side: str, fs: Path, ref: str, logs: Path, blobs: Mapping[str, int],
                 reference: Reference, say: Callable[[str], None]) -> list[Run]:
    """All steps for ``side`` ("cargohold" or "rivals") on the fresh filesystem ``fs``."""
    env = fs_env(fs)
    log = logs / f"transfer-{side}-{run}.log"
    results: list[Run] = []

    def record(step: str, who: str, seconds: float, cpu: float, check: str) -> None:
        results.append(Run(scenario=step, tool=who, run=run, seconds=seconds, cpu_seconds=cpu, check=check))
        say(f"run {run} {step:<7} {who:<9} {seconds:7.2f}s  ok: {check}")

    if side == "cargohold":
        root = fs / "root"
        timed(cargohold_cmd(root, "pull", "--no-unpack", ref), log, env=env)
        out = fs / "export.tar"
        t = timed(cargohold_cmd(root, "export", str(out), ref), log, env=env)
        record("export", "cargohold", t.seconds, t.cpu_seconds, check_archive(f"run {run} export cargohold", out,
                                                                               blobs))
        label = f"run {run} import cargohold"
        t = timed(cargohold_cmd(fs / "root2", "import", "--snapshotter", "overlayfs", str(out)), log, env=env)
        check_cargohold_images(label, fs / "root2", ref, "overlayfs", env)
        record("import", "cargohold", t.seconds, t.cpu_seconds,
               "images check complete; " + check_overlay(label, fs / "root2/snapshots/overlayfs/snapshots",
                                                         reference))
        copied = fs / "copy.tar"
        t = timed(cargohold_cmd(fs / "root3", "copy", ref, f"oci-archive:{copied}"), log, env=env)
        record("copy", "cargohold", t.seconds, t.cpu_seconds,
               check_archive(f"run {run} copy cargohold", copied, blobs))
        flat = fs / "rootfs"
        t = timed(cargohold_cmd(root, "rootfs", ref, str(flat)), log, env=env)
        record("rootfs", "cargohold", t.seconds, t.cpu_seconds,
               check_merged(f"run {run} rootfs cargohold", flat, reference))
        return results

    # The rivals: containerd's ctr, skopeo, umoci.
    first = fs / "c1"
    first.mkdir()
    out = fs / "export.tar"
    with containerd(first, logs / f"containerd-transfer-{run}-a.log", env=env) as (sock, _):
        ctr = ["ctr", "--address", sock, "-n", NAMESPACE]
        timed([*ctr, "images", "pull", "--plain-http", ref], log, env=env)
        t = timed([*ctr, "images", "export", str(out), ref], log, env=env)
        record("export", "ctr", t.seconds, t.cpu_seconds, check_archive(f"run {run} export ctr", out, blobs))
    second = fs / "c2"
    second.mkdir()
    label = f"run {run} import ctr"
    with containerd(second, logs / f"containerd-transfer-{run}-b.log", env=env) as (sock, _):
        ctr = ["ctr", "--address", sock, "-n", NAMESPACE]
        t = timed([*ctr, "images", "import", str(out)], log, env=env)
        check_ctr_images(label, ctr, ref)
    record("import", "ctr", t.seconds, t.cpu_seconds, "images check complete; " + check_overlay(
        label, second / "containerd/root/io.containerd.snapshotter.v1.overlayfs/snapshots", reference))
    copied = fs / "copy.tar"
    skopeo = ["skopeo", "copy", "--quiet", "--src-tls-verify=false"]
    t = timed([*skopeo, f"docker://{ref}", f"oci-archive:{copied}"], log, env=env)
    record("copy", "skopeo", t.seconds, t.cpu_seconds, check_archive(f"run {run} copy skopeo", copied, blobs))
    layout = fs / "layout"
    timed([*skopeo, f"docker://{ref}", f"oci:{layout}:bench"], log, env=env)
    flat = fs / "rootfs"
    t = timed(["umoci", "raw", "unpack", "--image", f"{layout}:bench", str(flat)], log, env=env)
    record("rootfs", "umoci", t.seconds, t.cpu_seconds, check_merged(f"run {run} rootfs umoci", flat, reference))
    return results


def needed_commands() -> list[str]:
    return ["containerd", "ctr", "skopeo", "umoci"]
