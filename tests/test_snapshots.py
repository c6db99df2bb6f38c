"""Snapshotter conformance: one suite over native, overlayfs, the gRPC proxy to a real stargz daemon and the gRPC
proxy to cargohold's own snapshots server; real mounts, processes and files."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cargohold.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from cargohold.metadata.db import MetadataDB
from cargohold.snapshots import (
    Info,
    Kind,
    Mount,
    OverlaySnapshotter,
    Snapshotter,
    Usage,
    available_snapshotters,
    default_snapshotter_name,
    known_snapshotters,
    mount_all,
    open_snapshotter,
    overlay_supported,
    unmount,
    with_temp_mount,
)
from cargohold.snapshots.local import LocalSnapshotter
from support.stargz import mounts_under, stargz_binary, stargz_daemon  # noqa: F401 (fixtures)

F = TypeVar("F", bound=Callable[..., Any])

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="snapshot tests mount filesystems: needs root")

PROXY = "stargz"  # ProxySnapshotter -> a stargz daemon (containerd's snapshots gRPC API)
OWN_PROXY = "cargohold-proxy"  # ProxySnapshotter -> cargohold's own snapshots server (overlayfs behind it)
PROXIES = (PROXY, OWN_PROXY)
IMPLS = ["native", "overlayfs", PROXY, OWN_PROXY]


def local_only(reason: str) -> Callable[[F], F]:
    """Mark a test that does not apply to the proxy snapshotter (e.g. it inspects local snapshot
    directories, ``reason``): it is generated for the local snapshotters only, never skipped (CI fails on skips)."""

    def mark(fn: F) -> F:
        fn.local_only = reason  # type: ignore[attr-defined]
        return fn

    return mark


def not_for(name: str, reason: str) -> Callable[[F], F]:
    """Mark a test that does not apply to snapshotter ``name`` (``reason``): not generated for it."""

    def mark(fn: F) -> F:
        fn.not_for = (name, reason)  # type: ignore[attr-defined]
        return fn

    return mark


ONE_KEY_SPACE = ("a remote snapshotter has one key space for all namespaces (containerd's metadata layer, not "
                 "its proxy, namespaces keys)")
LOCAL_DIRS = "inspects cargohold's local snapshot directories or opens a local snapshotter by name"


# --- helpers -------------------------------------------------------------------------------------------


def tree(path: Path) -> dict[str, str]:
    """A comparable picture of a directory: relative path -> kind and content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(path))
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = "file:" + p.read_text()
            elif stat.S_ISCHR(st.st_mode):
                out[rel] = f"chr:{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = "fifo"
            else:
                out[rel] = f"other:{st.st_mode:o}"
    return out


def snapshot_dirs(root: Path, name: str) -> list[str]:
    return sorted(os.listdir(root / "snapshots" / name / "snapshots"))


@contextmanager
def mounted(sn: Snapshotter, key: str, root: Path) -> Iterator[Path]:
    with with_temp_mount(sn.mounts(key), root=root / "mnt") as path:
        yield path


def write_tree(path: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for point in mounts_under(tmp_path):
        try:
            unmount(point)
        except Exception:
            subprocess.run(["umount", "-l", point], check=False)
    assert not mounts_under(tmp_path)


@pytest.fixture
def db(root: Path) -> Iterator[MetadataDB]:
    database = MetadataDB(root / "meta.db")
    yield database
    database.close()


def _open(name: str, root: Path, db: MetadataDB, namespace: str = "default") -> LocalSnapshotter:
    if name == "overlayfs" and not overlay_supported(root):
        pytest.skip(f"overlay mounts do not work under {root}")
    sn = open_snapshotter(name, root, db, namespace)
    assert isinstance(sn, LocalSnapshotter)
    return sn


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every snapshotter for ``sn``; the local ones only for tests marked ``local_only``."""
    if "sn" in metafunc.fixturenames:
        local = getattr(metafunc.function, "local_only", "")
        excluded = getattr(metafunc.function, "not_for", ("", ""))[0]
        metafunc.parametrize("sn", [name for name in IMPLS if not (local and name in PROXIES) and name != excluded],
                             indirect=True)


@pytest.fixture
def sn(request: pytest.FixtureRequest, root: Path, db: MetadataDB) -> Iterator[LocalSnapshotter]:
    if request.param == PROXY:
        # Keys made unique per namespace on this side, as config.toml does for a remote snapshotter.
        snapshotter = request.getfixturevalue("stargz_daemon").snapshotter(namespaced_keys=True)
        yield snapshotter
        snapshotter.close()
        return
    if request.param == OWN_PROXY:
        yield from _own_proxy(root)
        return
    snapshotter = _open(request.param, root, db)
    yield snapshotter
    snapshotter.close()


def _own_proxy(root: Path) -> Iterator[Any]:
    """cargohold's ProxySnapshotter against cargohold's snapshots server (in this process) serving overlayfs
    under ``root`` on a socket in a short temp dir (socket paths are limited to 107 bytes)."""
    from cargohold.snapshots.proxy import ProxySnapshotter
    from cargohold.snapshots.server import SnapshotsServer

    _open("overlayfs", root, MetadataDB(root / "probe.db")).close()  # skips where overlay mounts fail
    sockdir = Path(tempfile.mkdtemp(prefix="ch-sn-"))
    server = SnapshotsServer("overlayfs", root / "served", sockdir / "sn.sock")
    server.start()
    snapshotter = ProxySnapshotter(OWN_PROXY, str(server.socket_path), namespace="default",
                                   capabilities={"rebase"})
    try:
        yield snapshotter
    finally:
        snapshotter.close()
        server.stop(grace=1)
        shutil.rmtree(sockdir, ignore_errors=True)


def _commit_tree(sn: Snapshotter, root: Path, name: str, files: dict[str, str], parent: str = "") -> None:
    sn.prepare(name + "-active", parent)
    with mounted(sn, name + "-active", root) as mnt:
        write_tree(mnt, files)
    sn.commit(name, name + "-active")


# --- lifecycle -----------------------------------------------------------------------------------------


BASE = {"etc/hello": "hello\n", "etc/gone": "bye\n", "dir/keep": "k", "dir/remove": "r", "bin/tool": "#!"}


def test_prepare_commit_child_view_sees_merged_tree(sn: LocalSnapshotter, root: Path) -> None:
    sn.prepare("base-active")
    with mounted(sn, "base-active", root) as mnt:
        write_tree(mnt, BASE)
    sn.commit("base", "base-active")
    assert sn.stat("base").kind is Kind.COMMITTED
    with pytest.raises(NotFoundError, match="base-active"):
        sn.stat("base-active")

    sn.prepare("child-active", "base")
    with mounted(sn, "child-active", root) as mnt:
        assert {k: v for k, v in tree(mnt).items() if v.startswith("file:")} == {
            k: "file:" + v for k, v in BASE.items()
        }
        (mnt / "etc/hello").write_text("hello again\n")
        (mnt / "etc/gone").unlink()
        (mnt / "dir/remove").unlink()
        (mnt / "new.txt").write_text("new")
    sn.commit("child", "child-active")

    if sn.name == "overlayfs":
        assert isinstance(sn, OverlaySnapshotter)
        upper = tree(sn.upper_dir("child"))
        # Deletions are overlay whiteouts (0/0 character devices) in the child's upper dir.
        assert upper["etc/gone"] == "chr:0,0"
        assert upper["dir/remove"] == "chr:0,0"
        assert upper["etc/hello"] == "file:hello again\n"
        assert "dir/keep" not in upper and "bin/tool" not in upper

    sn.view("v", "child")
    with mounted(sn, "v", root) as mnt:
        assert tree(mnt) == {
            "etc": "dir",
            "etc/hello": "file:hello again\n",
            "dir": "dir",
            "dir/keep": "file:k",
            "bin": "dir",
            "bin/tool": "file:#!",
            "new.txt": "file:new",
        }
        with pytest.raises(OSError) as exc:
            (mnt / "etc/hello").write_text("no")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            (mnt / "another").write_text("no")
        assert exc.value.errno == errno.EROFS
    # The parent is untouched by the child's changes.
    sn.view("base-view", "base")
    with mounted(sn, "base-view", root) as mnt:
        assert (mnt / "etc/gone").read_text() == "bye\n"
        assert (mnt / "etc/hello").read_text() == "hello\n"
        with pytest.raises(OSError) as exc:
            (mnt / "x").write_text("no")
        assert exc.value.errno == errno.EROFS


@local_only(LOCAL_DIRS)
def test_mount_shapes(sn: LocalSnapshotter, root: Path) -> None:
    def fs(key: str) -> str:
        return str(sn.snapshot_dir(key) / "fs")

    assert sn.prepare("a") == [Mount(type="bind", source=fs("a"), options=("rbind", "rw"))]
    assert sn.mounts("a") == [Mount(type="bind", source=fs("a"), options=("rbind", "rw"))]
    sn.prepare("a2")
    sn.commit("A", "a")
    sn.commit("A2", "a2")
    one = sn.view("one", "A")
    # A view of a single committed layer is a read-only bind of that layer (native: no copy needed either).
    assert one == [Mount(type="bind", source=fs("A"), options=("rbind", "ro"))]
    child = sn.prepare("b", "A")
    if sn.name == "native":
        assert child == [Mount(type="bind", source=fs("b"), options=("rbind", "rw"))]
    else:
        assert child[0].type == "overlay"
        opts = [o for o in child[0].options if o != "index=off"]
        assert sorted(opts) == sorted(
            [f"lowerdir={fs('A')}", f"upperdir={fs('b')}", f"workdir={sn.snapshot_dir('b') / 'work'}"]
        )
    sn.commit("B", "b")
    chain = sn.view("chain", "B")
    if sn.name == "native":
        assert chain == [Mount(type="bind", source=fs("B"), options=("rbind", "ro"))]
    else:
        opts = [o for o in chain[0].options if o != "index=off"]
        assert chain[0].type == "overlay" and opts == [f"lowerdir={fs('B')}:{fs('A')}"]
    empty_view = sn.view("nothing")
    assert empty_view == [Mount(type="bind", source=fs("nothing"), options=("rbind", "ro"))]
    with mounted(sn, "nothing", root) as mnt:
        assert os.listdir(mnt) == []
        with pytest.raises(OSError) as exc:
            (mnt / "x").write_text("no")
        assert exc.value.errno == errno.EROFS


# --- metadata --------------------------------------------------------------------------------------------


def test_stat_and_update_labels(sn: LocalSnapshotter) -> None:
    sn.prepare("s", labels={"a": "1", "b": "2"})
    info = sn.stat("s")
    assert (info.key, info.name, info.parent, info.kind) == ("s", "s", "", Kind.ACTIVE)
    assert dict(info.labels) == {"a": "1", "b": "2"}
    assert info.created_at == info.updated_at and info.created_at.tzinfo is not None

    replaced = sn.update(Info(key="s", labels={"c": "3"}))
    assert dict(replaced.labels) == {"c": "3"}
    assert replaced.updated_at > info.updated_at and replaced.created_at == info.created_at
    one = sn.update(Info(key="s", labels={"a": "9", "c": "ignored"}), ["labels.a"])
    assert dict(one.labels) == {"a": "9", "c": "3"}
    deleted = sn.update(Info(key="s", labels={}), ["labels.c"])
    assert dict(deleted.labels) == {"a": "9"}
    whole = sn.update(Info(key="s", labels={"x": "1", "empty": ""}), ["labels"])
    assert dict(whole.labels) == {"x": "1"}
    assert dict(sn.stat("s").labels) == {"x": "1"}
    with pytest.raises(InvalidArgumentError, match="parent"):
        sn.update(Info(key="s", parent="other"), ["parent"])
    with pytest.raises(NotFoundError, match="nope"):
        sn.update(Info(key="nope", labels={"a": "b"}))
    with pytest.raises(InvalidArgumentError, match="label"):
        sn.update(Info(key="s", labels={"big": "x" * 5000}))

    sn.commit("S", "s", labels={"final": "yes"})
    committed = sn.stat("S")
    assert (committed.kind, committed.name, dict(committed.labels)) == (Kind.COMMITTED, "S", {"final": "yes"})


def test_walk_with_filters(sn: LocalSnapshotter) -> None:
    sn.prepare("base-a", labels={"containerd.io/gc.root": "x", "tier": "base"})
    sn.commit("base", "base-a", labels={"containerd.io/gc.root": "x", "tier": "base"})
    sn.prepare("child", "base", labels={"tier": "app"})
    sn.view("v", "base")

    def keys(*filters: str) -> list[str]:
        return [i.key for i in sn.walk(*filters)]

    assert keys() == ["base", "child", "v"]
    assert keys("") == ["base", "child", "v"]
    assert keys("kind==committed") == ["base"]
    assert keys("kind==active") == ["child"]
    assert keys("kind==view") == ["v"]
    assert keys("parent==base") == ["child", "v"]
    assert keys('labels."containerd.io/gc.root"') == ["base"]
    assert keys('labels."containerd.io/gc.root"==x') == ["base"]
    assert keys("labels.tier==app", "kind==view") == ["child", "v"]
    assert keys("labels.tier!=app") == ["base", "v"]
    assert keys("labels.tier~=^b") == ["base"]
    assert keys("labels.tier~=/a(p|s)/") == ["base", "child"]
    assert keys("name==child,kind==active") == ["child"]
    assert keys("name==child, kind==view") == []
    assert keys('labels.tier=="app"') == ["child"]
    for bad in ("labels.==x", "kind==active,", "labels.tier~=(", 'labels."open'):
        with pytest.raises(InvalidArgumentError, match="filter"):
            sn.walk(bad)  # raised at the call, not at the first next()


def test_usage_counts_bytes_and_inodes(sn: LocalSnapshotter, root: Path) -> None:
    sn.prepare("u")
    empty = sn.usage("u")
    assert empty.inodes == 1  # the root directory
    payload = os.urandom(1 << 20)
    with mounted(sn, "u", root) as mnt:
        (mnt / "big").write_bytes(payload)
        os.link(mnt / "big", mnt / "big-link")  # hard links count once
        (mnt / "d").mkdir()
        for i in range(9):
            (mnt / "d" / f"small{i}").write_bytes(b"x" * 100)
    used = sn.usage("u")
    assert used.inodes == empty.inodes + 11
    grown = used.size - empty.size
    assert (1 << 20) <= grown <= (1 << 20) + 11 * 8192
    sn.commit("U", "u")
    assert sn.usage("U") == used

    sn.prepare("c", "U")
    with mounted(sn, "c", root) as mnt:
        (mnt / "more").write_bytes(os.urandom(16384))
    child = sn.usage("c")
    if sn.name in ("overlayfs", *PROXIES):  # stargz's children are overlays too (and cargohold's served ones)
        # Only the upper dir counts: root dir + "more".
        assert child.inodes == 2 and 16384 <= child.size < 16384 + 3 * 8192
    else:
        # A native child is a full copy.
        assert child.inodes == used.inodes + 1 and child.size >= used.size + 16384
    with pytest.raises(NotFoundError, match="missing"):
        sn.usage("missing")


@local_only(LOCAL_DIRS)
def test_remove(sn: LocalSnapshotter, root: Path) -> None:
    _commit_tree(sn, root, "base", {"f": "1"})
    sn.prepare("leaf", "base")
    sn.view("look", "base")
    with pytest.raises(FailedPreconditionError, match="base"):
        sn.remove("base")
    leaf_dir = sn.snapshot_dir("leaf")
    assert (leaf_dir / "fs").is_dir()
    sn.remove("leaf")
    assert not leaf_dir.exists()
    with pytest.raises(NotFoundError, match="leaf"):
        sn.stat("leaf")
    with pytest.raises(NotFoundError, match="leaf"):
        sn.remove("leaf")
    with pytest.raises(FailedPreconditionError, match="look"):
        sn.remove("base")
    sn.remove("look")
    sn.remove("base")
    assert [i.key for i in sn.walk()] == []
    assert snapshot_dirs(root, sn.name) == []


def test_error_kinds(sn: LocalSnapshotter, root: Path) -> None:
    with pytest.raises(NotFoundError, match="missing-parent"):
        sn.prepare("x", "missing-parent")
    sn.prepare("dup-key")
    with pytest.raises(AlreadyExistsError, match="dup-key"):
        sn.prepare("dup-key")
    with pytest.raises(AlreadyExistsError, match="dup-key"):
        sn.view("dup-key")
    with pytest.raises(InvalidArgumentError, match="dup-key"):
        sn.prepare("on-active", "dup-key")  # a parent must be committed
    sn.commit("done", "dup-key")
    with pytest.raises(FailedPreconditionError, match="done"):
        sn.commit("again", "done")
    with pytest.raises(FailedPreconditionError, match="done"):
        sn.mounts("done")
    sn.view("v", "done")
    with pytest.raises(FailedPreconditionError, match="v"):
        sn.commit("vv", "v")
    sn.prepare("other")
    with pytest.raises(AlreadyExistsError, match="done"):
        sn.commit("done", "other")
    with pytest.raises(NotFoundError, match="nope"):
        sn.commit("z", "nope")
    with pytest.raises(NotFoundError, match="nope"):
        sn.mounts("nope")
    with pytest.raises(InvalidArgumentError):
        sn.prepare("")
    if isinstance(sn, LocalSnapshotter):  # the proxy's directories are the daemon's
        # Failed prepares leave no directories behind.
        assert all(d.isdigit() for d in snapshot_dirs(root, sn.name))
        assert len(snapshot_dirs(root, sn.name)) == len(list(sn.walk()))
    sn.close()
    with pytest.raises(FailedPreconditionError, match="closed"):
        sn.stat("done")


@not_for(OWN_PROXY, ONE_KEY_SPACE)
def test_namespaces_are_separate(sn: LocalSnapshotter, root: Path, db: MetadataDB,
                                 request: pytest.FixtureRequest) -> None:
    if sn.name == PROXY:  # stargz ignores the namespace header: the client's namespaced keys separate them
        other: Any = request.getfixturevalue("stargz_daemon").snapshotter(namespace="other", namespaced_keys=True)
    else:
        other = _open(sn.name, root, db, "other")
    sn.prepare("base-k")
    sn.commit("base", "base-k", {"ns": "default"})
    other.prepare("base-k")
    other.commit("base", "base-k", {"ns": "other"})
    sn.prepare("k", "base", labels={"ns": "default"})
    other.prepare("k", "base", labels={"ns": "other"})
    if isinstance(sn, LocalSnapshotter):
        assert sn.snapshot_dir("k") != other.snapshot_dir("k")
    assert dict(other.stat("k").labels) == {"ns": "other"}
    assert other.stat("k").parent == "base"
    assert [i.key for i in other.walk("parent==base")] == ["k"]
    sn.remove("k")
    assert [i.key for i in other.walk()] == ["base", "k"]
    assert [i.key for i in sn.walk()] == ["base"]
    with pytest.raises(NotFoundError):
        sn.stat("k")


@local_only(LOCAL_DIRS)
def test_reopen_sees_same_snapshots(sn: LocalSnapshotter, root: Path) -> None:
    _commit_tree(sn, root, "base", {"a/b": "persisted"})
    sn.prepare("work", "base")
    fresh_db = MetadataDB(root / "meta.db")
    again = _open(sn.name, root, fresh_db)
    assert again.stat("base").kind is Kind.COMMITTED
    assert again.mounts("work") == sn.mounts("work")
    with mounted(again, "work", root) as mnt:
        assert (mnt / "a/b").read_text() == "persisted"
    fresh_db.close()


# --- concurrency and crash safety --------------------------------------------------------------------------

RACER = textwrap.dedent(
    """
    import os, sys, time
    from cargohold.errors import AlreadyExistsError
    from cargohold.metadata.db import MetadataDB
    from cargohold.snapshots import open_snapshotter
    name, root, go, parent = sys.argv[1:5]
    sn = open_snapshotter(name, root, MetadataDB(os.path.join(root, "meta.db")))
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        sn.prepare("same", parent)
        print("ok")
    except AlreadyExistsError as exc:
        print("exists:", exc)
    """
)


@local_only(LOCAL_DIRS)
def test_processes_preparing_same_key_one_wins(sn: LocalSnapshotter, root: Path) -> None:
    # A parent with some files makes the native copy slow enough for all racers to pass the first check.
    _commit_tree(sn, root, "parent", {f"d{i // 50}/f{i}": str(i) for i in range(400)})
    go = root / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, sn.name, str(root), str(go), "parent"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(out.strip())
    assert sorted(r.split(":")[0] for r in results) == ["exists", "exists", "exists", "ok"]
    assert all("same" in r for r in results if r.startswith("exists"))
    assert [i.key for i in sn.walk()] == ["parent", "same"]
    assert snapshot_dirs(root, sn.name) == sorted(
        [sn.snapshot_dir("parent").name, sn.snapshot_dir("same").name]
    )
    with mounted(sn, "same", root) as mnt:
        assert (mnt / "d7/f399").read_text() == "399"


def test_threads_prepare_in_parallel(sn: LocalSnapshotter, root: Path) -> None:
    _commit_tree(sn, root, "parent", {f"f{i}": str(i) for i in range(100)})
    keys = [f"k{i}" for i in range(6)] + ["dup"] * 4
    with ThreadPoolExecutor(max_workers=len(keys)) as pool:
        futures = [pool.submit(sn.prepare, key, "parent") for key in keys]
    outcomes = [type(f.exception()).__name__ if f.exception() else "ok" for f in futures]
    assert outcomes[:6] == ["ok"] * 6
    assert sorted(outcomes[6:]) == ["AlreadyExistsError"] * 3 + ["ok"]
    assert [i.key for i in sn.walk("kind==active")] == sorted(["dup", *keys[:6]])
    if isinstance(sn, LocalSnapshotter):  # the proxy's directories are the daemon's
        ids = {sn.snapshot_dir(k).name for k in [*keys[:6], "dup", "parent"]}
        assert len(ids) == 8 and set(snapshot_dirs(root, sn.name)) == ids
    with mounted(sn, "k5", root) as mnt:
        assert (mnt / "f99").read_text() == "99"


PREPARER = textwrap.dedent(
    """
    import os, sys
    from cargohold.metadata.db import MetadataDB
    from cargohold.snapshots import open_snapshotter
    name, root = sys.argv[1:3]
    sn = open_snapshotter(name, root, MetadataDB(os.path.join(root, "meta.db")))
    sn.prepare("victim", "parent")
    """
)


def test_killed_prepare_leaves_no_snapshot(root: Path, db: MetadataDB) -> None:
    # native: its prepare has a slow step (the copy) to be killed in; overlay's is a few mkdirs.
    sn = _open("native", root, db)
    files = {f"d{i // 100}/f{i}": "x" * 10 for i in range(2000)}
    _commit_tree(sn, root, "parent", files)
    snapdir = root / "snapshots" / sn.name / "snapshots"
    proc = subprocess.Popen([sys.executable, "-c", PREPARER, sn.name, str(root)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not any(n.startswith("tmp-") for n in os.listdir(snapdir)):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # Hold the DB write lock so the preparer cannot reach its final transaction, then kill it.
    with db.transaction():
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    with pytest.raises(NotFoundError, match="victim"):
        sn.stat("victim")
    # A new instance cleans up the scratch dir once nobody (not even an orphaned `cp`) holds it.
    deadline = time.monotonic() + 30
    while any(not n.isdigit() for n in snapshot_dirs(root, sn.name)):
        assert time.monotonic() < deadline, snapshot_dirs(root, sn.name)
        _open(sn.name, root, db)
        time.sleep(0.05)
    assert snapshot_dirs(root, sn.name) == [sn.snapshot_dir("parent").name]
    sn.prepare("victim", "parent")
    with mounted(sn, "victim", root) as mnt:
        assert len([f for _, _, fs in os.walk(mnt) for f in fs]) == len(files)


@local_only(LOCAL_DIRS)
def test_open_removes_orphans_but_not_live_scratch(sn: LocalSnapshotter, root: Path, db: MetadataDB) -> None:
    from cargohold.snapshots.dirs import Scratch

    sn.prepare("kept")
    snapdir = root / "snapshots" / sn.name / "snapshots"
    (snapdir / "999" / "fs").mkdir(parents=True)  # no row: crash between rename and commit
    (snapdir / "tmp-dead" / "fs").mkdir(parents=True)  # nobody holds it: its creator died
    (snapdir / "rm-dead").mkdir()
    live = Scratch.create(snapdir, "tmp")  # held by "another process" (a different open file)
    try:
        _open(sn.name, root, db)
        assert snapshot_dirs(root, sn.name) == sorted([sn.snapshot_dir("kept").name, live.path.name])
    finally:
        live.remove()
        live.close()
    assert (sn.snapshot_dir("kept") / "fs").is_dir()


# --- copying and layer contents ----------------------------------------------------------------------------


def _make_special_tree(mnt: Path) -> bool:
    """Write every kind of file and metadata a layer can carry; returns whether user xattrs work."""
    os.chmod(mnt, 0o711)
    (mnt / "a").write_text("data")
    os.link(mnt / "a", mnt / "hl")
    user_xattrs = True
    try:
        os.setxattr(mnt / "a", "user.note", b"hello")
    except OSError as exc:
        if exc.errno != errno.ENOTSUP:
            raise
        user_xattrs = False
    os.setxattr(mnt / "a", "trusted.cargohold", b"secret")
    os.utime(mnt / "a", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    (mnt / "owned").write_text("mine")
    os.chown(mnt / "owned", 1000, 1000)
    (mnt / "suid").write_text("#!/bin/sh\n")
    os.chown(mnt / "suid", 0, 0)
    os.chmod(mnt / "suid", 0o4755)
    os.symlink("a", mnt / "rel-link")
    os.symlink("/etc/passwd", mnt / "abs-link")
    os.lchown(mnt / "abs-link", 1000, 1000)
    os.mkfifo(mnt / "fifo", 0o640)
    os.mknod(mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (mnt / "sticky").mkdir()
    os.chmod(mnt / "sticky", 0o1777)
    os.utime(mnt / "sticky", ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    return user_xattrs


def _meta(path: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for rel in ["", *sorted(tree(path))]:
        p = path / rel
        st = os.lstat(p)
        xattrs = {}
        if not stat.S_ISLNK(st.st_mode):
            xattrs = {n: os.getxattr(p, n) for n in sorted(os.listxattr(p)) if not n.startswith("security.")}
        mtime = st.st_mtime_ns if rel != "" else None  # the root's mtime moves with every write in it
        nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink  # overlay reports 1 for merged dirs
        out[rel or "."] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, nlink, mtime, xattrs)
    return out


def test_child_preserves_file_metadata(sn: LocalSnapshotter, root: Path) -> None:
    sn.prepare("p")
    with mounted(sn, "p", root) as mnt:
        user_xattrs = _make_special_tree(mnt)
        expected = _meta(mnt)
    # stargz, like containerd 1.6's overlay snapshotter, creates a child's upper dir 0755 (only the owner is
    # copied from the parent), so its merged root does not keep the parent's mode; everything else must match.
    root_mode = 0o755 if sn.name == PROXY else 0o711
    expected["."] = (stat.S_IFDIR | root_mode, *expected["."][1:])
    sn.commit("P", "p")
    sn.prepare("c", "P")
    with mounted(sn, "c", root) as mnt:
        got = _meta(mnt)
        assert got == expected
        a, hl = os.lstat(mnt / "a"), os.lstat(mnt / "hl")
        assert (a.st_ino, a.st_nlink) == (hl.st_ino, 2)
        assert stat.S_IMODE(os.lstat(mnt / "suid").st_mode) == 0o4755
        assert os.lstat(mnt / "owned").st_uid == 1000 and os.lstat(mnt / "owned").st_gid == 1000
        assert os.readlink(mnt / "rel-link") == "a" and os.readlink(mnt / "abs-link") == "/etc/passwd"
        assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
        assert os.lstat(mnt / "null").st_rdev == os.makedev(1, 3)
        assert os.getxattr(mnt / "a", "trusted.cargohold") == b"secret"
        if user_xattrs:
            assert os.getxattr(mnt / "a", "user.note") == b"hello"
        assert stat.S_IMODE(os.stat(mnt).st_mode) == root_mode
        # Writing in the child does not show through to the parent.
        (mnt / "a").write_text("changed")
    if sn.name == "native":
        child_fs, parent_fs = sn.snapshot_dir("c") / "fs", sn.snapshot_dir("P") / "fs"
        assert os.lstat(child_fs / "a").st_ino != os.lstat(parent_fs / "a").st_ino  # a real copy
        assert (parent_fs / "a").read_text() == "data"
        assert (child_fs / "hl").read_text() == "changed"  # still one file in the copy


def test_overlay_upper_dir_holds_exactly_what_was_written(root: Path, db: MetadataDB) -> None:
    sn = _open("overlayfs", root, db)
    assert isinstance(sn, OverlaySnapshotter)
    files = {"etc/os-release": "ID=test\n", "usr/bin/app": "binary", "empty": ""}
    _commit_tree(sn, root, "layer", files)
    upper = sn.upper_dir("layer")
    assert upper == sn.snapshot_dir("layer") / "fs"
    written = {k: "file:" + v for k, v in files.items()}
    assert tree(upper) == {"etc": "dir", "usr": "dir", "usr/bin": "dir"} | written

    # The unpacker's path: write straight into an active snapshot's upper dir, no mount, then commit.
    sn.prepare("unpacking", "layer")
    up = sn.upper_dir("unpacking")
    (up / "added").write_text("from a layer")
    os.mknod(up / "empty", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # whiteout
    sn.commit("layer2", "unpacking")
    sn.view("check", "layer2")
    with mounted(sn, "check", root) as mnt:
        assert (mnt / "added").read_text() == "from a layer"
        assert not (mnt / "empty").exists()
        assert (mnt / "etc/os-release").read_text() == "ID=test\n"
    with pytest.raises(NotFoundError, match="nope"):
        sn.upper_dir("nope")


def test_overlay_rebase_on_commit(root: Path, db: MetadataDB) -> None:
    sn = _open("overlayfs", root, db)
    assert isinstance(sn, OverlaySnapshotter) and "rebase" in sn.capabilities
    # Both layers are prepared without a parent and filled at once, as the parallel unpacker does.
    sn.prepare("l1", labels={"layer": "1"})
    sn.prepare("l2")
    (sn.upper_dir("l1") / "base").write_text("from l1")
    (sn.upper_dir("l1") / "shadowed").write_text("old")
    (sn.upper_dir("l2") / "shadowed").write_text("new")
    os.mknod(sn.upper_dir("l2") / "base", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    with pytest.raises(InvalidArgumentError, match="l1"):
        sn.commit("L2", "l2", parent="l1")  # the parent must be committed first
    sn.commit("L1", "l1", {"layer": "1"})
    with pytest.raises(NotFoundError, match="missing"):
        sn.commit("L2", "l2", parent="missing")
    sn.commit("L2", "l2", parent="L1")
    assert sn.stat("L2").parent == "L1"
    sn.view("v", "L2")
    with mounted(sn, "v", root) as mnt:
        assert tree(mnt) == {"shadowed": "file:new"}
    with pytest.raises(FailedPreconditionError, match="L1"):
        sn.remove("L1")

    native = _open("native", root, db)
    assert "rebase" not in native.capabilities
    native.prepare("n")
    with pytest.raises(InvalidArgumentError, match="native snapshotter cannot rebase"):
        native.commit("N", "n", parent="")
    assert native.stat("n").kind is Kind.ACTIVE


# --- overlay specifics and mount helpers -------------------------------------------------------------------


def test_overlay_long_lowerdir_mounts(root: Path, db: MetadataDB) -> None:
    deep = root / ("long-" + "x" * 200) / ("y" * 200)
    sn = _open("overlayfs", deep, db)
    assert isinstance(sn, OverlaySnapshotter)
    cwd = os.getcwd()
    parent = ""
    for i in range(16):
        sn.prepare(f"l{i}-a", parent)
        (sn.upper_dir(f"l{i}-a") / f"layer{i}").write_text(str(i))
        sn.commit(f"l{i}", f"l{i}-a")
        parent = f"l{i}"
    mounts = sn.prepare("top", parent)
    assert len(",".join(mounts[0].options)) > 4096  # too long to pass to mount(2) as is
    with with_temp_mount(mounts, root=root / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == sorted(f"layer{i}" for i in range(16))
        assert (mnt / "layer0").read_text() == "0"
        (mnt / "top-file").write_text("top")
    assert (sn.upper_dir("top") / "top-file").read_text() == "top"
    sn.view("all", parent)
    with with_temp_mount(sn.mounts("all"), root=root / "mnt") as mnt:
        assert len(os.listdir(mnt)) == 16
    assert os.getcwd() == cwd  # the mount thread's chdir did not move the process


def test_mount_data_too_long_is_a_clear_error(root: Path) -> None:
    lowers = ":".join(f"/{i:03d}{'z' * 250}/fs" for i in range(20))  # nothing in common to shorten
    with pytest.raises(InvalidArgumentError, match="overlay options are .* bytes"):
        mount_all([Mount(type="overlay", source="overlay", options=(f"lowerdir={lowers}",))], root)
    with pytest.raises(InvalidArgumentError, match="over the limit"):
        mount_all([Mount(type="tmpfs", source="tmpfs", options=("x" * 5000,))], root)
    assert not mounts_under(root)


def test_overlay_support_probe(root: Path) -> None:
    assert overlay_supported(root / "ok")
    assert default_snapshotter_name(root / "ok") == "overlayfs"
    # An overlay cannot have its upper dir on another overlay: the probe must notice.
    for d in ("l", "u", "w", "m"):
        (root / d).mkdir()
    ovl = Mount(
        type="overlay",
        source="overlay",
        options=(f"lowerdir={root / 'l'}", f"upperdir={root / 'u'}", f"workdir={root / 'w'}"),
    )
    mount_all([ovl], root / "m")
    try:
        assert not overlay_supported(root / "m" / "root")
        assert default_snapshotter_name(root / "m" / "root") == "native"
    finally:
        unmount(root / "m")
    assert not mounts_under(root)


def test_with_temp_mount_and_mount_targets(root: Path) -> None:
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_text("bound")
    other = root / "other"
    other.mkdir()
    (other / "g").write_text("nested")
    mounts = [
        Mount(type="bind", source=str(src), options=("rbind", "ro")),
        Mount(type="bind", source=str(other), target="sub", options=("rbind", "rw")),
    ]
    with with_temp_mount(mounts, root=root / "mnt") as mnt:
        assert len(mounts_under(mnt)) == 2
        assert (mnt / "f").read_text() == "bound"
        assert (mnt / "sub" / "g").read_text() == "nested"
        with pytest.raises(OSError) as exc:
            (mnt / "new").write_text("x")
        assert exc.value.errno == errno.EROFS
        (mnt / "sub" / "written").write_text("rw")
        point = mnt
    assert not point.exists()
    assert not mounts_under(root)
    assert (other / "written").read_text() == "rw"
    # A failing mount in the list undoes the ones before it.
    bad = [mounts[0], Mount(type="bind", source=str(root / "missing"), target="sub", options=("rbind",))]
    target = root / "t"
    target.mkdir()
    with pytest.raises(FailedPreconditionError, match="missing"):
        mount_all(bad, target)
    assert not mounts_under(target)
    unmount(target)  # nothing mounted: not an error


def test_usage_type_and_registry(root: Path, db: MetadataDB) -> None:
    assert Usage() == Usage(size=0, inodes=0)
    with pytest.raises(InvalidArgumentError, match="unknown snapshotter 'zfs'"):
        open_snapshotter("zfs", root, db)
    native = open_snapshotter("native", root, db)
    assert isinstance(native, Snapshotter)
    assert native.name == "native" and native.remote is False
    assert known_snapshotters() == ["native", "overlayfs"]
    assert available_snapshotters(root) == (
        ["native", "overlayfs"] if overlay_supported(root) else ["native"]
    )
