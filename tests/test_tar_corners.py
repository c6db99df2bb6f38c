"""diff: the tar corners real layers contain — sparse files, long names, non-UTF-8 PAX, base-256 numbers,
hardlinks to symlinks, repeated entries, late directories, symlinks climbing past the root, multi-member gzip —
applied to real directories (and overlay mounts), checked by file trees, bytes, digests and error text."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cargohold.client import Client
from cargohold.devtools import corners as c
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from cargohold.devtools.samples import FIXED_MTIME
from cargohold.diff import ApplyResult, apply_layer, decompress_stream
from cargohold.diff.sparse import MAX_SPECIAL_SIZE
from cargohold.errors import InvalidArgumentError, NeedsParentsError
from cargohold.oci.digest import Digest
from support_layers import overlay_mount, supports_user_xattrs

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown, overlay mounts)")
SPARSE, NAMES, ORDER = range(3)
# (overlay, isolated, write_threads): normal mode inline and threaded, overlay mode, parallel-unpack mode.
MODES = {"normal": (False, False, 0), "normal-threads": (False, False, 4), "overlay": (True, False, 4),
         "isolated": (True, True, 4)}


def sha(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def apply(root: Path, tar: bytes, *, blob: bytes | None = None, mode: str = "normal") -> ApplyResult:
    overlay, isolated, threads = MODES[mode]
    blob = tar if blob is None else blob
    return apply_layer(root, io.BytesIO(blob), expected_digest=sha(blob), expected_diff_id=sha(tar),
                       overlay=overlay, isolated=isolated, write_threads=threads)


def expected(*tops: str) -> dict[str, c.Node]:
    return {p: n for p, n in c.corner_tree().items() if p.split("/")[0] in tops}


# -- the whole corner image ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["normal", "normal-threads"])
def test_corner_layers_unpack_to_the_expected_tree(tmp_path: Path, mode: str) -> None:
    for tar, blob in zip(c.corner_layers(), c.corner_blobs(), strict=True):
        apply(tmp_path, tar, blob=blob, mode=mode)
    assert c.tree_listing(tmp_path) == c.corner_tree()


@needs_root
def test_corner_layers_in_overlay_mode_merge_to_the_same_tree(tmp_path: Path) -> None:
    uppers = []
    for i, (tar, blob) in enumerate(zip(c.corner_layers(), c.corner_blobs(), strict=True)):
        upper = tmp_path / f"upper{i}"
        upper.mkdir()
        apply(upper, tar, blob=blob, mode="overlay")
        uppers.append(upper)
    with overlay_mount(uppers[::-1], tmp_path / "merged") as merged:
        assert c.tree_listing(merged) == c.corner_tree()


def test_corner_blobs_are_deterministic_and_multi_member_gzip_digests_are_right(tmp_path: Path) -> None:
    assert c.corner_layers() == c.corner_layers() and c.corner_blobs() == c.corner_blobs()
    for i, (tar, blob) in enumerate(zip(c.corner_layers(), c.corner_blobs(), strict=True)):
        assert decompress_stream(io.BytesIO(blob)).read() == tar
        (tmp_path / str(i)).mkdir()
        result = apply(tmp_path / str(i), tar, blob=blob)
        assert (result.digest, result.diff_id) == (sha(blob), sha(tar))
        assert (result.size_compressed, result.size_uncompressed) == (len(blob), len(tar))
    assert c.corner_blobs()[0].count(b"\x1f\x8b\x08") >= 5  # several members, one empty at the end


@needs_root
def test_corner_image_through_registry_pull_mount_rootfs_export_and_multi_member_import(
        registry: RegistryProcess, tmp_path: Path) -> None:
    image = c.corner_image()
    samples.push(registry.url, "corners", "v1", image)
    ref = f"{registry.host}/corners:v1"
    client = Client(tmp_path / "state")
    for snapshotter in ("native", "overlayfs"):
        client.pull(ref, snapshotter=snapshotter)
        mnt = tmp_path / f"mnt-{snapshotter}"
        mnt.mkdir()
        client.mount(ref, mnt, snapshotter=snapshotter)
        try:
            assert c.tree_listing(mnt) == c.corner_tree()
        finally:
            client.unmount(mnt)
    assert c.tree_listing(client.rootfs(ref, tmp_path / "rootfs")) == c.corner_tree()
    archive = io.BytesIO()
    client.export(archive, [ref])
    packed = c.gzip_multimember(archive.getvalue(), parts=7)  # as `cargohold export - | pigz` gives
    other = Client(tmp_path / "other")
    imported = other.import_archive(io.BytesIO(packed), snapshotter="native")
    assert [(i.name, i.target.digest) for i in imported.images] == [(ref, image.digest)]
    assert c.tree_listing(other.rootfs(ref, tmp_path / "rootfs2")) == c.corner_tree()


def test_multi_member_gzip_with_empty_and_tiny_members(tmp_path: Path) -> None:
    tar = c.corner_layers()[ORDER]
    blob = c.gzip_multimember(tar, parts=len(tar) // 700)  # members far smaller than a read
    assert apply(tmp_path, tar, blob=blob).diff_id == sha(tar)
    assert c.tree_listing(tmp_path) == expected("links", "rep", "late", "usr")
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-dc"], input=blob, capture_output=True, check=True).stdout == tar


# -- sparse --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", c.SPARSE_VERSIONS)
def test_sparse_entries_expand_with_their_holes(tmp_path: Path, version: str) -> None:
    raw, content = c.sparse_entry(version, b"dir/file", 7)
    tar = c.tar(raw, c.member(b"after", b"next entry\n"))
    apply(tmp_path, tar)
    path = tmp_path / "dir/file"
    assert path.read_bytes() == content and len(content) == c.SPARSE_REALSIZE
    assert path.stat().st_blocks * 512 < c.SPARSE_REALSIZE  # holes stay holes
    assert (tmp_path / "after").read_bytes() == b"next entry\n"  # the reader is back in step
    assert sorted(os.listdir(tmp_path)) == ["after", "dir"]


@pytest.mark.parametrize("version", c.SPARSE_VERSIONS)
def test_sparse_maps_spanning_several_blocks(tmp_path: Path, version: str) -> None:
    """50 fragments: three old GNU extension blocks, a 1.0 map longer than one block, a long 0.x record."""
    fragments = [(i * 4096 + 1_000_000, 512 + i) for i in range(50)]
    chunks = [bytes([i + 1]) * n for i, (_, n) in enumerate(fragments)]
    realsize = 1_000_000 + 50 * 4096 + 7
    build = c.gnu_sparse if version == "gnu" else (lambda *a: c.pax_sparse(version, *a))
    raw = build(b"many", realsize, fragments, b"".join(chunks))
    apply(tmp_path, c.tar(raw, c.member(b"after", b"in step\n")))
    assert (tmp_path / "many").read_bytes() == c.sparse_content(realsize, fragments, chunks)
    assert (tmp_path / "after").read_bytes() == b"in step\n"


def _gnu_tar_sparse_source(path: Path) -> None:
    with open(path, "wb") as fh:
        fh.truncate(5 << 20)
        for offset, data in ((0, b"head"), (1 << 20, b"middle" * 3000), ((5 << 20) - 3, b"end")):
            fh.seek(offset)
            fh.write(data)


@pytest.mark.parametrize("fmt", ["gnu", "posix-0.0", "posix-0.1", "posix-1.0"])
def test_sparse_archives_written_by_gnu_tar(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _gnu_tar_sparse_source(src / "sparse.bin")
    _gnu_tar_sparse_source(src / "tail-hole.bin")
    with open(src / "tail-hole.bin", "r+b") as fh:
        fh.truncate(6 << 20)  # ends in a hole
    args = ["--sparse", "--format=gnu"] if fmt == "gnu" else [
        "--format=posix", f"--sparse-version={fmt.split('-')[1]}"]
    tar = subprocess.run(["tar", "-c", *args, "-C", os.fspath(src), "sparse.bin", "tail-hole.bin"],
                         check=True, capture_output=True).stdout
    assert b"GNU.sparse" in tar or fmt == "gnu"
    root = tmp_path / "root"
    root.mkdir()
    apply(root, tar)
    for name in ("sparse.bin", "tail-hole.bin"):
        assert (root / name).read_bytes() == (src / name).read_bytes()
    assert sorted(os.listdir(root)) == ["sparse.bin", "tail-hole.bin"]  # no GNUSparseFile.* directory


BAD_MAPS = {
    "overlap": ([(0, 600), (512, 512)], 4096, "overlaps"),
    "descending": ([(2048, 512), (0, 512)], 4096, "overlaps or precedes"),
    "past-the-end": ([(0, 512), (4000, 512)], 4096, "ends past the real size 4096"),
    "data-mismatch": ([(0, 512), (1024, 100)], 4096, None),
}


@pytest.mark.parametrize("version", c.SPARSE_VERSIONS)
@pytest.mark.parametrize("case", sorted(BAD_MAPS))
def test_bad_sparse_maps_are_refused_naming_the_entry(tmp_path: Path, version: str, case: str) -> None:
    fragments, realsize, why = BAD_MAPS[case]
    data = bytes(512 + 512)  # what the map says, but for data-mismatch (612)
    if version == "gnu":
        raw = c.gnu_sparse(b"bad/sparse", realsize, fragments, data)
    else:
        raw = c.pax_sparse(version, b"bad/sparse", realsize, fragments, data)
    with pytest.raises(InvalidArgumentError) as err:
        apply(tmp_path, c.tar(raw))
    assert "'bad/sparse'" in str(err.value) and "sparse map" in str(err.value)
    assert (why or "covers 612 data bytes but the entry stores 1024") in str(err.value)
    assert not (tmp_path / "bad/sparse").exists()


def test_sparse_maps_are_bounded(tmp_path: Path) -> None:
    # 1.0: a map in the data that never ends within 1 MiB.
    endless = b"2\n" + b"1" * (MAX_SPECIAL_SIZE + 1024)
    records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", b"big-map"),
               (b"GNU.sparse.realsize", b"10")]
    layer = c.tar(c.pax(records), c.member(b"GNUSparseFile.0/big-map", endless))
    with pytest.raises(InvalidArgumentError, match=r"'big-map': sparse map exceeds the 1048576 byte limit"):
        apply(tmp_path, layer)
    # Old GNU: extension blocks that keep saying "more follows".
    head = c.header(b"ext", typeflag=b"S", gnu=True, extra={482: b"\x01", 483: c._octal(10, 12)})
    ext = bytes(504) + b"\x01" + bytes(7)
    with pytest.raises(InvalidArgumentError, match=r"'ext': sparse map extension blocks exceed the 1048576"):
        apply(tmp_path, head + ext * (MAX_SPECIAL_SIZE // 512 + 2) + c.end_of_archive())
    assert os.listdir(tmp_path) == []


# -- bounded headers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "what"), [(b"L", "GNU long name"), (b"K", "GNU long link name"),
                                            (b"x", "PAX header")])
def test_long_names_and_pax_headers_are_capped_at_1_mib(tmp_path: Path, kind: bytes, what: str) -> None:
    over = c.member(b"././@LongLink" if kind != b"x" else b"PaxHeaders/huge", b"n" * (MAX_SPECIAL_SIZE + 1),
                    typeflag=kind, gnu=kind != b"x")
    with pytest.raises(InvalidArgumentError) as err:
        apply(tmp_path, c.tar(over, c.member(b"victim", b"x")))
    name = "'././@LongLink'" if kind != b"x" else "'PaxHeaders/huge'"
    assert str(err.value) == (f"tar entry {name}: {what} of 1048577 bytes exceeds the 1048576 byte (1 MiB) "
                              "limit")
    assert os.listdir(tmp_path) == []


def test_a_pax_header_of_exactly_1_mib_is_read(tmp_path: Path) -> None:
    path = c.pax_record(b"path", b"named-by-pax")
    fill = MAX_SPECIAL_SIZE - len(path) - len(c.pax_record(b"comment", b""))
    while len(c.pax_record(b"comment", b"c" * fill)) + len(path) > MAX_SPECIAL_SIZE:
        fill -= 1
    records = c.pax_record(b"comment", b"c" * fill) + path
    assert len(records) == MAX_SPECIAL_SIZE
    apply(tmp_path, c.tar(c.member(b"PaxHeaders/big", records, typeflag=b"x"), c.member(b"short", b"data")))
    assert (tmp_path / "named-by-pax").read_bytes() == b"data"


# -- names and numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["normal", "overlay"])
def test_long_names_non_utf8_pax_names_and_base256_numbers(tmp_path: Path, mode: str) -> None:
    apply(tmp_path, c.corner_layers()[NAMES], mode=mode)
    assert c.tree_listing(tmp_path) == expected("names", "x")
    names = os.listdir(os.fsencode(tmp_path / "names"))
    assert b"caf\xe9-latin1" in names  # the exact bytes of the PAX path record
    assert os.readlink(os.fsencode(tmp_path / "names/non-utf8-link")) == c.NON_UTF8_TARGET
    st = os.stat(tmp_path / "names/base256")
    assert (st.st_size, st.st_mtime_ns) == (17, c.BIG_MTIME * 1_000_000_000)
    if ROOT:
        assert (st.st_uid, st.st_gid) == (c.BIG_ID, c.BIG_ID)
    if supports_user_xattrs(tmp_path):
        assert os.getxattr(tmp_path / os.fsdecode(c.NON_UTF8_NAME), "user.corner") == c.XATTR_VALUE


# -- links, repeats, late directories ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_hardlink_to_a_symlink_links_the_symlink(tmp_path: Path, mode: str) -> None:
    sym = c._sym(b"links/sym", b"/nowhere")
    apply(tmp_path, c.tar(c._dir(b"links"), sym, c.member(b"links/hl", typeflag=b"1", linkname=b"links/sym")),
          mode=mode)
    a, b = os.lstat(tmp_path / "links/sym"), os.lstat(tmp_path / "links/hl")
    assert stat.S_ISLNK(b.st_mode) and os.path.samestat(a, b) and a.st_nlink == 2
    assert os.readlink(tmp_path / "links/hl") == "/nowhere"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_entries_repeated_in_one_layer_last_wins(tmp_path: Path, mode: str) -> None:
    layer = c.tar(*[c._dir(b"links"), c._dir(b"rep")] + [c.member(b"rep/file-file", b"first\n")] * 60 + [
        c.member(b"rep/file-file", b"second, longer\n", mode=0o600),
        c.member(b"rep/file-dir", b"a file first\n"), c._dir(b"rep/file-dir", mode=0o750),
        c._dir(b"rep/dir-file"), c.member(b"rep/dir-file/child", b"goes with its dir\n"),
        c.member(b"rep/dir-file", b"then a file\n"),
        c.member(b"rep/file-symlink", b"a file first\n"), c._sym(b"rep/file-symlink", b"file-file"),
        c._sym(b"rep/symlink-dir", b"../links"), c._dir(b"rep/symlink-dir", mode=0o700),
    ])
    apply(tmp_path, layer, mode=mode)
    want = expected("rep")
    want["links"] = ("dir", 0o755, 0, "")
    assert c.tree_listing(tmp_path) == want


@pytest.mark.parametrize("mode", ["normal", "normal-threads", "overlay"])
def test_a_directory_entry_after_its_children_keeps_them_and_applies_its_metadata(tmp_path: Path,
                                                                                  mode: str) -> None:
    layer = c.tar(c.member(b"late/a", b"a\n"), c.member(b"late/sub/b", b"b\n"),
                  c._dir(b"late", mode=0o711, mtime=FIXED_MTIME - 5))
    apply(tmp_path, layer, mode=mode)
    assert c.tree_listing(tmp_path) == expected("late")
    assert os.stat(tmp_path / "late").st_mtime_ns == (FIXED_MTIME - 5) * 1_000_000_000


def test_a_directory_after_its_children_needs_the_parents_when_isolated(tmp_path: Path) -> None:
    layer = c.tar(c.member(b"late/a", b"a\n"), c._dir(b"late", mode=0o711))
    with pytest.raises(NeedsParentsError, match="'late/a'"):
        apply(tmp_path, layer, mode="isolated")


# -- symlinks climbing past the root -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_paths_through_a_symlink_climbing_past_the_root_are_clamped(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "a/b/root"  # deep enough that ../../../.. without clamping would leave tmp_path
    root.mkdir(parents=True)
    (tmp_path / "a/usr/lib/x").mkdir(parents=True)  # where an unclamped walk from root/usr/lib64 would land
    outside = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    layer = c.tar(c._dir(b"usr"), c._dir(b"usr/lib"), c._dir(b"usr/lib/x"), c._dir(b"usr/lib64"),
                  c._sym(b"usr/lib64/x", b"../../../../usr/lib/x"),
                  c.member(b"usr/lib64/x/file", b"through the climbing symlink\n"),
                  c.member(b"usr/hardlink", typeflag=b"1", linkname=b"usr/lib64/x/file"),
                  c.member(b"usr/lib64/x/../x/second", b"cleaned, then through it\n"))
    apply(root, layer, mode=mode)
    assert os.readlink(root / "usr/lib64/x") == "../../../../usr/lib/x"  # written verbatim
    assert (root / "usr/lib/x/file").read_bytes() == b"through the climbing symlink\n"
    assert (root / "usr/lib/x/second").read_bytes() == b"cleaned, then through it\n"
    assert os.path.samestat(os.lstat(root / "usr/hardlink"), os.lstat(root / "usr/lib/x/file"))
    assert sorted(os.listdir(root / "usr/lib/x")) == ["file", "second"]
    now = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if root not in p.parents)
    assert now == outside  # nothing appeared above the root
    assert os.listdir(tmp_path / "a/usr/lib/x") == []


def test_sparse_records_on_a_directory_are_refused_and_unknown_versions_read_plainly(tmp_path: Path) -> None:
    records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.realsize", b"10")]
    with pytest.raises(InvalidArgumentError, match=r"'sdir/': sparse map on a non-regular entry"):
        apply(tmp_path, c.tar(c.pax(records), c._dir(b"sdir")))
    future = [(b"GNU.sparse.major", b"2"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.realsize", b"10")]
    apply(tmp_path, c.tar(c.pax(future), c.member(b"plain", b"stored as is\n")))
    assert (tmp_path / "plain").read_bytes() == b"stored as is\n"


def test_sparse_0_0_pairs_out_of_order_are_refused(tmp_path: Path) -> None:
    records = [(b"GNU.sparse.size", b"10"), (b"GNU.sparse.numbytes", b"1"), (b"GNU.sparse.offset", b"0")]
    with pytest.raises(InvalidArgumentError, match="GNU.sparse.offset/numbytes out of order"):
        apply(tmp_path, c.tar(c.pax(records), c.member(b"s", b"x")))


class _Dribble:
    """Hands out the bytes in small, irregular reads: every header, map and fragment straddles reads."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._n = 0

    def read(self, size: int = -1, /) -> bytes:
        self._n += 1
        step = 1 + (self._n * 7919) % 701
        out = self._data[self._pos : self._pos + min(step, size if size >= 0 else step)]
        self._pos += len(out)
        return out


def test_corner_layers_read_in_dribbles_give_the_same_tree(tmp_path: Path) -> None:
    for tar in c.corner_layers():
        apply_layer(tmp_path, _Dribble(tar), expected_diff_id=sha(tar), write_threads=0)
    assert c.tree_listing(tmp_path) == c.corner_tree()
