"""Unpacking as an ordinary user: the real CLI run as ``nobody`` (or as the user running the tests when that
is not root), from a world-readable copy of the code and its dependencies, with the default data root in its
home. Images with read-only directories, devices, foreign owners and security.* xattrs (RHEL/UBI-like)."""

from __future__ import annotations

# Imported now: a forked child that dropped to nobody cannot read this interpreter's library (/root is 0700).
import encodings.ascii  # noqa: F401
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from cargohold.devtools.registry import RegistryProcess
from cargohold.devtools.rhel_like import rootless_layers, rootless_sample
from cargohold.devtools.samples import Entry, push, tar_layer
from cargohold.diff.apply import apply_layer
from cargohold.diff.removal import remove_tree
from cargohold.oci.config import chain_ids

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
AS_ROOT = os.geteuid() == 0
# The user the CLI runs as: nobody when we are root, else ourselves (already unprivileged).
UID = NOBODY if AS_ROOT else os.geteuid()
GID = NOBODY if AS_ROOT else os.getegid()

# path -> (kind, mode, size, sha256 of content): what the image's flattened tree must be for that user.
EXPECTED: dict[str, tuple[str, int, int, str]] = {}


def _file(path: str, data: bytes, mode: int) -> None:
    EXPECTED[path] = ("file", mode, len(data), hashlib.sha256(data).hexdigest())


for _d, _m in [("usr", 0o755), ("usr/bin", 0o555), ("etc", 0o755), ("etc/pki", 0o500), ("dev", 0o755),
               ("home", 0o755), ("home/user", 0o700), ("opt", 0o755), ("opt/ro", 0o555)]:
    EXPECTED[_d] = ("dir", _m, 0, "")
_file("usr/bin/ls", b"#!/bin/true ls\n", 0o755)
_file("usr/bin/new", b"#!/bin/true new\n", 0o755)
# setuid is kept: the file is the user's own.
_file("usr/bin/sudo", b"#!/bin/true sudo\n", 0o4111)
_file("etc/pki/key", b"not a key\n", 0o400)
_file("etc/motd", b"read-only\n", 0o444)
_file("etc/shadow", b"root:*::0:::::\n", 0o000)
_file("home/user/notes", b"mine\n", 0o600)
_file("opt/ro/conf", b"version 2, longer\n", 0o444)


def listing(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every path under root (not followed) as in EXPECTED; also checks every owner is the user's."""
    out: dict[str, tuple[str, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            assert (st.st_uid, st.st_gid) == (UID, GID), f"{rel} owned by {st.st_uid}:{st.st_gid}"
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), 0, "")
            elif stat.S_ISREG(st.st_mode):
                digest = _sha256(full, stat.S_IMODE(st.st_mode))
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest)
            else:
                out[rel] = (f"other {stat.S_IFMT(st.st_mode):o}", stat.S_IMODE(st.st_mode), 0, "")
    return out


def _sha256(path: str, mode: int) -> str:
    """Content digest; as an ordinary user, a file without u+r (etc/shadow 0000) is opened up for the read."""
    if not AS_ROOT and not mode & 0o400:
        os.chmod(path, mode | 0o400)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    finally:
        if not AS_ROOT and not mode & 0o400:
            os.chmod(path, mode)


def _copy_dist_closure(dest: Path) -> None:
    """Copy the installed files of cargohold's runtime dependencies (transitively) into ``dest``."""
    todo, seen = ["cargohold"], set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            m = re.match(r"[A-Za-z0-9._-]+", req)
            assert m is not None
            todo.append(m.group(0))
        if name == "cargohold":
            continue  # its source is copied from src/
        for f in dist.files or []:
            src = Path(str(f.locate()))
            if f.parts[0] == ".." or not src.is_file() or "__pycache__" in f.parts:
                continue
            target = dest / Path(*f.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


@pytest.fixture(scope="session")
def world_readable_code() -> Iterator[Path]:
    """A 0755 directory with ``src/`` (cargohold) and ``site/`` (its dependencies) that any user can import."""
    assert os.path.exists(SYSTEM_PYTHON), f"{SYSTEM_PYTHON} missing: run scripts/install-system-deps.sh test"
    top = Path(tempfile.mkdtemp(prefix="cargohold-rootless-code-"))
    try:
        src = Path(__file__).resolve().parent.parent / "src" / "cargohold"
        shutil.copytree(src, top / "src" / "cargohold", ignore=shutil.ignore_patterns("__pycache__"))
        _copy_dist_closure(top / "site")
        for dirpath, _, filenames in os.walk(top):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o755 if name.endswith(".so") else 0o644)
        yield top
    finally:
        shutil.rmtree(top)


@pytest.fixture
def user_home() -> Iterator[Path]:
    """A HOME owned by the unprivileged user, in a directory it can reach."""
    top = Path(tempfile.mkdtemp(prefix="cargohold-rootless-home-"))
    os.chmod(top, 0o755)
    home = top / "home"
    home.mkdir()
    os.chown(home, UID, GID)
    try:
        yield home
    finally:
        _cleanup(top)


def _cleanup(top: Path) -> None:
    # Not root, shutil.rmtree fails on the read-only directories the tests make: remove_tree opens them up.
    remove_tree(top)


def as_user(code: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as the unprivileged user, with the default data root (no --root)."""
    env = {"HOME": str(home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PYTHONPATH": f"{code / 'src'}:{code / 'site'}", "PYTHONDONTWRITEBYTECODE": "1"}
    drop = ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups"] if AS_ROOT else []
    return subprocess.run([*drop, SYSTEM_PYTHON, "-m", "cargohold.cli.main", *args], env=env, cwd=home,
                          text=True, capture_output=True, timeout=300, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.args[-3:]} exited {proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_pull_rootfs_mount_gc_as_ordinary_user(registry: RegistryProcess, world_readable_code: Path,
                                               user_home: Path) -> None:
    image = rootless_sample()
    push(registry.url, "rootless/ubi", "9", image)
    ref = f"{registry.host}/rootless/ubi:9"
    code, home = world_readable_code, user_home

    pulled = ok(as_user(code, home, "pull", "--snapshotter", "native", ref))
    # Two char devices in layer 1: one warning line for the layer, none for layer 2.
    device_lines = [line for line in pulled.stderr.splitlines() if "device" in line]
    assert len(device_lines) == 1, pulled.stderr
    assert "dev/null" in device_lines[0] and "2 device nodes skipped" in device_lines[0]
    # Owners other than the user's: one warning; the security.* xattr: skipped with one.
    assert [ln for ln in pulled.stderr.splitlines() if "owners not applied" in ln] == [
        "WARNING cargohold.diff.attrs: not root: tar owners not applied, files stay the user's "
        "(first: 'usr/' 0:0)"]
    assert ("WARNING cargohold.diff.attrs: tar entry 'etc/motd': xattr security.cargohold-test not applied: "
            "Operation not permitted") in pulled.stderr.splitlines()
    root = home / ".local" / "share" / "cargohold"
    assert (root / "metadata.db").is_file()  # the default root for an ordinary user
    assert (root / "unpack" / "locks").is_dir()

    chain = [str(c) for c in chain_ids(list(image.diff_ids))]
    snaps = json.loads(ok(as_user(code, home, "snapshots", "--snapshotter", "native", "ls",
                                  "--output", "json")).stdout)
    assert [(s["key"], s["parent"], s["kind"]) for s in snaps] == sorted(
        [(chain[0], "", "Committed"), (chain[1], chain[0], "Committed")])
    # The default snapshotter is native: the overlay probe said no, quietly.
    default_ls = as_user(code, home, "snapshots", "ls", "--output", "json")
    assert json.loads(ok(default_ls).stdout) == snaps and default_ls.stderr == ""
    snap_dirs = [p for p in (root / "snapshots" / "native" / "snapshots").iterdir() if p.name.isdigit()]
    assert len(snap_dirs) == 2
    top = next(d / "fs" for d in snap_dirs if (d / "fs" / "usr" / "bin" / "new").exists())
    assert listing(top) == EXPECTED

    rootfs = home / "rootfs"
    out = ok(as_user(code, home, "rootfs", ref, str(rootfs)))
    assert "Traceback" not in out.stderr
    assert listing(rootfs) == EXPECTED

    mnt = home / "mnt"
    mnt.mkdir()
    os.chown(mnt, UID, GID)
    failed = as_user(code, home, "mount", "--snapshotter", "native", ref, str(mnt))
    assert failed.returncode == 1, failed
    lines = failed.stderr.splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("cargohold: error: mount ") and f" at {mnt} needs root (" in lines[0]
    assert "Operation not permitted" in lines[0]
    # The snapshot made for the mount is gone again.
    after = json.loads(ok(as_user(code, home, "snapshots", "ls", "--output", "json")).stdout)
    assert after == snaps

    # The top snapshot by hand (its tree has read-only directories), the rest by gc.
    ok(as_user(code, home, "snapshots", "--snapshotter", "native", "rm", chain[1]))
    assert not top.exists() and len(list(top.parent.parent.iterdir())) == 1
    # A scratch directory of an apply that died (a read-only directory inside): cleaned on the next open.
    dead = root / "snapshots" / "native" / "snapshots" / "tmp-0123456789abcdef"
    ok(as_user(code, home, "snapshots", "ls"))  # nothing to clean yet
    shutil.copytree(rootfs / "usr", dead / "fs" / "usr")
    for dirpath, dirnames, filenames in os.walk(dead):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in [*dirnames, *filenames])]:
            os.chown(name, UID, GID, follow_symlinks=False)
    ok(as_user(code, home, "images", "rm", ref))
    ok(as_user(code, home, "gc"))
    assert ok(as_user(code, home, "snapshots", "ls", "--output", "json")).stdout.strip() == "[]"
    assert [p.name for p in (root / "snapshots" / "native" / "snapshots").iterdir()] == []

    not_dir = home / "afile"
    not_dir.write_text("x")
    refused = as_user(code, home, "rm-rootfs", str(not_dir))
    assert refused.returncode == 2 and refused.stderr == f"cargohold: error: {not_dir}: not a directory\n"
    assert not_dir.exists()
    ok(as_user(code, home, "rm-rootfs", str(rootfs)))
    assert not rootfs.exists() and home.is_dir()


def _in_child_as_user(fn: object) -> None:
    """Run ``fn()`` in a forked child that dropped to the unprivileged user; its failure fails the test."""
    assert callable(fn)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        status = 0
        try:
            if AS_ROOT:
                os.setgroups([])
                os.setgid(GID)
                os.setuid(UID)
            fn()
        except BaseException as exc:
            os.write(w, "".join(traceback.format_exception(exc)).encode())
            status = 1
        os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report


def test_extractor_as_user_read_only_dirs(tmp_path: Path) -> None:
    """Layer by layer into one directory as the native snapshotter does (a whole read-only subtree whited
    out, an opaque marker inside a read-only directory), then removed with the shared tree removal."""
    base = Path(tempfile.mkdtemp(prefix="cargohold-rootless-x-"))
    os.chmod(base, 0o755)
    os.chown(base, UID, GID)
    third = tar_layer([
        Entry(path="etc/.wh.pki"),  # a 0500 dir holding a 0400 file
        Entry(path="opt/ro/.wh..wh..opq"),  # empties a 0555 dir of the parents' files
        Entry(path="opt/ro/fresh", data=b"fresh\n", mode=0o444),
        Entry(path="srv/a/b", kind="dir", mode=0o555),  # implicit parents, then a read-only leaf
        Entry(path="srv/a/b/c", data=b"c\n"),
        Entry(path="srv/a", kind="dir", mode=0o500),  # made read-only after its child was written
        Entry(path="var", kind="dir", mode=0o755),
        Entry(path="var/closed", kind="dir", mode=0o000),  # not even searchable: opened for the next layer
    ])
    fourth = tar_layer([Entry(path="var/closed/sub/file", data=b"deep\n")])

    root = base / "fs"

    def apply_all() -> None:
        root.mkdir()
        for layer in [*rootless_layers(), third, fourth]:
            apply_layer(root, io.BytesIO(layer))

    def remove() -> None:
        remove_tree(root)

    try:
        _in_child_as_user(apply_all)
        want = {k: v for k, v in EXPECTED.items() if not k.startswith(("etc/pki", "opt/ro/"))}
        want["opt/ro/fresh"] = ("file", 0o444, 6, hashlib.sha256(b"fresh\n").hexdigest())
        want["srv"] = ("dir", 0o755, 0, "")
        want["srv/a"] = ("dir", 0o500, 0, "")
        want["srv/a/b"] = ("dir", 0o555, 0, "")
        want["srv/a/b/c"] = ("file", 0o644, 2, hashlib.sha256(b"c\n").hexdigest())
        want["var"] = ("dir", 0o755, 0, "")
        want["var/closed"] = ("dir", 0o000, 0, "")
        want["var/closed/sub"] = ("dir", 0o755, 0, "")
        want["var/closed/sub/file"] = ("file", 0o644, 5, hashlib.sha256(b"deep\n").hexdigest())
        assert listing(root) == want
        _in_child_as_user(remove)
        assert not root.exists()
    finally:
        _cleanup(base)



def test_rm_rootfs_refuses_mounts_and_never_follows_symlinks(world_readable_code: Path, user_home: Path) -> None:
    """``rm-rootfs`` as the user: read-only directories go, a symlink's target outside stays, a tree with a
    mount inside (made by root, when the tests run as root) is refused untouched."""
    code, home = world_readable_code, user_home
    outside = home / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    tree = home / "tree"

    def build() -> None:
        (tree / "usr" / "bin").mkdir(parents=True)
        (tree / "usr" / "bin" / "ls").write_text("ls\n")
        (tree / "usr" / "link").symlink_to(outside)
        (tree / "usr" / "file-link").symlink_to(outside / "keep")
        (tree / "mnt").mkdir()
        os.chmod(tree / "usr" / "bin" / "ls", 0o000)
        os.chmod(tree / "usr" / "bin", 0o555)
        os.chmod(tree / "usr", 0o500)

    def chown_all(path: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in [*dirnames, *filenames])]:
                os.chown(name, UID, GID, follow_symlinks=False)

    build()
    if AS_ROOT:
        chown_all(home)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tree / "mnt")], check=True)
        try:
            (tree / "mnt" / "data").write_text("on tmpfs\n")
            refused = as_user(code, home, "rm-rootfs", str(tree))
            assert refused.returncode == 1, refused
            assert refused.stderr == (f"cargohold: error: {tree}: {tree / 'mnt'} is mounted there; "
                                      "unmount it first\n")
            assert (tree / "mnt" / "data").read_text() == "on tmpfs\n" and (tree / "usr" / "bin").is_dir()
        finally:
            subprocess.run(["umount", str(tree / "mnt")], check=True)
        # The user's tree in a directory it may not write: refused before anything is removed.
        foreign = home.parent / "foreign"
        shutil.copytree(tree, foreign, symlinks=True)
        chown_all(foreign)
        refused = as_user(code, home, "rm-rootfs", str(foreign))
        assert refused.returncode == 1 and refused.stderr == (
            f"cargohold: error: {foreign}: cannot remove it, its directory {home.parent} is not writable\n")
        assert (foreign / "usr" / "bin" / "ls").exists()

    as_link = home / "link-to-tree"
    as_link.symlink_to(tree)
    refused = as_user(code, home, "rm-rootfs", str(as_link))
    assert refused.returncode == 2 and refused.stderr == f"cargohold: error: {as_link}: not a directory\n"

    holds_root = as_user(code, home, "rm-rootfs", str(home))
    assert holds_root.returncode == 1 and holds_root.stderr == (
        f"cargohold: error: {home}: holds the data root {home}/.local/share/cargohold; not removing it\n")
    ok(as_user(code, home, "rm-rootfs", str(tree)))
    assert not tree.exists()
    assert (outside / "keep").read_text() == "keep\n"
    missing = as_user(code, home, "rm-rootfs", str(tree))
    assert missing.returncode == 1 and missing.stderr == f"cargohold: error: {tree}: no such directory\n"
