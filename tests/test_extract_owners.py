"""diff: owners and modes stay exact while the extractor skips the chown/chmod calls that would change nothing.

An inode we create already has our uid, and our gid unless its directory is setgid (then the directory's
gid, and a new directory also inherits the setgid bit). These cases check every side of that rule against
GNU tar (``--same-owner -p``) extracting the same layer onto the same starting tree, and, with strace, that
the calls are really skipped.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cargohold.diff import apply_layer, compare_trees, snapshot_tree
from cargohold.diff.attrs import create_owner_rule
from support_layers import LayerEntry, d, f, make_layer, symlink

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT, reason="needs root (chown to other users and groups)")

BIG = 1 << 20 | 5  # past the extractor's small-file limit: the streamed path


def owners_layer() -> list[LayerEntry]:
    return [
        d("sg", mode=0o2775, gid=50),  # setgid: new inodes in it get gid 50, new directories the bit
        f("sg/root-file", b"r"),  # 0:0 under it: needs its chown
        f("sg/group-file", b"g", gid=50),  # already what the create gives
        f("sg/other", b"o", uid=1000, gid=1000),
        f("sg/big", b"b" * BIG),  # 0:0, written in chunks
        f("sg/suid", b"s", mode=0o6755),  # chown (gid 50 -> 0) before the chmod that sets the bits
        d("sg/plain", mode=0o755),  # must not keep the inherited setgid bit nor gid 50
        f("sg/plain/y", b"y", gid=50),  # plain is not setgid: needs its chown
        d("sg/plain-g", mode=0o755, gid=50),
        d("sg/keep", mode=0o2755, gid=50),
        f("sg/keep/x", b"x"),
        d("sg/keep/deeper", mode=0o755, gid=7),
        f("sg/keep/deeper/z", b"z"),
        symlink("sg/link", "root-file"),
        symlink("sg/link-g", "root-file", gid=50),
        LayerEntry(path="sg/fifo", kind="fifo", mode=0o640),
        LayerEntry(path="sg/fifo-g", kind="fifo", mode=0o640, gid=50),
        d("grp", mode=0o755, gid=60),  # another group, not setgid: new inodes are 0:0
        f("grp/root-file", b"z"),
        f("grp/g60", b"z", gid=60),
        d("bin"),
        f("bin/suid", b"s", mode=0o4755),  # our uid and gid: no chown, the chmod sets the bit
        f("bin/sgid", b"s", mode=0o2755, gid=50),
        f("bin/suid-other", b"s", mode=0o4755, uid=1000, gid=1000),
        f("bin/mine", b"m", uid=os.geteuid(), gid=os.getegid()),
    ]


def gnu_tar(tar: bytes, dest: Path, tmp: Path) -> None:
    (tmp / "layer.tar").write_bytes(tar)
    subprocess.run(["tar", "--same-owner", "--numeric-owner", "-xpf", os.fspath(tmp / "layer.tar"), "-C",
                    os.fspath(dest)], check=True)


def assert_same_tree(want: Path, got: Path) -> None:
    diffs = compare_trees(snapshot_tree(want, include_xattrs=False), snapshot_tree(got, include_xattrs=False))
    assert not diffs, "trees differ:\n" + "\n".join(diffs)


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.mark.parametrize("overlay", [False, True], ids=["native", "overlay"])
@pytest.mark.parametrize("threads", [4, 0], ids=["threads", "inline"])
def test_owners_and_modes_under_setgid_and_foreign_group_dirs_match_gnu_tar(tmp_path: Path, overlay: bool,
                                                                          threads: int) -> None:
    tar = make_layer(owners_layer())
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    ours.mkdir()
    gnu.mkdir()
    apply_layer(ours, io.BytesIO(tar), overlay=overlay, write_threads=threads)
    gnu_tar(tar, gnu, tmp_path)
    assert_same_tree(gnu, ours)
    # The cases that matter, spelled out (GNU tar could be wrong the same way).
    assert owner_mode(ours / "sg") == (0, 50, 0o2775)
    assert owner_mode(ours / "sg/root-file") == (0, 0, 0o644)
    assert owner_mode(ours / "sg/group-file") == (0, 50, 0o644)
    assert owner_mode(ours / "sg/big") == (0, 0, 0o644)
    assert owner_mode(ours / "sg/suid") == (0, 0, 0o6755)
    assert owner_mode(ours / "sg/plain") == (0, 0, 0o755)
    assert owner_mode(ours / "sg/plain/y") == (0, 50, 0o644)
    assert owner_mode(ours / "sg/plain-g") == (0, 50, 0o755)
    assert owner_mode(ours / "sg/keep/x") == (0, 0, 0o644)
    assert owner_mode(ours / "sg/keep/deeper") == (0, 7, 0o755)
    assert owner_mode(ours / "sg/keep/deeper/z") == (0, 0, 0o644)
    assert owner_mode(ours / "sg/link")[:2] == (0, 0)
    assert owner_mode(ours / "sg/link-g")[:2] == (0, 50)
    assert owner_mode(ours / "sg/fifo") == (0, 0, 0o640)
    assert owner_mode(ours / "grp/root-file") == (0, 0, 0o644)
    assert owner_mode(ours / "grp/g60") == (0, 60, 0o644)
    assert owner_mode(ours / "bin/suid") == (0, 0, 0o4755)
    assert owner_mode(ours / "bin/sgid") == (0, 50, 0o2755)
    assert owner_mode(ours / "bin/suid-other") == (1000, 1000, 0o4755)


def parent_tree(top: Path) -> None:
    """What an earlier layer left: directories with owners, modes and setgid bits the new layer meets."""
    for rel, uid, gid, mode in [("pre", 0, 70, 0o2775), ("pre/inner", 0, 70, 0o2775), ("same", 0, 0, 0o755),
                                ("changes", 0, 0, 0o755), ("foreign", 0, 80, 0o755)]:
        path = top / rel
        path.mkdir()
        os.chown(path, uid, gid)
        os.chmod(path, mode)


def parent_layer() -> list[LayerEntry]:
    return [
        f("pre/a", b"a"),  # the existing setgid dir gives gid 70: a chown is needed
        f("pre/b", b"b", gid=70),
        d("pre/sub", mode=0o755),
        f("pre/inner/c", b"c"),
        d("same", mode=0o755),  # exists with this owner and mode
        f("same/f", b"f"),
        d("changes", mode=0o2750, uid=1000, gid=90),  # exists with others: chown and chmod
        f("changes/f", b"f"),  # now under a setgid dir of gid 90 (this layer's entry says so)
        f("changes/g", b"g", gid=90),
        f("foreign/f", b"f"),
        f("foreign/g", b"g", gid=80),
    ]


@pytest.mark.parametrize("threads", [4, 0], ids=["threads", "inline"])
def test_native_apply_onto_existing_setgid_parents_matches_gnu_tar(tmp_path: Path, threads: int) -> None:
    tar = make_layer(parent_layer())
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    for top in (ours, gnu):
        top.mkdir()
        parent_tree(top)
    apply_layer(ours, io.BytesIO(tar), overlay=False, write_threads=threads)
    gnu_tar(tar, gnu, tmp_path)
    assert_same_tree(gnu, ours)
    assert owner_mode(ours / "pre/a") == (0, 0, 0o644)
    assert owner_mode(ours / "pre/b") == (0, 70, 0o644)
    assert owner_mode(ours / "pre/sub") == (0, 0, 0o755)
    assert owner_mode(ours / "pre/inner/c") == (0, 0, 0o644)
    assert owner_mode(ours / "same") == (0, 0, 0o755)
    assert owner_mode(ours / "changes") == (1000, 90, 0o2750)
    assert owner_mode(ours / "changes/f") == (0, 0, 0o644)
    assert owner_mode(ours / "changes/g") == (0, 90, 0o644)
    assert owner_mode(ours / "foreign/f") == (0, 0, 0o644)
    assert owner_mode(ours / "foreign/g") == (0, 80, 0o644)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_files_that_already_have_their_owner_and_mode_cost_no_chown_or_chmod(tmp_path: Path) -> None:
    if create_owner_rule(os.fspath(tmp_path)) != "sysv":
        pytest.skip("the temporary directory is not on a filesystem with known owner rules")
    n = 50
    entries = [d("a"), d("a/sg", mode=0o2755, gid=50)]
    entries += [f(f"a/f{i}", b"x" * i) for i in range(n)]  # 0:0 0644: exactly what the create gives
    entries += [f(f"a/sg/g{i}", b"y", gid=50) for i in range(n)]  # gid 50: what the setgid dir gives
    entries += [f("a/sg/root", b"r"), f("a/suid", b"s", mode=0o4755)]  # these two need a call each
    (tmp_path / "layer.tar").write_bytes(make_layer(entries))
    root = tmp_path / "root"
    root.mkdir()
    script = ("import sys; from cargohold.diff import apply_layer\n"
              "apply_layer(sys.argv[1], open(sys.argv[2], 'rb'), write_threads=0)\n")
    log = tmp_path / "strace.log"
    subprocess.run(["strace", "-f", "-qq", "-o", os.fspath(log), "-e",
                    "trace=chown,fchown,lchown,fchownat,chmod,fchmod,fchmodat,utimensat",
                    sys.executable, "-c", script, os.fspath(root), os.fspath(tmp_path / "layer.tar")],
                   check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    calls = [line.split("(", 1)[0].split()[-1] for line in log.read_text().splitlines() if "(" in line]
    owner_calls = [c for c in calls if "chown" in c]
    mode_calls = [c for c in calls if "chmod" in c]
    # The setgid dir's own chmod (2755 is beyond the create's bits), sg/root's chown, suid's chmod.
    assert len(owner_calls) == 2, calls  # a/sg (gid 50) and a/sg/root (gid 50 -> 0)
    assert len(mode_calls) == 2, calls  # a/sg (2755) and a/suid (4755)
    assert calls.count("utimensat") >= 2 * n + 4  # every new file still gets the entry's times
    assert owner_mode(root / "a/sg/root") == (0, 0, 0o644)
    assert owner_mode(root / "a/sg/g0") == (0, 50, 0o644)
    assert owner_mode(root / "a/suid") == (0, 0, 0o4755)


@pytest.mark.parametrize("threads", [4, 0], ids=["threads", "inline"])
def test_a_directory_made_setgid_after_files_were_queued_in_it(tmp_path: Path, threads: int) -> None:
    # Files queued for the writer threads were judged under the directory's old state: a later entry for the
    # same directory (a new gid and the setgid bit) must not change what they end up with.
    many = [f(f"x/a{i}", b"a") for i in range(100)] + [f(f"x/b{i}", b"b", gid=50) for i in range(100)]
    entries = [d("x"), *many, d("x", mode=0o2775, gid=50), f("x/late", b"l"), f("x/late-g", b"l", gid=50),
               d("x", mode=0o755, gid=0), f("x/later", b"l"), f("x/later-g", b"l", gid=50)]
    tar = make_layer(entries)
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    ours.mkdir()
    gnu.mkdir()
    apply_layer(ours, io.BytesIO(tar), overlay=False, write_threads=threads)
    gnu_tar(tar, gnu, tmp_path)
    assert_same_tree(gnu, ours)
    assert owner_mode(ours / "x/a0")[:2] == (0, 0)
    assert owner_mode(ours / "x/b99")[:2] == (0, 50)
    assert owner_mode(ours / "x/late")[:2] == (0, 0)
    assert owner_mode(ours / "x/later-g")[:2] == (0, 50)


@pytest.fixture
def grpid_fs(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 mounted with ``grpid``: new inodes take their directory's gid, setgid or not."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", os.fspath(image)], check=True)
    mounted = subprocess.run(["mount", "-o", "loop,grpid", os.fspath(image), os.fspath(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop ext4 here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", os.fspath(mnt)], check=True)


def test_owner_rules_are_read_from_the_mount() -> None:
    assert create_owner_rule("/proc/self") is None  # not a filesystem whose creates we may trust
    assert create_owner_rule("/dev/shm") in ("sysv", None)  # tmpfs when mounted (a container may not)


@pytest.mark.parametrize("threads", [4, 0], ids=["threads", "inline"])
def test_grpid_mount_new_files_take_the_directory_gid_and_still_end_as_gnu_tar(grpid_fs: Path, tmp_path: Path,
                                                                              threads: int) -> None:
    assert create_owner_rule(os.fspath(grpid_fs)) == "bsd"
    tar = make_layer(owners_layer() + [d("g70", mode=0o755, gid=70), f("g70/root-file", b"x"),
                                       f("g70/g70", b"x", gid=70), d("g70/sub", mode=0o750)])
    ours, gnu = grpid_fs / "ours", grpid_fs / "gnu"
    ours.mkdir()
    gnu.mkdir()
    apply_layer(ours, io.BytesIO(tar), overlay=False, write_threads=threads)
    gnu_tar(tar, gnu, tmp_path)
    assert_same_tree(gnu, ours)
    assert owner_mode(ours / "g70/root-file") == (0, 0, 0o644)
    assert owner_mode(ours / "g70/g70") == (0, 70, 0o644)
    assert owner_mode(ours / "g70/sub") == (0, 0, 0o750)
    assert owner_mode(ours / "sg/plain") == (0, 0, 0o755)
