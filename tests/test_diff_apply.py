"""diff: decompress and apply real layer tarballs onto real directories and overlay mounts."""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import struct
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from cargohold.diff import (
    ApplyResult,
    Compression,
    TreeEntry,
    apply_layer,
    compare_trees,
    compress_gzip,
    compress_zstd,
    decompress_stream,
    detect_compression,
    snapshot_tree,
)
from cargohold.diff.tarstream import TarReader
from cargohold.errors import DigestMismatchError, InvalidArgumentError, NotFoundError, UnsafePathError
from cargohold.oci.digest import Digest
from support_layers import (
    FIXED_MTIME,
    LayerEntry,
    capability,
    d,
    expected_tree,
    f,
    hardlink,
    make_layer,
    opaque,
    overlay_mount,
    sha256,
    supports_user_xattrs,
    symlink,
    whiteout,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mknod, chown to other users, overlay mounts)")


def apply(root: Path, blob: bytes, *, overlay: bool = False, tar: bytes | None = None,
          threads: int | None = None) -> ApplyResult:
    """Apply with both digests checked: the blob's and the tar's (``tar`` defaults to the blob itself)."""
    return apply_layer(root, io.BytesIO(blob), expected_digest=Digest.parse(sha256(blob)),
                       expected_diff_id=Digest.parse(sha256(blob if tar is None else tar)), overlay=overlay,
                       write_threads=threads)


# Small files go to writer threads when creates are slow; 4 forces them, 0 writes everything inline. Both
# must give the same trees.
THREADS = pytest.mark.parametrize("threads", [4, 0], ids=["threads", "inline"])


# -- the layers of the end-to-end cases -------------------------------------------------------------------


def base_layer(xattrs: bool) -> list[LayerEntry]:
    user_x = {"user.comment": b"hosts file"} if xattrs else {}
    return [
        d("etc"),
        f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", mtime=1_600_000_000),
        f("etc/hosts", b"127.0.0.1 localhost\n", xattrs=user_x),
        d("usr"),
        d("usr/bin"),
        f("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
        hardlink("usr/bin/tool2", "usr/bin/tool"),
        symlink("usr/bin/alias", "tool"),
        symlink("etc/abs", "/etc/passwd"),
        d("opq"),
        f("opq/a", b"lower a"),
        d("opq/sub"),
        f("opq/sub/b", b"lower b"),
        d("opq/keep"),
        f("opq/keep/old", b"lower file in a dir the upper layer rewrites"),
        d("gone-dir"),
        f("gone-dir/x", b"x"),
        f("delete-me", b"bye"),
        d("swap"),
        f("swap/inner", b"dir that becomes a file"),
        f("swap2", b"file that becomes a dir"),
        d("data", mode=0o750, uid=1000, gid=1000),
        f("data/f", b"user data", mode=0o600, uid=1000, gid=1000),
        d("var"),
        f("var/keep", b"unchanged"),
    ]


def top_layer(xattrs: bool) -> list[LayerEntry]:
    user_x = {"user.mark": b"v2"} if xattrs else {}
    return [
        whiteout("delete-me"),
        whiteout("gone-dir"),
        d("etc", mode=0o750, xattrs=user_x),
        f("etc/new", b"added"),
        whiteout("etc/hosts"),  # after a sibling: order must not matter
        d("opq"),
        f("opq/new", b"upper new"),
        d("opq/keep"),
        f("opq/keep/fresh", b"upper file"),
        opaque("opq"),  # after this layer's own entries in opq: they stay, the lower ones go
        f("swap", b"now a file"),
        d("swap2", mode=0o700),
        f("swap2/inside", b"in the new dir"),
        f("usr/bin/alias", b"symlink replaced by a file", mode=0o755),
        f("usr/bin/suid", b"\x7fELF pretend", mode=0o4755, uid=1000, gid=1000),
        hardlink("usr/bin/suid-link", "usr/bin/suid"),
        f("usr/bin/cap", b"\x7fELF capable", mode=0o755, xattrs={"security.capability": capability(10)}),
        d("shared", mode=0o2775, uid=0, gid=1000),
        f("shared/doc", b"group file", mode=0o664, gid=1000),
        LayerEntry(path="var/fifo", kind="fifo", mode=0o600),
        d("dev"),
        LayerEntry(path="dev/null", kind="char", mode=0o666, major=1, minor=3),
        LayerEntry(path="dev/loop-x", kind="block", mode=0o660, major=7, minor=200),
        symlink("var/link-dir", "../usr/bin"),
        f("var/long-" + "n" * 150, b"long name via PAX path"),
    ]


def assert_trees_equal(want: dict[str, TreeEntry], got: dict[str, TreeEntry]) -> None:
    diffs = compare_trees(want, got)
    assert not diffs, "trees differ:\n" + "\n".join(diffs)


@needs_root
@THREADS
def test_layers_applied_in_normal_mode_match_the_independent_model(tmp_path: Path, threads: int) -> None:
    xattrs = supports_user_xattrs(tmp_path)
    layers = [base_layer(xattrs), top_layer(xattrs)]
    root = tmp_path / "rootfs"
    root.mkdir()
    tars = [make_layer(entries) for entries in layers]
    results = [apply(root, compress_gzip(tars[0]), tar=tars[0], threads=threads),
               apply(root, compress_zstd(tars[1]), tar=tars[1], threads=threads)]
    assert [r.diff_id for r in results] == [Digest.parse(sha256(t)) for t in tars]

    got = snapshot_tree(root)
    assert_trees_equal(expected_tree(layers), got)

    # The things that matter most, spelled out.
    suid = os.lstat(root / "usr/bin/suid")
    assert stat.S_IMODE(suid.st_mode) == 0o4755 and (suid.st_uid, suid.st_gid) == (1000, 1000)
    assert os.path.samestat(suid, os.lstat(root / "usr/bin/suid-link"))
    assert os.getxattr(root / "usr/bin/cap", "security.capability") == capability(10)
    assert stat.S_IMODE(os.lstat(root / "shared").st_mode) == 0o2775
    assert stat.S_ISFIFO(os.lstat(root / "var/fifo").st_mode)
    null = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert os.readlink(root / "etc/abs") == "/etc/passwd"
    assert sorted(os.listdir(root / "opq")) == ["keep", "new"]
    assert os.listdir(root / "opq/keep") == ["fresh"]
    assert not (root / "gone-dir").exists() and not (root / "delete-me").exists()
    assert not list(root.rglob(".wh.*"))
    # File and symlink times come from the tar; so do the times of directories of the last layer.
    for path, entry in expected_tree(layers).items():
        if entry.kind != "dir" or path in {"etc", "opq", "opq/keep", "swap2", "shared", "dev"}:
            assert got[path].mtime_ns == entry.mtime_ns, path


@needs_root
def test_first_layer_matches_gnu_tar_extraction(tmp_path: Path) -> None:
    xattrs = supports_user_xattrs(tmp_path)
    tar = make_layer(base_layer(xattrs) + [
        f("bin/suid", b"s", mode=0o6755, uid=1000, gid=1000),
        f("bin/cap", b"c", xattrs={"security.capability": capability(12)}),
        LayerEntry(path="bin/fifo", kind="fifo", mode=0o640, uid=5, gid=6),
        LayerEntry(path="bin/tty", kind="char", mode=0o620, major=5, minor=0),
    ])
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    ours.mkdir()
    gnu.mkdir()
    apply(ours, tar)
    (tmp_path / "layer.tar").write_bytes(tar)
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--same-owner", "--numeric-owner", "-xpf",
                    os.fspath(tmp_path / "layer.tar"), "-C", os.fspath(gnu)], check=True)
    want, got = snapshot_tree(gnu), snapshot_tree(ours)
    assert_trees_equal(want, got)
    # Non-directory times agree; GNU tar leaves some directory times at "now" (its delayed absolute-symlink
    # placeholders touch them after it set them), ours come from the tar.
    assert {p: e.mtime_ns for p, e in got.items() if e.kind != "dir"} == {
        p: e.mtime_ns for p, e in want.items() if e.kind != "dir"}
    assert got["etc"].mtime_ns == got["opq/sub"].mtime_ns == FIXED_MTIME * 1_000_000_000


@needs_root
@THREADS
def test_overlay_mode_merged_view_equals_normal_mode(tmp_path: Path, threads: int | None) -> None:
    xattrs = supports_user_xattrs(tmp_path)
    layers = [base_layer(xattrs), top_layer(xattrs)]
    tars = [make_layer(entries) for entries in layers]
    normal = tmp_path / "normal"
    normal.mkdir()
    uppers = []
    for i, tar in enumerate(tars):
        apply(normal, tar, threads=threads)
        upper = tmp_path / f"upper{i}"
        upper.mkdir()
        apply(upper, compress_gzip(tar), tar=tar, overlay=True, threads=threads)
        uppers.append(upper)

    # In the upper dirs whiteouts are 0/0 char devices and the opaque dir carries the overlay xattr.
    wh = os.lstat(uppers[1] / "delete-me")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert stat.S_ISCHR(os.lstat(uppers[1] / "gone-dir").st_mode)
    assert os.getxattr(uppers[1] / "opq", "trusted.overlay.opaque") == b"y"
    assert not list(uppers[1].rglob(".wh.*"))

    with overlay_mount(list(reversed(uppers)), tmp_path / "merged") as merged:
        assert_trees_equal(snapshot_tree(normal), snapshot_tree(merged))
        assert_trees_equal(expected_tree(layers), snapshot_tree(merged))


@needs_root
def test_overlay_mode_creates_missing_parents_and_whiteouts_under_them(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    apply(upper, make_layer([whiteout("a/b/gone"), opaque("c/d"), f("e/f/g", b"deep")]), overlay=True)
    tree = snapshot_tree(upper)
    assert tree["a"].kind == tree["a/b"].kind == tree["c/d"].kind == tree["e/f"].kind == "dir"
    assert tree["a/b"].mode == 0o755
    assert tree["a/b/gone"].kind == "char" and tree["a/b/gone"].rdev == (0, 0)
    assert ("trusted.overlay.opaque", b"y") in tree["c/d"].xattrs
    assert tree["e/f/g"].sha256


def apply_both_ways(tmp_path: Path, layers: list[list[LayerEntry]],
                    threads: int | None = None) -> tuple[Path, list[Path]]:
    """Each layer applied in normal mode onto one dir, and in overlay mode into its own upper dir."""
    normal = tmp_path / "normal"
    normal.mkdir()
    uppers = []
    for i, entries in enumerate(layers):
        tar = make_layer(entries)
        apply(normal, tar, threads=threads)
        upper = tmp_path / f"upper{i}"
        upper.mkdir()
        apply(upper, tar, overlay=True, threads=threads)
        uppers.append(upper)
    return normal, uppers


RECREATED = {
    # A whiteout then the same name again in one layer: the new one must not merge with the parents' one.
    "dir-after-whiteout": [whiteout("a"), d("a"), f("a/x", b"new")],
    "implicit-dir-after-whiteout": [whiteout("a"), f("a/x", b"new")],
    "file-after-whiteout": [whiteout("a"), f("a", b"now a file")],
    "whiteout-after-own-file": [f("b", b"mine"), whiteout("b")],
    "opaque-before-entries": [opaque("a"), f("a/x", b"new"), d("a/deeper"), f("a/deeper/y", b"y")],
    "whiteout-in-missing-dir": [whiteout("nowhere/deep/thing"), opaque("alsonowhere")],
}


@needs_root
@THREADS
@pytest.mark.parametrize("case", sorted(RECREATED))
def test_same_layer_whiteouts_agree_between_modes(tmp_path: Path, case: str, threads: int | None) -> None:
    lower = [d("a"), f("a/old", b"old"), d("a/deeper"), f("a/deeper/z", b"z"), f("b", b"lower b")]
    layers = [lower, RECREATED[case]]
    normal, uppers = apply_both_ways(tmp_path, layers, threads)
    with overlay_mount(list(reversed(uppers)), tmp_path / "merged") as merged:
        view = snapshot_tree(merged)
    ours = snapshot_tree(normal)
    # Directories made implicitly get the time of the apply; all else must agree, including the model.
    assert_trees_equal(view, ours)
    if case != "whiteout-in-missing-dir":
        model = expected_tree(layers)
        implicit = {p for p in ours if p not in model and ours[p].kind == "dir"}
        assert_trees_equal(model, {p: e for p, e in ours.items() if p not in implicit})
    else:
        assert ours["nowhere/deep"].kind == ours["alsonowhere"].kind == "dir"
    if case.startswith(("dir-", "implicit-", "file-", "opaque-")):
        assert "a/old" not in ours and "a/deeper/z" not in ours  # the parents' a is hidden, not merged
    if case == "whiteout-after-own-file":
        assert (normal / "b").read_bytes() == b"mine"


# -- compression and digests ------------------------------------------------------------------------------


def small_tar(trailing: bytes = b"") -> bytes:
    return make_layer([d("x"), f("x/hello", b"hello world\n" * 100), f("big", os.urandom(3 << 20))],
                      trailing=trailing)


@pytest.mark.parametrize("kind", [Compression.NONE, Compression.GZIP, Compression.ZSTD])
def test_compression_is_detected_from_magic_bytes(tmp_path: Path, kind: Compression) -> None:
    tar = small_tar()
    blob = {Compression.NONE: tar, Compression.GZIP: compress_gzip(tar, 1),
            Compression.ZSTD: compress_zstd(tar, 1)}[kind]
    assert detect_compression(blob[:4]) is kind
    result = apply(tmp_path, blob, tar=tar)
    assert result.compression is kind
    assert (result.size_compressed, result.size_uncompressed) == (len(blob), len(tar))
    assert (tmp_path / "x/hello").read_bytes() == b"hello world\n" * 100
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        member = t.extractfile("big")
        assert member is not None
        assert (tmp_path / "big").read_bytes() == member.read()


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path: Path) -> None:
    tar = small_tar()
    cut = len(tar) // 3
    gz = compress_gzip(tar[:cut], 1) + compress_gzip(tar[cut:2 * cut], 9) + compress_gzip(tar[2 * cut:], 6)
    skippable = struct.pack("<II", 0x184D2A5A, 5) + b"skip!"  # a zstd skippable frame, even leading
    zs = skippable + compress_zstd(tar[:cut]) + skippable + compress_zstd(tar[cut:])
    for blob in (gz, zs):
        assert decompress_stream(io.BytesIO(blob)).read() == tar
    (tmp_path / "g").mkdir()
    (tmp_path / "z").mkdir()
    assert apply(tmp_path / "g", gz, tar=tar).diff_id == Digest.parse(sha256(tar))
    assert apply(tmp_path / "z", zs, tar=tar).diff_id == Digest.parse(sha256(tar))
    assert snapshot_tree(tmp_path / "g") == snapshot_tree(tmp_path / "z")


@pytest.mark.parametrize("tool", [["gzip", "-9", "-c"], ["zstd", "-q", "-19", "--long=27", "-c"],
                                  ["gzip", "-1", "-c", "-n"]])
def test_blobs_compressed_by_the_command_line_tools(tmp_path: Path, tool: list[str]) -> None:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} command not installed")
    tar = small_tar()
    (tmp_path / "layer.tar").write_bytes(tar)  # gzip stores this name in its header (FNAME)
    blob = subprocess.run([*tool, os.fspath(tmp_path / "layer.tar")], check=True, capture_output=True).stdout
    root = tmp_path / "root"
    root.mkdir()
    assert apply(root, blob, tar=tar).size_uncompressed == len(tar)
    assert (root / "x/hello").read_bytes() == b"hello world\n" * 100


def test_gzip_padding_is_ignored_and_garbage_or_truncation_refused(tmp_path: Path) -> None:
    tar = small_tar()
    gz = compress_gzip(tar)
    padded = gz + bytes(1000)
    assert apply(tmp_path, padded, tar=tar).size_compressed == len(padded)
    with pytest.raises(InvalidArgumentError, match="trailing garbage"):
        apply_layer(tmp_path, io.BytesIO(gz + b"junk!"))
    with pytest.raises(InvalidArgumentError, match="truncated"):
        apply_layer(tmp_path, io.BytesIO(gz[: len(gz) // 2]))
    with pytest.raises(InvalidArgumentError, match="zstd"):
        apply_layer(tmp_path, io.BytesIO(compress_zstd(tar)[:-50] + b"\xff" * 50))


def test_bytes_after_end_of_archive_count_in_the_diff_id(tmp_path: Path) -> None:
    trailing = bytes(4096) + b"bytes some writers leave after the end-of-archive marker"
    tar = small_tar(trailing)
    blob = compress_zstd(tar)
    result = apply(tmp_path, blob, tar=tar)
    assert result.diff_id == Digest.parse(sha256(tar))
    assert result.size_uncompressed == len(tar)
    # The digest of the tar without them is not the diffID.
    without = Digest.parse(sha256(tar[: -len(trailing)]))
    with pytest.raises(DigestMismatchError) as err:
        apply_layer(tmp_path, io.BytesIO(blob), expected_diff_id=without)
    assert str(without) in str(err.value) and sha256(tar) in str(err.value)


def test_diff_id_mismatch_names_both_digests(tmp_path: Path) -> None:
    tar = small_tar()
    blob = compress_gzip(tar)
    wrong = Digest.from_bytes(b"another layer")
    with pytest.raises(DigestMismatchError) as err:
        apply_layer(tmp_path, io.BytesIO(blob), expected_digest=Digest.parse(sha256(blob)),
                    expected_diff_id=wrong)
    message = str(err.value)
    assert str(wrong) in message and sha256(tar) in message and "diffID" in message
    assert err.value.expected == wrong and err.value.actual == Digest.parse(sha256(tar))


def test_compressed_digest_mismatch_names_both_digests(tmp_path: Path) -> None:
    tar = small_tar()
    blob = compress_zstd(tar)
    wrong = Digest.from_bytes(b"not this blob")
    with pytest.raises(DigestMismatchError) as err:
        apply_layer(tmp_path, io.BytesIO(blob), expected_digest=wrong, expected_diff_id=Digest.parse(sha256(tar)))
    assert str(wrong) in str(err.value) and sha256(blob) in str(err.value)
    assert "dirty" in str(err.value)


class FailingReader:
    """A blob stream that breaks after ``limit`` bytes, like a dropped connection."""

    def __init__(self, data: bytes, limit: int) -> None:
        self._src = io.BytesIO(data)
        self._left = limit

    def read(self, size: int = -1, /) -> bytes:
        if self._left <= 0:
            raise ConnectionResetError("blob stream broke")
        out = self._src.read(min(size, self._left) if size >= 0 else self._left)
        self._left -= len(out)
        return out


def layer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("layer-")]


def test_errors_stop_every_helper_thread(tmp_path: Path) -> None:
    files = [f(f"f{i}", os.urandom(2000)) for i in range(3000)]
    tar = make_layer([*files, f("../escape", b"")] + files)
    blob = compress_gzip(tar, 1)
    with pytest.raises(UnsafePathError, match="escape"):
        apply_layer(tmp_path, io.BytesIO(blob), write_threads=4)
    assert layer_threads() == []
    with pytest.raises(ConnectionResetError, match="broke"):
        apply_layer(tmp_path, FailingReader(blob, len(blob) // 4), write_threads=4)
    assert layer_threads() == []


def test_progress_reports_both_sizes(tmp_path: Path) -> None:
    tar = small_tar()
    blob = compress_gzip(tar)
    seen: list[tuple[int, int]] = []
    apply_layer(tmp_path, io.BytesIO(blob), on_progress=lambda c, u: seen.append((c, u)))
    assert seen and seen[-1] == (len(blob), len(tar))
    assert seen == sorted(seen)


def test_compress_helpers_round_trip_and_are_deterministic() -> None:
    data = b"layer bytes " * 10_000
    for level in (1, 9):
        assert compress_gzip(data, level) == compress_gzip(io.BytesIO(data), level)
        assert decompress_stream(io.BytesIO(compress_gzip(data, level))).read() == data
    assert zstandard.ZstdDecompressor().decompressobj().decompress(compress_zstd(data, 19)) == data
    assert decompress_stream(io.BytesIO(data)).read() == data
    with pytest.raises(InvalidArgumentError):
        compress_gzip(data, 12)


# -- tar features -------------------------------------------------------------------------------------------


def test_gnu_long_names_links_and_base256_numbers(tmp_path: Path) -> None:
    deep = "/".join(["directory-with-a-long-name"] * 8)
    entries = [d(p) for p in ("/".join(deep.split("/")[: i + 1]) for i in range(8))]
    entries += [f(f"{deep}/file", b"deep"), symlink("short", deep + "/file"), hardlink("hl", f"{deep}/file"),
                f("big-ids", b"", uid=3_000_000, gid=3_000_001)]  # too big for octal: base-256 fields
    apply(tmp_path, make_layer(entries, fmt=tarfile.GNU_FORMAT))
    assert (tmp_path / deep / "file").read_bytes() == b"deep"
    assert os.readlink(tmp_path / "short") == deep + "/file"
    assert os.path.samefile(tmp_path / "hl", tmp_path / deep / "file")
    if ROOT:
        st = os.lstat(tmp_path / "big-ids")
        assert (st.st_uid, st.st_gid) == (3_000_000, 3_000_001)


@needs_root
@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_archives_written_by_gnu_tar_round_trip(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    (src / "dir/sub").mkdir(parents=True)
    (src / "dir/file").write_bytes(b"content\n" * 1000)
    (src / "dir/sub/exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "dir/sub/exec", 0o4755)
    os.chown(src / "dir/sub/exec", 1000, 1000)
    os.link(src / "dir/file", src / "dir/hardlink")
    os.symlink("../dir/file", src / "dir/sub/link")
    os.mkfifo(src / "fifo", 0o600)
    (src / "empty").write_bytes(b"")
    if fmt != "ustar":  # ustar cannot hold names this long
        (src / ("long-" + "x" * 120)).write_bytes(b"long")
    if fmt == "posix" and supports_user_xattrs(tmp_path):
        os.setxattr(src / "dir/file", "user.origin", b"gnu tar")
    for p in [src, *src.rglob("*")]:
        os.utime(p, (1_650_000_000, 1_650_000_000), follow_symlinks=False)
    archive = tmp_path / "layer.tar"
    subprocess.run(["tar", f"--format={fmt}", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-cf",
                    os.fspath(archive), "-C", os.fspath(src), "."], check=True)
    dst = tmp_path / "dst"
    dst.mkdir()
    blob = archive.read_bytes()
    apply(dst, compress_gzip(blob), tar=blob)
    assert_trees_equal(snapshot_tree(src), snapshot_tree(dst))
    assert {p: e.mtime_ns for p, e in snapshot_tree(dst).items()} == {
        p: e.mtime_ns for p, e in snapshot_tree(src).items()}


def test_writes_through_symlinked_parents_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    layer = make_layer([
        d("usr"), d("usr/lib"),
        symlink("lib", "usr/lib"),
        f("lib/libx.so", b"relative parent"),
        symlink("var-run", "/run"),  # absolute: means <root>/run, created on demand
        f("var-run/pid", b"absolute parent"),
        symlink("chain", "lib"),
        f("chain/liby.so", b"through two links"),
    ])
    apply(root, layer)
    assert (root / "usr/lib/libx.so").read_bytes() == b"relative parent"
    assert (root / "usr/lib/liby.so").read_bytes() == b"through two links"
    assert (root / "run/pid").read_bytes() == b"absolute parent"
    assert not Path("/run/pid").exists() or Path("/run/pid").read_bytes() != b"absolute parent"


@THREADS
def test_entries_of_one_layer_apply_in_order(tmp_path: Path, threads: int | None) -> None:
    apply(tmp_path, make_layer([d("lowerdir"), f("lowerdir/x", b"x"), d("cached"), f("cached/x", b"x"),
                                d("lower2"), f("lower2/x", b"x")]))
    apply(tmp_path, make_layer([
        f("twice", b"first"), f("twice", b"second"),
        d("q"), f("q/x", b"x"), f("q", b"q is a file now"),
        f("r", b"r was a file"), d("r"), f("r/x", b"r/x"),
        f("hl-src", b"linked at once"), hardlink("hl", "hl-src"),
        f("lowerdir", b"replaces the parents' dir"),
    ]), threads=threads)
    assert (tmp_path / "twice").read_bytes() == b"second"
    assert (tmp_path / "q").read_bytes() == b"q is a file now"
    assert (tmp_path / "r/x").read_bytes() == b"r/x"
    assert os.path.samefile(tmp_path / "hl", tmp_path / "hl-src")
    assert (tmp_path / "lowerdir").read_bytes() == b"replaces the parents' dir"
    # A path turned into a file, then used as a directory, fails like a sequential extraction would.
    for layer in ([f("cached/y", b""), f("cached", b"file"), f("cached/z", b"")],
                  [f("lower2", b"file"), f("lower2/z", b"")],
                  [f("twice/under", b"")]):
        with pytest.raises(InvalidArgumentError, match="not a directory"):
            apply(tmp_path, make_layer(layer), threads=threads)
    assert (tmp_path / "cached").read_bytes() == (tmp_path / "lower2").read_bytes() == b"file"


@THREADS
def test_many_small_files(tmp_path: Path, threads: int | None) -> None:
    files = {f"d{i % 7}/f{i}": os.urandom(i % 300) for i in range(600)}
    entries = [d(f"d{i}") for i in range(7)] + [f(p, data, mode=0o600 + (i % 2) * 0o4000, uid=i % 3)
                                                for i, (p, data) in enumerate(files.items())]
    apply(tmp_path, make_layer(entries), threads=threads)
    assert_trees_equal(expected_tree([entries]), snapshot_tree(tmp_path))


class Dribble:
    """Hands out a byte string in pseudo-random small pieces, so every buffer boundary case happens."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._src = io.BytesIO(data)
        self._rng = random.Random(seed)

    def read(self, size: int = -1, /) -> bytes:
        return self._src.read(min(size if size >= 0 else 1 << 30, self._rng.choice([1, 7, 511, 512, 513, 4000])))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_reader_agrees_with_tarfile_at_any_chunking(fmt: int) -> None:
    rng = random.Random(fmt)
    entries = [f(f"dir-{i}/" + "n" * rng.choice([1, 99, 100, 101, 160]) + f"-{i}",
                 rng.randbytes(rng.choice([0, 1, 511, 512, 513, 1500, 70_000])),
                 xattrs={"user.k": rng.randbytes(10)} if i % 5 == 0 and fmt == tarfile.PAX_FORMAT else {})
               for i in range(60)]
    entries.append(symlink("link-" + "l" * 120, "t" * 150))
    tar = make_layer(entries, fmt=fmt)
    want = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as reference:
        for member in reference:
            fobj = reference.extractfile(member) if member.isreg() else None
            want.append((member.name, member.linkname, fobj.read() if fobj else b""))
    for seed in range(3):
        reader = TarReader(Dribble(tar, seed))
        got = []
        for i, entry in enumerate(reader.entries()):
            if entry.size and i % 2:
                data = b"".join(bytes(c) for c in reader.chunks())
            else:
                data = bytes(reader.read_small()) if entry.size else b""
            got.append((entry.name, entry.linkname, data))
        assert got == want


def test_existing_dir_keeps_contents_and_types_are_replaced(tmp_path: Path) -> None:
    apply(tmp_path, make_layer([d("a"), f("a/old", b"1"), f("b", b"file"), d("c"), f("c/x", b"x")]))
    apply(tmp_path, make_layer([d("a", mode=0o700), d("b"), f("b/inner", b"2"), symlink("c", "a")]))
    assert sorted(os.listdir(tmp_path / "a")) == ["old"]
    assert stat.S_IMODE(os.lstat(tmp_path / "a").st_mode) == 0o700
    assert (tmp_path / "b/inner").read_bytes() == b"2"
    assert os.readlink(tmp_path / "c") == "a"


def test_root_entry_sets_root_metadata(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir(mode=0o700)
    apply(root, make_layer([d("./", mode=0o755), f("./etc/x", b"x")]))
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o755
    assert (root / "etc/x").read_bytes() == b"x"


def test_whiteout_of_this_layers_own_file_is_ignored(tmp_path: Path) -> None:
    apply(tmp_path, make_layer([f("lower", b"l")]))
    apply(tmp_path, make_layer([f("mine", b"m"), whiteout("mine"), whiteout("lower")]))
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_trusted_xattrs_from_a_layer_are_ignored(tmp_path: Path) -> None:
    apply(tmp_path, make_layer([d("dir", xattrs={"trusted.overlay.opaque": b"y"})]), overlay=True)
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "dir")


def test_hardlink_to_missing_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nowhere"):
        apply(tmp_path, make_layer([hardlink("hl", "nowhere")]))


# -- breakouts ----------------------------------------------------------------------------------------------


@pytest.fixture
def arena(tmp_path: Path) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"keep me")
    root = tmp_path / "root"
    root.mkdir()
    (root / "sub").mkdir()
    return {"top": tmp_path, "outside": outside, "root": root}


def host_state(arena: dict[str, Path]) -> tuple[object, ...]:
    top = arena["top"]
    return (snapshot_tree(arena["outside"]), sorted(os.listdir(top)), sorted(os.listdir(top.parent)),
            os.path.exists("/etc/cargohold-pwned"))


Breakout = tuple[Callable[[Path], list[LayerEntry]], str]  # (entries given the outside dir, name in error)
BREAKOUTS: dict[str, Breakout] = {
    "dotdot": (lambda o: [f("../outside/pwned", b"x")], "../outside/pwned"),
    "dotdot-deep": (lambda o: [f("sub/../../pwned", b"x")], "sub/../../pwned"),
    "absolute": (lambda o: [f(f"{o}/pwned", b"x")], "/pwned"),
    "hardlink-dotdot": (lambda o: [hardlink("hl", "../outside/sentinel")], "'hl'"),
    "hardlink-absolute": (lambda o: [hardlink("hl", f"{o}/sentinel")], "'hl'"),
    "whiteout-dotdot": (lambda o: [f("sub/.wh..."), f("x")], "sub/.wh..."),
    "whiteout-dotdot-top": (lambda o: [f(".wh...")], ".wh..."),
    "whiteout-dot": (lambda o: [f("sub/.wh..")], "sub/.wh.."),
}


@pytest.mark.parametrize("case", sorted(BREAKOUTS))
@pytest.mark.parametrize("overlay", [False, True], ids=["normal", "overlay"])
def test_breakouts_are_refused_and_the_host_untouched(arena: dict[str, Path], case: str, overlay: bool) -> None:
    build, named = BREAKOUTS[case]
    before = host_state(arena)
    layer = make_layer(build(arena["outside"]))
    with pytest.raises(UnsafePathError) as err:
        apply(arena["root"], compress_gzip(layer), tar=layer, overlay=overlay)
    assert named in str(err.value)
    assert host_state(arena) == before
    assert (arena["outside"] / "sentinel").read_bytes() == b"keep me"


# Symlinks whose targets climb past the root (``usr/lib64/x -> ../../../../usr/lib/x`` in real images): a path
# resolved through one is clamped at the root as in a chroot. Each case: entries, then what the root must hold
# (relative path -> bytes, or None: absent; never through a symlink, which the host would follow).
# ``root/outside/sentinel`` exists before (a parent layer's file).
Clamp = tuple[list[LayerEntry], dict[str, bytes | None]]
CLAMPS: dict[str, Clamp] = {
    "symlink-parent-relative": ([symlink("sub/esc", "../../outside"), f("sub/esc/pwned", b"x")],
                                {"outside/pwned": b"x"}),
    "symlink-parent-chain": ([symlink("up", "sub/../.."), f("up/outside/pwned", b"x")],
                             {"outside/pwned": b"x"}),
    "symlink-parent-absolute-dotdot": ([symlink("abs", "/../../.."), f("abs/etc/pwned", b"x")],
                                       {"etc/pwned": b"x"}),
    "lib64-style": ([d("usr"), d("usr/lib"), d("usr/lib/x"), d("usr/lib64"),
                     symlink("usr/lib64/x", "../../../../usr/lib/x"), f("usr/lib64/x/file", b"through")],
                    {"usr/lib/x/file": b"through"}),
    "hardlink-via-symlink": ([symlink("esc", "../outside"), hardlink("hl", "esc/sentinel")],
                             {"hl": b"inner", "outside/sentinel": b"inner"}),
    "whiteout-via-symlink": ([symlink("esc", "../outside"), whiteout("esc/sentinel")],
                             {"outside/sentinel": None}),
    "opaque-via-symlink": ([symlink("esc", "../outside"), opaque("esc")], {"outside/sentinel": None}),
}


@pytest.mark.parametrize("case", sorted(CLAMPS))
@pytest.mark.parametrize("overlay", [False, True], ids=["normal", "overlay"])
def test_symlinks_climbing_past_the_root_are_clamped_inside_it(arena: dict[str, Path], case: str,
                                                               overlay: bool) -> None:
    entries, expect = CLAMPS[case]
    root = arena["root"]
    (root / "outside").mkdir()
    (root / "outside/sentinel").write_bytes(b"inner")
    before = host_state(arena)
    layer = make_layer(entries)
    apply(root, compress_gzip(layer), tar=layer, overlay=overlay)
    assert host_state(arena) == before
    assert (arena["outside"] / "sentinel").read_bytes() == b"keep me"
    for e in entries:  # the symlinks themselves are written verbatim
        if e.kind == "symlink":
            assert os.readlink(root / e.path) == e.link
    for rel, data in expect.items():
        if data is not None:
            assert (root / rel).read_bytes() == data
        elif overlay and case.startswith("whiteout"):  # a whiteout device hides the parents' file instead
            assert (root / rel).lstat().st_rdev == 0 and stat.S_ISCHR((root / rel).lstat().st_mode)
        elif overlay:  # an opaque directory hides it
            assert os.getxattr(root / rel.rpartition("/")[0], "trusted.overlay.opaque") == b"y"
        else:
            assert not (root / rel).exists()


def test_absolute_symlink_parents_are_rooted_like_a_chroot(arena: dict[str, Path]) -> None:
    """An absolute link target never reaches the host: /etc means <root>/etc, <outside> means <root><outside>."""
    outside = arena["outside"]
    before = host_state(arena)
    layer = make_layer([symlink("etc-link", "/etc"), f("etc-link/cargohold-pwned", b"x"),
                        symlink("out", os.fspath(outside)), f("out/pwned", b"y"),
                        symlink("victim", os.fspath(outside / "sentinel")), f("victim", b"replaces the link")])
    apply(arena["root"], layer)
    assert host_state(arena) == before
    root = arena["root"]
    assert (root / "etc/cargohold-pwned").read_bytes() == b"x"
    assert (root / os.fspath(outside).lstrip("/") / "pwned").read_bytes() == b"y"
    assert (root / "victim").read_bytes() == b"replaces the link" and not (root / "victim").is_symlink()
    assert (outside / "sentinel").read_bytes() == b"keep me"


def test_symlink_loop_on_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match="too many levels"):
        apply(tmp_path, make_layer([symlink("a", "b"), symlink("b", "a"), f("a/x", b"")]))


@pytest.mark.parametrize("name", ["a/../../x", "/x"])
def test_hostile_names_fail_before_any_write(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError, match="escapes|absolute"):
        apply(tmp_path, make_layer([f(name, b"")]))
    assert os.listdir(tmp_path) == []


def test_corrupt_tar_header_is_refused(tmp_path: Path) -> None:
    tar = bytearray(make_layer([f("a", b"data")]))
    tar[10] ^= 0xFF  # inside the first header's name: checksum no longer matches
    with pytest.raises(InvalidArgumentError, match="checksum"):
        apply_layer(tmp_path, io.BytesIO(bytes(tar)))


def test_apply_target_must_exist(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="missing"):
        apply_layer(tmp_path / "missing", io.BytesIO(make_layer([])))


def test_empty_layer(tmp_path: Path) -> None:
    tar = make_layer([])
    result = apply(tmp_path, compress_gzip(tar), tar=tar)
    assert result.entries == 0 and os.listdir(tmp_path) == []
