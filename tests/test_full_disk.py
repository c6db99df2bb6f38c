"""A disk that fills during a pull (while fetching, applying or committing) ends in one clear error naming the path,
leaves a root every read and remove command works on, and the same pull completes once space is freed, leaving
nothing over. Node limits (max_layer_size, max_unpacked_size) stop a layer before it is fetched or while it inflates.

Real parts only: a small ext4 made by mkfs.ext4 on a file and loop-mounted, the real docker-registry on loopback,
the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.cli import cli

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from cargohold.errors import NoSpaceError
from cargohold.events import Event

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mkfs.ext4") is None,
                                reason="needs root and mkfs.ext4 (loop-mounted ext4)")


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 (no reserved blocks: root may not use more than users) loop-mounted; unmounted afterwards,
    even when the test fails."""
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        # Overlay mounts under the root (none are left by the commands here, but be sure) go first.
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            point = line.split()[1]
            if point.startswith(f"{mnt}/"):
                subprocess.run(["umount", "-l", point], check=False)
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def free_bytes(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


def leave_free(fs: Path, nbytes: int) -> Path:
    """Allocate a filler file so that about ``nbytes`` stay free (0: none at all)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size + free_bytes(fs) - nbytes
        while True:
            try:
                os.posix_fallocate(fd, 0, max(size, 1))
                break
            except OSError:  # the extent tree needs blocks of its own: ask for a little less
                size -= 64 << 10
        if nbytes == 0:  # the last blocks (the extent tree took some): byte by byte until nothing is left
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def _layers() -> tuple[bytes, bytes]:
    # 4 MiB that do not compress, then 12 MiB that gzip to little (not zeros: those would be written sparse).
    solid = random.Random(11).randbytes(4 * MiB)
    inflating = (b"cargohold-fills-disks-" * (12 * MiB // 22 + 1))[: 12 * MiB]
    return samples.files_layer({"solid.bin": solid}), samples.files_layer({"inflating.txt": inflating})


@pytest.fixture
def images(registry: RegistryProcess) -> dict[str, str]:
    """The refs of: ``big`` (both layers), ``base`` (the solid layer alone) and ``victim`` (a small image)."""
    solid, inflating = _layers()
    big = samples.build_image([solid, inflating], compression="gzip", level=1)
    base = samples.build_image([solid], compression="gzip", level=1)
    victim = samples.build_image([samples.files_layer({"victim": b"remove me\n"})])
    samples.push(registry.url, "disk/big", "v1", big)
    samples.push(registry.url, "disk/base", "v1", base)
    samples.push(registry.url, "disk/victim", "v1", victim)
    return {name: f"{registry.host}/disk/{name}:v1" for name in ("big", "base", "victim")}


def one_error_line(stderr: str) -> str:
    """The one error line (progress lines may precede it on stderr)."""
    errors = [line for line in stderr.splitlines() if line.startswith("cargohold: error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    assert "Traceback" not in stderr
    return errors[0]


def files_of(root: Path) -> list[tuple[str, int]]:
    """Every file of a root but the metadata database and lock files, with its size; snapshot ids (which count
    every snapshot ever made) replaced by ``*``."""
    out: list[tuple[str, int]] = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if rel.startswith("metadata.db") or name.endswith(".lock"):
                continue
            out.append((re.sub(r"/snapshots/[0-9]+/", "/snapshots/*/", rel), path.lstat().st_size))
    return sorted(out)


def recover_and_compare(fs: Path, root: Path, filler: Path, refs: dict[str, str]) -> None:
    """On the full disk: every read and remove command works; then free space, pull again, compare with a fresh
    root that pulled without interruption."""
    leave_free(fs, 0)  # whatever the failed command discarded: no byte free for the commands that free space
    assert cli(root, "images", "ls", "-q").stdout.split() == [refs["victim"]]
    blobs = [line.split()[0] for line in cli(root, "content", "ls").stdout.splitlines()[1:]]
    snapshots = [row.get("name", row.get("key")) for row in
                 json.loads(cli(root, "snapshots", "ls", "-o", "json").stdout)]
    assert blobs and snapshots
    cli(root, "images", "rm", refs["victim"])
    cli(root, "snapshots", "rm", *snapshots)
    cli(root, "content", "rm", *blobs)
    cli(root, "gc")
    assert cli(root, "images", "ls", "-q").stdout == ""
    filler.unlink()
    cli(root, "pull", refs["big"])
    check = cli(root, "images", "check")
    assert "complete" in check.stdout, check.stdout
    cli(root, "gc")
    assert files_of(root) == _fresh_pull(fs, refs["big"])


_FRESH: list[list[tuple[str, int]]] = []


def _fresh_pull(fs: Path, ref: str) -> list[tuple[str, int]]:
    """The files of a fresh root on the same kind of filesystem after an uninterrupted pull (the sample images
    are deterministic: computed once per session)."""
    if not _FRESH:
        fresh = fs / "fresh"
        cli(fresh, "pull", ref)
        _FRESH.append(files_of(fresh))
    return _FRESH[0]


def test_disk_full_while_fetching(ext4: Path, images: dict[str, str]) -> None:
    root = ext4 / "root"
    cli(root, "pull", images["victim"])
    filler = leave_free(ext4, 2 * MiB)
    proc = cli(root, "pull", "--no-unpack", images["big"], check=False)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert "writing ingest" in line and str(root / "content" / "ingest") in line, line
    assert "No space left on device" in line, line
    recover_and_compare(ext4, root, filler, images)


def test_disk_full_while_applying(ext4: Path, images: dict[str, str]) -> None:
    root = ext4 / "root"
    cli(root, "pull", images["victim"])
    # The solid layer is there already: only the inflating one (a small download) is fetched while applied, so
    # the disk fills in the apply, not in the download that streams beside it.
    cli(root, "pull", images["base"])
    cli(root, "images", "rm", images["base"])
    filler = leave_free(ext4, 10 * MiB)
    proc = cli(root, "pull", images["big"], check=False)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert "writing layer sha256:" in line and str(root / "snapshots") in line, line
    assert "No space left on device" in line, line
    # Nothing was recorded: no image, no uncommitted snapshot left behind.
    assert images["big"] not in cli(root, "images", "ls", "-q").stdout
    assert "active" not in cli(root, "snapshots", "ls").stdout
    recover_and_compare(ext4, root, filler, images)


def test_disk_full_while_committing(ext4: Path, images: dict[str, str]) -> None:
    root = ext4 / "root"
    cli(root, "pull", images["victim"])
    cli(root, "pull", images["base"])  # the solid layer's snapshot exists: only the inflating one is applied
    cli(root, "images", "rm", images["base"])
    fill: list[Path] = []

    def on_event(event: Event) -> None:
        # The layer is written: take the last byte before the snapshot is committed.
        if event.action == "apply" and event.status == "done" and not fill:
            fill.append(leave_free(ext4, 0))

    client = Client(root, on_event=on_event)
    try:
        with pytest.raises(NoSpaceError) as info:
            client.pull(images["big"])
    finally:
        client.close()
    assert fill, f"the apply never finished: {info.value}"
    text = str(info.value)
    # The commit is the snapshot row's update: the database names itself and the space it lacks.
    assert f"metadata database {root / 'metadata.db'}: write" in text, text
    assert "No space left on device" in text, text
    assert images["big"] not in cli(root, "images", "ls", "-q").stdout
    assert "active" not in cli(root, "snapshots", "ls").stdout
    recover_and_compare(ext4, root, fill[0], images)


def test_max_unpacked_size_stops_an_inflating_layer(registry: RegistryProcess, tmp_path: Path) -> None:
    # 64 MiB of a repeated pattern: a gzip layer well under 1 MiB.
    tar = samples.files_layer({"bomb": (b"inflate!" * (8 * MiB))})
    image = samples.build_image([tar])
    assert len(image.layers[0].data) < MiB
    samples.push(registry.url, "disk/bomb", "v1", image)
    root = tmp_path / "root"
    ref = f"{registry.host}/disk/bomb:v1"
    proc = cli(root, "--max-unpacked-size", "16MiB", "pull", ref, check=False)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"layer {image.layers[0].digest}" in line and f"max_unpacked_size ({16 * MiB} bytes)" in line, line
    assert cli(root, "images", "ls", "-q").stdout == ""
    assert "bomb" not in str(files_of(root))
    assert cli(root, "snapshots", "ls", "-o", "json").stdout.strip() in ("[]", "")
    # The config key does the same; without a limit the pull goes through.
    (tmp_path / "limits.toml").write_text('max_unpacked_size = "16MiB"\n')
    proc = cli(root, "--config", str(tmp_path / "limits.toml"), "pull", ref, check=False)
    assert proc.returncode == 1 and "max_unpacked_size" in proc.stderr, proc.stderr
    cli(root, "pull", ref)
    # rootfs applies the same limit.
    proc = cli(root, "--max-unpacked-size", "16MiB", "rootfs", ref, str(tmp_path / "rootfs"), check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"max_unpacked_size ({16 * MiB} bytes)" in one_error_line(proc.stderr)


def test_max_layer_size_refuses_before_download(registry: RegistryProcess, tmp_path: Path) -> None:
    image = samples.build_image([samples.files_layer({"solid": random.Random(3).randbytes(2 * MiB)})],
                                compression="none")
    samples.push(registry.url, "disk/large", "v1", image)
    root = tmp_path / "root"
    ref = f"{registry.host}/disk/large:v1"
    layer = image.layers[0].digest
    for extra in ((), ("--no-unpack",)):
        proc = cli(root, "--max-layer-size", "1MiB", "pull", *extra, ref, check=False)
        assert proc.returncode == 1, proc.stderr
        line = one_error_line(proc.stderr)
        assert f"layer {layer}" in line and f"max_layer_size ({MiB} bytes)" in line and "not fetched" in line
        listed = [line.split()[0] for line in cli(root, "content", "ls").stdout.splitlines()[1:]]
        assert listed and str(layer) not in listed  # the manifest and config were fetched, the layer not
        assert not any(layer.hex in name for name in files_of(root))
    proc = cli(root, "--max-layer-size", "lots", "images", "ls", check=False)
    assert proc.returncode == 2 and "'lots' is not a size" in proc.stderr, proc.stderr
