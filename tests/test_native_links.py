"""The native snapshotter's link copies: a snapshot prepared by an unpack shares its parent's inodes (hard links,
new directories), which is only right because applying a layer never writes through an existing file. Proven
here entry kind by entry kind: after each layer is applied, every entry of every committed snapshot below it
has the same inode, type, mode, owner, size, bytes, link target, device, mtime and xattrs as before (atimes
are left out: reading the bytes to hash them moves them). Snapshots prepared for anything else are real copies.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from tests.treeutil import read_tree

from cargohold.client import Client
from cargohold.devtools import corners, samples
from cargohold.devtools.samples import Entry
from cargohold.snapshots.native import link_tree

AS_ROOT = os.geteuid() == 0
NOBODY = 65534
BIG = bytes(range(256)) * (2 * 4096 + 1)  # > 1 MiB: streamed in chunks, not one buffer
X = {"user.note": b"parent xattr"}

PARENT = [
    Entry(path="d", kind="dir", mode=0o755, xattrs={"user.dir": b"old"}),
    Entry(path="d/small", data=b"small, parent\n", xattrs=X),
    Entry(path="d/keep", data=b"never touched\n"),
    Entry(path="d/big", data=BIG),
    Entry(path="d/meta", data=b"same bytes, other metadata\n", mode=0o644, xattrs=X),
    Entry(path="d/hl-a", data=b"linked in the parent\n"),
    Entry(path="d/hl-b", kind="hardlink", link="d/hl-a"),
    Entry(path="d/target", data=b"linked to by the child\n"),
    Entry(path="d/replaced-by-link", data=b"a hardlink entry replaces me\n"),
    Entry(path="d/sym", kind="symlink", link="small"),
    Entry(path="d/fifo", kind="fifo", mode=0o640),
    Entry(path="d/null", kind="char", mode=0o666, devmajor=1, devminor=3),
    Entry(path="d/suid", data=b"setuid\n", mode=0o4755, uid=1000, gid=1000),
    Entry(path="d/wh-file", data=b"whited out\n"),
    Entry(path="gone", kind="dir", mode=0o755),
    Entry(path="gone/x", data=b"in a whited-out dir\n"),
    Entry(path="opq", kind="dir", mode=0o755),
    Entry(path="opq/a", data=b"hidden by opaque\n"),
    Entry(path="dir2file", kind="dir", mode=0o755),
    Entry(path="dir2file/x", data=b"dir becomes a file\n"),
    Entry(path="file2dir", data=b"file becomes a dir\n"),
]
CHILD = [
    Entry(path="d", kind="dir", mode=0o700, xattrs={"user.dir": b"new"}),  # metadata-only re-entry
    Entry(path="d/small", data=b"small, child, longer\n"),
    Entry(path="d/big", data=BIG[::-1]),
    Entry(path="d/meta", data=b"same bytes, other metadata\n", mode=0o600, uid=7, gid=7,
          mtime=samples.FIXED_MTIME + 99, xattrs={"user.note": b"child xattr"}),
    Entry(path="d/hl-a", data=b"one link of the pair rewritten\n"),
    Entry(path="d/new-link", kind="hardlink", link="d/target"),  # a link to the parent's file
    Entry(path="d/replaced-by-link", kind="hardlink", link="d/keep"),
    Entry(path="d/sym", kind="symlink", link="keep"),
    Entry(path="d/fifo", data=b"was a fifo\n"),
    Entry(path="d/null", kind="char", mode=0o600, devmajor=1, devminor=5),
    Entry(path="d/suid", data=b"setuid, rewritten\n", mode=0o4755, uid=1000, gid=1000),
    Entry(path="d/.wh.wh-file"),
    Entry(path=".wh.gone"),
    Entry(path="opq", kind="dir", mode=0o755),
    Entry(path="opq/.wh..wh..opq"),
    Entry(path="opq/c", data=b"new in the opaque dir\n"),
    Entry(path="dir2file", data=b"now a file\n"),
    Entry(path="file2dir", kind="dir", mode=0o755),
    Entry(path="file2dir/y", data=b"in the new dir\n"),
]


def _sparse_and_back() -> bytes:
    """Sparse files over the sparse ones of the corner layer, and the replaced paths turned back."""
    parts = [corners.member(b"sparse/", typeflag=b"5", mode=0o755)]
    for seed, version in enumerate(corners.SPARSE_VERSIONS):
        parts.append(corners.sparse_entry(version, f"sparse/{version}".encode(), seed + 10)[0])
    parts += [
        corners.member(b"dir2file/", typeflag=b"5", mode=0o755),
        corners.member(b"dir2file/z", b"a dir again\n"),
        corners.member(b"file2dir", b"a file again\n"),
        corners.member(b"d/big", BIG[:1000], mode=0o600),
    ]
    return corners.tar(*parts)


LAYERS = [corners.corner_layers()[0], samples.tar_layer(PARENT), samples.tar_layer(CHILD), _sparse_and_back()]

State = dict[str, tuple[object, ...]]


def state(root: Path) -> State:
    """Everything of every entry under ``root`` that a layer applied above it must not change."""
    stats: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            stats[os.path.relpath(full, root)] = os.lstat(full)
    out: State = {}
    for rel, st in sorted(stats.items()):  # all stats first: hashing moves atimes, nothing else
        full = os.path.join(root, rel)
        if stat.S_ISREG(st.st_mode):
            payload: object = hashlib.sha256(Path(full).read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            payload = os.readlink(full)
        else:
            payload = st.st_rdev
        xattrs = {k: os.getxattr(full, k, follow_symlinks=False) for k in sorted(os.listxattr(full,
                                                                                          follow_symlinks=False))}
        out[rel] = (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, payload, xattrs)
    return out


@pytest.mark.skipif(not AS_ROOT, reason="devices and foreign owners need root")
def test_applying_a_layer_never_changes_the_committed_snapshots_below(registry, tmp_path: Path) -> None:
    client = Client(tmp_path / "root")
    sn = client.snapshotter("native")
    before: dict[str, State] = {}
    for n in range(2, len(LAYERS) + 1):
        # Each image is the previous one plus a layer: its unpack finds the lower snapshots and applies one.
        samples.push(registry.url, "links", f"v{n}", samples.build_image(LAYERS[:n], compression="gzip"))
        ref = f"{registry.host}/links:v{n}"
        res = client.pull(ref, snapshotter="native")
        assert res.unpack is not None and res.unpack.unpacked == (2 if n == 2 else 1)
        chains = [str(c) for c in client.resolve_manifest(ref).chain_ids]
        assert set(chains[:-1]) == (set(before) if n > 2 else {chains[0]})
        for chain in chains[:-1] if n > 2 else ():
            assert state(sn.snapshot_dir(chain) / "fs") == before[chain], f"snapshot {chain} changed"
        for chain in chains:
            before[chain] = state(sn.snapshot_dir(chain) / "fs")

    parent_fs, child_fs = (sn.snapshot_dir(c) / "fs" for c in chains[1:3])
    # Untouched entries are the parent's inodes, also where the child linked to them ...
    keep = os.lstat(parent_fs / "d/keep").st_ino
    assert {os.lstat(child_fs / p).st_ino for p in ("d/keep", "d/replaced-by-link")} == {keep}
    assert os.lstat(child_fs / "d/new-link").st_ino == os.lstat(parent_fs / "d/target").st_ino
    assert os.lstat(child_fs / "d/hl-b").st_ino == os.lstat(parent_fs / "d/hl-b").st_ino
    # ... rewritten ones are new, and directories are always the snapshot's own.
    assert os.lstat(child_fs / "d/hl-a").st_ino != os.lstat(parent_fs / "d/hl-a").st_ino
    assert os.lstat(child_fs / "d").st_ino != os.lstat(parent_fs / "d").st_ino
    assert stat.S_IMODE(os.lstat(parent_fs / "d").st_mode) == 0o755

    # The same layers unpacked by overlayfs (no sharing at all) give the same tree.
    top = chains[-1]
    client.pull(f"{registry.host}/links:v{len(LAYERS)}", snapshotter="overlayfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    client.mount(f"{registry.host}/links:v{len(LAYERS)}", mnt, snapshotter="overlayfs")
    try:
        want = read_tree(mnt)
        want_x = {rel: v[-1] for rel, v in state(mnt).items()}
    finally:
        client.unmount(mnt)
    top_fs = sn.snapshot_dir(top) / "fs"
    assert read_tree(top_fs) == want
    assert {rel: v[-1] for rel, v in state(top_fs).items()} == want_x
    assert want["dir2file/z"][0] == "file" and want["file2dir"][0] == "file" and "gone" not in want


@pytest.mark.skipif(not AS_ROOT, reason="devices and foreign owners need root")
def test_snapshots_for_anything_but_an_unpack_are_real_copies(registry, tmp_path: Path) -> None:
    samples.push(registry.url, "links", "v3", samples.build_image(LAYERS[:3], compression="gzip"))
    ref = f"{registry.host}/links:v3"
    client = Client(tmp_path / "root")
    client.pull(ref, snapshotter="native")
    sn = client.snapshotter("native")
    top = str(client.resolve_manifest(ref).chain_ids[-1])
    top_fs = sn.snapshot_dir(top) / "fs"
    committed = state(top_fs)
    # A container's rootfs (no snapshot.ref label): writes in place must not reach the image.
    sn.prepare("container", top, {"containerd.io/gc.root": "x"})
    rootfs = Path(sn.mounts("container")[0].source)
    assert os.lstat(rootfs / "d/keep").st_ino != os.lstat(top_fs / "d/keep").st_ino
    with open(rootfs / "d/keep", "r+b") as f:
        f.write(b"NEVER")
    os.chmod(rootfs / "d/target", 0o600)
    # `cargohold mount --writable` prepares without the label too.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    client.mount(ref, mnt, snapshotter="native", writable=True)
    try:
        (mnt / "d/small").write_bytes(b"in place")
    finally:
        client.unmount(mnt)
    assert state(top_fs) == committed
    assert (top_fs / "d/keep").read_bytes() == b"never touched\n"


@pytest.mark.skipif(not AS_ROOT, reason="makes files of another user, then links as nobody")
def test_link_copy_copies_what_protected_hardlinks_refuses(tmp_path: Path) -> None:
    protected = Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    top = Path(tempfile.mkdtemp(prefix="native-links-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        src, dst = top / "src", top / "dst"
        (src / "sub").mkdir(parents=True)
        (src / "mine").write_bytes(b"nobody's own\n")
        (src / "sub" / "root-file").write_bytes(b"root's, readable, not writable\n")
        os.link(src / "sub" / "root-file", src / "sub" / "root-link")
        (src / "secret").write_bytes(b"root's, unreadable\n")  # linkable by nobody only without protection
        os.chmod(src / "secret", 0o600)
        for path in (src, src / "sub", src / "mine"):
            os.chown(path, NOBODY, NOBODY)
        os.chmod(src / "sub", 0o555)
        os.utime(src / "sub", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
        os.chown(top, NOBODY, NOBODY)
        if protected:
            os.unlink(src / "secret")  # nobody could neither link nor copy it: the copy would fail, rightly
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                link_tree(src, dst)
                code = 0
            except BaseException as exc:  # noqa: BLE001 - reported through the exit code
                os.write(2, f"link_tree failed: {exc!r}\n".encode())
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.lstat(dst / "mine").st_ino == os.lstat(src / "mine").st_ino
        copied, linked = os.lstat(dst / "sub" / "root-file"), os.lstat(dst / "sub" / "root-link")
        if protected:
            assert copied.st_ino != os.lstat(src / "sub" / "root-file").st_ino
            assert copied.st_uid == NOBODY  # a copy nobody made
        else:
            assert copied.st_ino == os.lstat(src / "sub" / "root-file").st_ino
        assert copied.st_ino == linked.st_ino  # links among the copied files stay links
        assert (dst / "sub" / "root-file").read_bytes() == b"root's, readable, not writable\n"
        sub = os.lstat(dst / "sub")
        assert (stat.S_IMODE(sub.st_mode), sub.st_mtime_ns) == (0o555, 1_600_000_000 * 10**9)
    finally:
        subprocess.run(["rm", "-rf", "--", str(top)], check=True)
