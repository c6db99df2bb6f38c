"""Image archives against a real docker-registry: export -> import round trips (byte-identical), naming
options, missing content, corrupt and truncated archives, stdin/stdout, interrupted exports. ``docker save``
archives and hostile entry names are in test_archive_interop.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
from tests.treeutil import read_tree

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.errors import DigestMismatchError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from cargohold.metadata.db import utcnow
from cargohold.metadata.labels import LABEL_IMPORTED
from cargohold.oci import mediatypes as mt
from cargohold.oci.digest import Digest
from cargohold.snapshots.base import Kind
from support.cli import cli_bytes as cli

PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")


def multi_arch() -> samples.SampleIndex:
    images = [samples.build_image([samples.small_base_layer(),
                                   samples.files_layer({"etc/arch": p.encode(), "opt/common": b"same"})],
                                  platform=p) for p in PLATFORMS]
    return samples.build_index(images)


def two_layer(**kw: object) -> samples.SampleImage:
    return samples.build_image(
        [samples.small_base_layer(), samples.files_layer(samples.random_files(7, 30, prefix="opt"))], **kw)


def tree_of(client: Client, ref: str, tmp_path: Path, *, platform: str | None = None) -> dict[str, tuple]:
    """The image's unpacked tree as the native snapshotter holds it (a real mount of a view)."""
    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    client.mount(ref, mnt, snapshotter="native", platform=platform)
    try:
        return read_tree(mnt)
    finally:
        client.unmount(mnt)


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def read_member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def forget(client: Client, *names: str) -> None:
    for name in names:
        client.remove_image(name)
    client.gc()


# -- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["all-platforms", "one-platform"])
def test_round_trip_is_byte_identical_and_unpacks_like_a_pull(registry, tmp_path: Path, mode: str) -> None:
    index = multi_arch()
    samples.push(registry.url, "multi", "v1", index)
    ref = f"{registry.host}/multi:v1"
    every = mode == "all-platforms"
    platforms = [] if every else ["linux/arm64"]
    client = Client(tmp_path / "root")
    client.pull(ref, platforms=platforms, all_platforms=every, unpack=False)

    first = tmp_path / "first.tar"
    res = client.export(first, [ref], platforms=platforms, all_platforms=every)
    assert res.images[0].target.digest == index.digest
    names = [m.name for m in members(first)]
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and not m.uname for m in members(first))
    blobs = {n.rsplit("/", 1)[1] for n in names if n.startswith("blobs/sha256/") and n.count("/") == 2}
    wanted = index.images if every else [index.images[1]]
    assert blobs == {index.digest.hex} | {b.digest.hex for i in wanted for b in [i.manifest, *i.blobs]}
    assert read_member(first, f"blobs/sha256/{index.digest.hex}") == index.index.data  # the index, whole
    entry = json.loads(read_member(first, "index.json"))["manifests"][0]
    assert entry["digest"] == str(index.digest)
    assert entry["annotations"] == {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": "v1"}
    docker = json.loads(read_member(first, "manifest.json"))
    chosen = index.images[0] if every else index.images[1]  # the host's (amd64) with all platforms
    assert docker == [{"Config": f"blobs/sha256/{chosen.config.digest.hex}", "RepoTags": [ref],
                       "Layers": [f"blobs/sha256/{layer.digest.hex}" for layer in chosen.layers]}]
    again = tmp_path / "again.tar"
    client.export(again, [ref], platforms=platforms, all_platforms=every)
    assert again.read_bytes() == first.read_bytes()

    forget(client, ref)
    assert not client.content.exists(index.digest)
    imported = client.import_archive(first, platforms=platforms, all_platforms=every, snapshotter="native")
    assert imported.format == "oci"  # index.json preferred over the docker manifest.json beside it
    assert [(i.name, i.target.digest) for i in imported.images] == [(ref, index.digest)]
    assert LABEL_IMPORTED in client.image(ref).labels
    assert client.check(ref, platforms=platforms, all_platforms=every).complete

    second = tmp_path / "second.tar"
    client.export(second, [ref], platforms=platforms, all_platforms=every)
    assert second.read_bytes() == first.read_bytes()

    direct = Client(tmp_path / "direct")
    direct.pull(ref, platforms=platforms or ["linux/amd64"], snapshotter="native")
    plat = None if every else "linux/arm64"
    assert tree_of(client, ref, tmp_path, platform=plat) == tree_of(direct, ref, tmp_path, platform=plat)


def test_same_layers_other_compression_export_rm_import_is_complete(registry, tmp_path: Path) -> None:
    """The missing-blob scenario: B shares A's uncompressed layers, compressed differently."""
    a, b = two_layer(level=1), two_layer(level=9)
    assert a.diff_ids == b.diff_ids and a.layers[1].digest != b.layers[1].digest
    samples.push(registry.url, "a", "v1", a)
    samples.push(registry.url, "b", "v1", b)
    ref_a, ref_b = f"{registry.host}/a:v1", f"{registry.host}/b:v1"
    client = Client(tmp_path / "root")
    client.pull(ref_a, snapshotter="native")
    client.pull(ref_b, snapshotter="native")
    out = tmp_path / "b.tar"
    client.export(out, [ref_b])
    forget(client, ref_b)
    assert not client.content.exists(b.layers[1].digest)
    client.import_archive(out, snapshotter="native")
    check = client.check(ref_b)
    assert check.complete and not check.missing
    for blob in [b.manifest, *b.blobs]:
        assert client.content.read_all(blob.digest) == blob.data
    root = tmp_path / "root"
    report = json.loads(cli(root, "images", "check", ref_b, "--output", "json").stdout)
    assert report[0]["status"] == "complete" and report[0]["unpacked"]["native"] is True


def test_several_images_one_archive_shared_blobs_once(registry, tmp_path: Path) -> None:
    img = two_layer()
    samples.push(registry.url, "one", "v1", img)
    client = Client(tmp_path / "root")
    client.pull(f"{registry.host}/one:v1", unpack=False)
    names = [f"{registry.host}/one:v1", "example.com/team/copy:v2", "docker.io/library/copy:v3"]
    for name in names[1:]:
        client.tag(names[0], name)
    out = tmp_path / "both.tar"
    res = client.export(out, names)
    blobs = [m.name for m in members(out) if m.name.startswith("blobs/sha256/") and m.isfile()]
    assert len(res.blobs) == 4 and sorted(blobs) == sorted({f"blobs/sha256/{b.digest.hex}" for b in res.blobs})
    docker = json.loads(read_member(out, "manifest.json"))
    assert docker == [{**docker[0], "RepoTags": [*names[:2], "copy:v3"]}]  # one entry; docker's familiar names
    fresh = Client(tmp_path / "fresh")
    got = fresh.import_archive(out, unpack=False)
    assert sorted(i.name for i in got.images) == sorted(names)


# -- names ---------------------------------------------------------------------------------------------


def _retag_index(src: Path, dst: Path, annotations: dict[str, str]) -> None:
    """Copy an archive, replacing its index.json entries' annotations."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
            if m.name == "index.json" and data is not None:
                doc = json.loads(data)
                for entry in doc["manifests"]:
                    entry["annotations"] = annotations
                data = json.dumps(doc).encode()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)


def test_import_names_base_name_digests_and_index_name(registry, tmp_path: Path) -> None:
    img = two_layer()
    samples.push(registry.url, "named", "v1", img)
    ref = f"{registry.host}/named:v1"
    client = Client(tmp_path / "root")
    client.pull(ref, unpack=False)
    exported = tmp_path / "x.tar"
    client.export(exported, [ref])
    bare = tmp_path / "bare.tar"
    _retag_index(exported, bare, {"org.opencontainers.image.ref.name": "v7"})
    today = utcnow().date().isoformat()

    out = json.loads(cli(tmp_path / "a", "import", str(bare), "--no-unpack", "--output", "json").stdout)
    assert [i["name"] for i in out["images"]] == [f"docker.io/library/import-{today}:v7"]

    out = json.loads(cli(tmp_path / "b", "import", str(bare), "--no-unpack", "--base-name", "example.com/app",
                         "--digests", "--index-name", "example.com/all:idx", "--output", "json").stdout)
    got = {i["name"]: (i["digest"], i["media_type"]) for i in out["images"]}
    assert got["example.com/app:v7"] == (str(img.digest), mt.OCI_MANIFEST)
    assert got[f"example.com/app@{img.digest}"] == (str(img.digest), mt.OCI_MANIFEST)
    assert got["example.com/all:idx"] == (out["index"], mt.OCI_INDEX)
    assert out["index"] == "sha256:" + hashlib.sha256(read_member(bare, "index.json")).hexdigest()
    assert all(LABEL_IMPORTED in i["labels"] for i in out["images"])
    stamp = out["images"][0]["labels"][LABEL_IMPORTED]
    assert stamp.startswith(today) and stamp.endswith("Z")
    check = json.loads(cli(tmp_path / "b", "images", "check", "--output", "json").stdout)
    assert {c["status"] for c in check} == {"complete"}

    # no name at all: recorded under its digest so it is not lost
    nameless = tmp_path / "nameless.tar"
    _retag_index(exported, nameless, {})
    fresh = Client(tmp_path / "c")
    res = fresh.import_archive(nameless, unpack=False)
    assert [i.name for i in res.images] == [f"docker.io/library/import-{today}@{img.digest}"]


# -- errors ----------------------------------------------------------------------------------------------


def test_export_missing_blobs_lists_every_one_and_fetch_missing_fixes_it(registry, tmp_path: Path) -> None:
    img = two_layer()
    samples.push(registry.url, "gaps", "v1", img)
    ref = f"{registry.host}/gaps:v1"
    root = tmp_path / "root"
    cli(root, "pull", "--no-unpack", ref)
    gone = [img.config.digest, img.layers[0].digest, img.layers[1].digest]
    cli(root, "content", "rm", *map(str, gone))
    out = tmp_path / "gaps.tar"
    proc = cli(root, "export", str(out), ref, check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "3 blobs missing" in err and all(str(d) in err for d in gone), err
    assert not out.exists() and os.listdir(tmp_path) == ["root"]

    done = json.loads(cli(root, "export", "--fetch-missing", str(out), ref, "--output", "json").stdout)
    assert sorted(done["fetched"]) == sorted(map(str, gone))
    assert done["images"] == [{"name": ref, "digest": str(img.digest), "media_type": mt.OCI_MANIFEST,
                               "manifests": [str(img.digest)]}]
    assert out.exists() and json.loads(cli(root, "images", "check", ref, "--output", "json").stdout)[0][
        "status"] == "complete"


def test_export_of_an_index_missing_a_manifest_fetches_it_and_its_children(registry, tmp_path: Path) -> None:
    index = multi_arch()
    samples.push(registry.url, "multi", "v1", index)
    ref = f"{registry.host}/multi:v1"
    client = Client(tmp_path / "root")
    client.pull(ref, unpack=False)  # amd64 only
    with pytest.raises(FailedPreconditionError, match=str(index.images[1].digest)) as exc:
        client.export(tmp_path / "x.tar", [ref], all_platforms=True)
    assert str(index.images[2].digest) in str(exc.value)
    res = client.export(tmp_path / "x.tar", [ref], all_platforms=True, fetch_missing=True)
    assert {d.digest for d in res.fetched} >= {index.images[1].digest, index.images[1].layers[1].digest}
    assert len(res.blobs) == 1 + 3 * 4 - 2  # the base layer is shared by every platform


def _blob_offset(path: Path, digest: Digest) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        m = tar.getmember(f"blobs/sha256/{digest.hex}")
        return m.offset_data, m.size


def test_corrupt_blob_is_refused_naming_entry_and_digest_and_records_nothing(registry, tmp_path: Path) -> None:
    img = two_layer()
    samples.push(registry.url, "c", "v1", img)
    ref = f"{registry.host}/c:v1"
    client = Client(tmp_path / "root")
    client.pull(ref, unpack=False)
    good = tmp_path / "good.tar"
    client.export(good, [ref])
    bad = tmp_path / "bad.tar"
    raw = bytearray(good.read_bytes())
    target = img.layers[1].digest
    offset, size = _blob_offset(good, target)
    raw[offset + size // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))

    fresh = Client(tmp_path / "fresh")
    with pytest.raises(DigestMismatchError, match=rf"blobs/sha256/{target.hex}.*expected {target}"):
        fresh.import_archive(bad)
    assert fresh.list_images() == []
    assert not fresh.content.exists(target)
    proc = cli(tmp_path / "fresh", "import", str(bad), check=False)
    assert proc.returncode == 2 and f"blobs/sha256/{target.hex}" in proc.stderr.decode()
    # the blobs verified before the bad one may stay; a retry with a good archive completes
    fresh.import_archive(good, unpack=False)
    assert fresh.check(ref).complete


def test_truncated_archive_is_refused_and_records_nothing(registry, tmp_path: Path) -> None:
    img = two_layer()
    samples.push(registry.url, "t", "v1", img)
    ref = f"{registry.host}/t:v1"
    client = Client(tmp_path / "root")
    client.pull(ref, unpack=False)
    good = tmp_path / "good.tar"
    client.export(good, [ref])
    raw = good.read_bytes()
    target = img.layers[0].digest
    offset, size = _blob_offset(good, target)

    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:offset + size // 2])  # in the middle of a blob
    fresh = Client(tmp_path / "fresh")
    with pytest.raises(InvalidArgumentError, match=rf"blobs/sha256/{target.hex} \({target}\).*truncated"):
        fresh.import_archive(cut)
    assert fresh.list_images() == [] and not fresh.content.exists(target)

    # cut between entries, before index.json: no image list at all
    index_at = next(m.offset for m in members(good) if m.name == "index.json")
    cut.write_bytes(raw[:index_at])
    with pytest.raises(InvalidArgumentError, match="not an image archive"):
        fresh.import_archive(cut)
    assert fresh.list_images() == []

    # every entry but one blob: the index names what is missing
    with tarfile.open(good) as tin, tarfile.open(cut, "w") as tout:
        for m in tin.getmembers():
            if m.name != f"blobs/sha256/{target.hex}":
                tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
    third = Client(tmp_path / "third")  # fresh holds the blobs verified so far: they count
    with pytest.raises(FailedPreconditionError, match=rf"incomplete: 1 blob missing: {target}"):
        third.import_archive(cut)
    assert third.list_images() == []


def test_all_platforms_import_of_a_one_platform_archive_names_missing_manifests(registry, tmp_path: Path
                                                                               ) -> None:
    index = multi_arch()
    samples.push(registry.url, "multi", "v1", index)
    ref = f"{registry.host}/multi:v1"
    client = Client(tmp_path / "root")
    client.pull(ref, unpack=False)
    out = tmp_path / "one.tar"
    client.export(out, [ref])
    fresh = Client(tmp_path / "fresh")
    with pytest.raises(FailedPreconditionError) as exc:
        fresh.import_archive(out, all_platforms=True)
    assert str(index.images[1].digest) in str(exc.value) and str(index.images[2].digest) in str(exc.value)
    assert fresh.list_images() == []
    with pytest.raises(NotFoundError, match="no manifest for platform linux/s390x"):
        fresh.import_archive(out, platforms=["linux/s390x"])
    assert fresh.list_images() == []


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello, not a tar" * 100)
    client = Client(tmp_path / "root")
    with pytest.raises(InvalidArgumentError, match=f"archive {junk}: not a readable tar archive"):
        client.import_archive(junk)
    for path in (tmp_path / "nope.tar", tmp_path):  # missing, a directory: an error naming it, no traceback
        proc = cli(tmp_path / "root", "import", str(path), check=False)
        assert proc.returncode == 1 and proc.stderr.decode().startswith(f"cargohold: error: archive {path}: ")


# -- streams, gzip, interrupted exports ----------------------------------------------------------------


def test_stdout_export_gzip_and_stdin_import(registry, tmp_path: Path) -> None:
    img = two_layer(compression="zstd")
    samples.push(registry.url, "s", "v1", img)
    ref = f"{registry.host}/s:v1"
    root = tmp_path / "root"
    cli(root, "pull", "--no-unpack", ref)
    to_file = tmp_path / "file.tar"
    cli(root, "export", str(to_file), ref)
    streamed = cli(root, "export", "-", ref).stdout
    assert streamed == to_file.read_bytes()
    assert cli(root, "export", "-", ref, "--output", "json", check=False).returncode == 2

    packed = gzip.compress(streamed)
    out = json.loads(cli(tmp_path / "other", "import", "-", "--snapshotter", "native", "--output", "json",
                         stdin=packed).stdout)
    assert [(i["name"], i["digest"]) for i in out["images"]] == [(ref, str(img.digest))]
    assert out["format"] == "oci" and out["unpack"][0]["snapshotter"] == "native"
    gz = tmp_path / "file.tar.gz"
    gz.write_bytes(packed)
    text = cli(tmp_path / "third", "import", "--no-unpack", str(gz)).stdout.decode()
    assert f"{ref}: {img.digest}" in text
    third = Client(tmp_path / "third")
    assert third.check(ref).complete
    assert not [i for i in third.snapshotter("native").walk() if i.kind == Kind.COMMITTED]


def test_interrupted_export_leaves_no_file(registry, tmp_path: Path) -> None:
    img = two_layer()
    samples.push(registry.url, "i", "v1", img)
    ref = f"{registry.host}/i:v1"
    root = tmp_path / "root"
    outdir = tmp_path / "out"
    outdir.mkdir()
    client = Client(root)
    client.pull(ref, unpack=False)
    out = outdir / "x.tar"

    for exc_type in (RuntimeError, KeyboardInterrupt):
        def boom(event: object, exc_type: type[BaseException] = exc_type) -> None:
            if getattr(event, "action", "") == "export" and getattr(event, "current", 0):
                raise exc_type("interrupted mid-write")

        client.on_event = boom
        with pytest.raises(exc_type):
            client.export(out, [ref])
        assert os.listdir(outdir) == []

    # SIGKILL after the first blob bytes were written: nothing named is left behind
    script = (
        "import os, signal, sys\n"
        "from cargohold.client import Client\n"
        "def kill(e):\n"
        "    if e.action == 'export' and e.current: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"Client({str(root)!r}, on_event=kill).export({str(out)!r}, [{ref!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(outdir) == []

    # an existing OUT is replaced only by a whole archive
    out.write_bytes(b"old")
    client.on_event = boom
    with pytest.raises(KeyboardInterrupt):
        client.export(out, [ref])
    assert out.read_bytes() == b"old" and os.listdir(outdir) == ["x.tar"]


def test_truncated_gzip_archive_names_the_entry(registry, tmp_path: Path) -> None:
    img = samples.build_image([samples.small_base_layer(),
                               samples.files_layer(samples.random_files(5, 120, prefix="big"))])
    samples.push(registry.url, "g", "v1", img)
    ref = f"{registry.host}/g:v1"
    client = Client(tmp_path / "root")
    client.pull(ref, unpack=False)
    plain = tmp_path / "x.tar"
    client.export(plain, [ref])
    packed = gzip.compress(plain.read_bytes())
    cut = tmp_path / "x.tar.gz"
    cut.write_bytes(packed[:len(packed) // 2])
    fresh = Client(tmp_path / "fresh")
    with pytest.raises(InvalidArgumentError, match=r"archive entry blobs/sha256/[0-9a-f]{64} \(sha256:.*truncated"):
        fresh.import_archive(cut)
    assert fresh.list_images() == []
    assert os.listdir(tmp_path / "fresh" / "content" / "ingest") == []


def test_repeated_platforms_export_each_best_manifest(registry, tmp_path: Path) -> None:
    index = multi_arch()
    samples.push(registry.url, "multi", "v1", index)
    ref = f"{registry.host}/multi:v1"
    client = Client(tmp_path / "root")
    client.pull(ref, all_platforms=True, unpack=False)
    out = tmp_path / "two.tar"
    res = client.export(out, [ref], platforms=["linux/arm/v7", "linux/amd64"])
    assert [m.digest for m in res.images[0].manifests] == [index.images[2].digest, index.images[0].digest]
    names = {m.name for m in members(out)}
    assert f"blobs/sha256/{index.images[1].digest.hex}" not in names
    # manifest.json holds the first platform's manifest
    assert json.loads(read_member(out, "manifest.json"))[0]["Config"].endswith(index.images[2].config.digest.hex)
    fresh = Client(tmp_path / "fresh")
    fresh.import_archive(out, platforms=["linux/arm/v7", "linux/amd64"], snapshotter="native")
    assert fresh.check(ref, platforms=["linux/arm/v7"]).complete and fresh.check(ref).complete
    assert fresh.unpacked(ref, "native", "linux/arm/v7")
