"""``cargohold serve snapshots``: cargohold's snapshotters served to Debian's real containerd 1.6 as a proxy plugin
(a private containerd with root, state and socket under a temp dir), plus the server's own behaviour: status
codes, namespaces, SIGTERM with a call in flight, a socket already served, a client gone mid-stream."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from tests.treeutil import inode_groups, read_tree

from cargohold.devtools import samples
from cargohold.devtools.containerd import containerd
from cargohold.devtools.registry import RegistryProcess, start_registry
from cargohold.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError, UnavailableError
from cargohold.metadata.db import MetadataDB
from cargohold.snapshots import SNAPSHOTTERS, Kind, Mount, NativeSnapshotter, open_snapshotter, overlay_supported
from cargohold.snapshots.proto import snapshots_pb2, snapshots_pb2_grpc
from cargohold.snapshots.proxy import NAMESPACE_HEADER, ProxySnapshotter
from cargohold.snapshots.server import SnapshotsServer, serve
from support.cli import cargohold_cmd, cli
from support.stargz import mounts_under
from support_layers import d, f, hardlink, make_layer, opaque, symlink, whiteout

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="snapshots are mounted: needs root"),
]
needs_containerd = pytest.mark.skipif(not (shutil.which("containerd") and shutil.which("ctr")),
                                      reason="needs containerd and ctr (Debian package containerd)")
PLUGIN = "cargohold"


# --- helpers ---------------------------------------------------------------------------------------------


def run(*cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def chain_ids(diff_ids: list[str]) -> list[str]:
    """containerd's (OCI's) ChainIDs of a layer stack: the snapshot names an unpack commits."""
    out = [diff_ids[0]]
    for diff in diff_ids[1:]:
        out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff}".encode()).hexdigest())
    return out


def diff_ids(image: samples.SampleImage) -> list[str]:
    return [str(i) for i in image.diff_ids]


def ctr_snapshots(ctr: list[str]) -> dict[str, tuple[str, str]]:
    """``ctr snapshots ls`` of the plugin: key -> (parent, kind)."""
    rows = run(*ctr, "snapshots", "--snapshotter", PLUGIN, "ls").splitlines()[1:]
    out: dict[str, tuple[str, str]] = {}
    for row in rows:
        parts = row.split()
        key, parent, kind = (parts[0], "", parts[1]) if len(parts) == 2 else parts
        out[key] = (parent, kind)
    return out


def listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def whiteout_hardlink_image() -> samples.SampleImage:
    """A base layer with a hardlink and a symlink, and a layer that whites out a file, makes a directory opaque
    and adds hardlinks of its own. Each hardlink entry carries its target's mode: containerd's applier chmods
    the shared inode to the link entry's mode (cargohold keeps the target's), a difference of the differ, not
    of the snapshotter under test."""
    bottom = make_layer([
        d("bin"), f("bin/sh", b"#!/bin/true\n", mode=0o755), hardlink("bin/busybox", "bin/sh", mode=0o755),
        d("etc"), f("etc/hostname", b"sample\n"), f("etc/os-release", b"NAME=sample\n"),
        d("tmp", mode=0o1777), d("usr"), d("usr/bin"), symlink("usr/bin/env", "../../bin/sh"),
    ])
    top = make_layer([
        whiteout("etc/hostname"),
        d("usr/bin"), opaque("usr/bin"), f("usr/bin/tool", b"tool\n", mode=0o755),
        d("srv"), f("srv/a", b"shared inode\n"), hardlink("srv/b", "srv/a"), hardlink("srv/c", "srv/a"),
        symlink("srv/link", "a"),
    ])
    return samples.build_image([bottom, top])


def served_snapshots(served: Served) -> list[dict[str, Any]]:
    """``cargohold -n containerd snapshots ls`` of the served root: what containerd made through the plugin."""
    out = cli(served.root, "-n", "containerd", "snapshots", "--snapshotter", served.snapshotter, "ls", "-o", "json")
    return list(json.loads(out.stdout))


def small_image(n: int) -> samples.SampleImage:
    return samples.build_image([samples.small_base_layer(), samples.files_layer({f"etc/n{n}": str(n).encode()})])


class Served:
    """A real ``cargohold serve snapshots`` process (restartable)."""

    def __init__(self, root: Path, sock: Path, snapshotter: str, log: Path) -> None:
        self.root, self.sock, self.snapshotter, self.log = root, sock, snapshotter, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cargohold_cmd(self.root, "serve", "snapshots", "--snapshotter",
                                                       self.snapshotter, "--socket", str(self.sock)),
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not listening(self.sock):
            assert self.proc.poll() is None, f"serve snapshots exited {self.proc.returncode}: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"serve snapshots did not listen: {self.log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.proc = None
        return code


@pytest.fixture(scope="module")
def reg() -> Iterator[RegistryProcess]:
    base = Path(tempfile.mkdtemp(prefix="ch-snreg-"))
    try:
        with start_registry(base) as registry:
            yield registry
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A short directory (socket paths are limited to 107 bytes); every mount under it is undone at the end."""
    path = Path(tempfile.mkdtemp(prefix="ch-sn-"))
    yield path
    for point in reversed(mounts_under(path)):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def served(base: Path) -> Iterator[Served]:
    name = "overlayfs" if overlay_supported(base) else "native"
    server = Served(base / "root", base / "sn.sock", name, base / "serve.log")
    server.start()
    yield server
    if server.proc is not None:
        server.stop()


@pytest.fixture(scope="module")
def ctr(base: Path, served: Served) -> Iterator[list[str]]:
    """``ctr`` on a private containerd with cargohold's server as the proxy snapshotter ``cargohold``."""
    cbase = base / "c"
    cbase.mkdir()
    with containerd(cbase, base / "containerd.log", proxy_plugins={PLUGIN: served.sock}) as (sock, _):
        yield ["ctr", "--address", sock]


def fresh_ns(ctr: list[str]) -> list[str]:
    return [*ctr, "-n", f"t{uuid.uuid4().hex[:8]}"]


# --- containerd 1.6 interop ------------------------------------------------------------------------------


@needs_containerd
def test_ctr_plugins_ls_shows_the_proxy_snapshotter(ctr: list[str]) -> None:
    rows = [r.split() for r in run(*ctr, "plugins", "ls").splitlines()]
    assert ["io.containerd.snapshotter.v1", PLUGIN, "-", "ok"] in rows


@needs_containerd
def test_pull_unpacks_through_the_plugin_and_mounts_the_same_tree_as_rootfs(
        ctr: list[str], served: Served, reg: RegistryProcess, base: Path) -> None:
    image = whiteout_hardlink_image()
    samples.push(reg.url, "wh", "v1", image)
    ref = f"{reg.host}/wh:v1"
    ns = fresh_ns(ctr)
    run(*ns, "images", "pull", "--plain-http", "--snapshotter", PLUGIN, ref)

    lower, top = chain_ids(diff_ids(image))
    assert ctr_snapshots(ns) == {lower: ("", "Committed"), top: (lower, "Committed")}
    # The same snapshots, as cargohold's CLI sees them: containerd's keys (NS/ID/NAME) stored as given.
    listed = served_snapshots(served)
    namespace = ns[-1]
    ours = {i["key"]: i for i in listed if i["key"].startswith(namespace + "/")}
    (top_key,) = [k for k in ours if k.endswith("/" + top)]
    (lower_key,) = [k for k in ours if k.endswith("/" + lower)]
    assert ours[top_key]["parent"] == lower_key and ours[top_key]["kind"] == "Committed"
    assert ours[lower_key]["parent"] == ""

    # The top snapshot's mounts, really mounted, give the tree `cargohold rootfs` writes.
    run(*ns, "snapshots", "--snapshotter", PLUGIN, "view", "wh-view", top)
    mnt = base / "mnt-wh"
    mnt.mkdir()
    lines = run(*ns, "snapshots", "--snapshotter", PLUGIN, "mounts", str(mnt), "wh-view").splitlines()
    assert lines and all(ln.startswith("mount -t ") for ln in lines), lines
    for line in lines:
        subprocess.run(line, shell=True, check=True, timeout=30)
    try:
        got, got_links = read_tree(mnt), inode_groups(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    expected_dir = base / "rootfs-wh"
    cli(base / "other", "--plain-http", "pull", ref)
    cli(base / "other", "rootfs", ref, str(expected_dir))
    assert got == read_tree(expected_dir)
    assert "etc/hostname" not in got and "usr/bin/env" not in got and "srv/link" in got
    assert sorted(map(sorted, got_links)) == sorted(map(sorted, inode_groups(expected_dir)))
    assert {"srv/a", "srv/b", "srv/c"} in got_links
    cli(base / "other", "rm-rootfs", str(expected_dir))
    # ctr made the view under a lease it dropped when it exited: containerd's own GC may have removed the view
    # through the plugin meanwhile (its scheduler decides when), which is as good as removing it here.
    gone = subprocess.run([*ns, "snapshots", "--snapshotter", PLUGIN, "rm", "wh-view"], capture_output=True,
                          text=True, timeout=60)
    assert gone.returncode == 0 or "does not exist" in gone.stderr, gone.stderr


@needs_containerd
def test_image_removal_and_gc_remove_the_snapshots_through_the_plugin(
        ctr: list[str], served: Served, reg: RegistryProcess) -> None:
    image = small_image(1)
    samples.push(reg.url, "gc", "v1", image)
    ref = f"{reg.host}/gc:v1"
    ns = fresh_ns(ctr)
    # cargohold's own image in the same root (its default namespace): containerd's GC must never see it.
    own = small_image(4)
    samples.push(reg.url, "own", "v1", own)
    cli(served.root, "--plain-http", "pull", "--snapshotter", served.snapshotter, f"{reg.host}/own:v1")
    own_chain = chain_ids(diff_ids(own))
    dirs = served.root / "snapshots" / served.snapshotter / "snapshots"
    before = set(os.listdir(dirs))
    run(*ns, "images", "pull", "--plain-http", "--snapshotter", PLUGIN, ref)
    assert len(ctr_snapshots(ns)) == 2
    assert len(set(os.listdir(dirs)) - before) == 2

    run(*ns, "images", "rm", "--sync", ref)  # --sync: containerd's GC has run when it returns
    assert ctr_snapshots(ns) == {}
    assert not [i["key"] for i in served_snapshots(served) if i["key"].startswith(ns[-1] + "/")]
    assert set(os.listdir(dirs)) == before, "GC left snapshot directories behind, or took others"
    kept = json.loads(cli(served.root, "snapshots", "--snapshotter", served.snapshotter, "ls", "-o", "json").stdout)
    assert [i["key"] for i in kept] == sorted(own_chain)


@needs_containerd
def test_restarting_the_server_under_a_running_containerd(ctr: list[str], served: Served,
                                                           reg: RegistryProcess) -> None:
    image = small_image(2)
    samples.push(reg.url, "restart", "v1", image)
    ref = f"{reg.host}/restart:v1"
    ns = fresh_ns(ctr)
    run(*ns, "images", "pull", "--plain-http", "--snapshotter", PLUGIN, ref)
    expected = ctr_snapshots(ns)

    assert served.stop() == 0
    assert not served.sock.exists()  # removed on SIGTERM
    assert "stopped" in served.log.read_text()
    down = subprocess.run([*ns, "snapshots", "--snapshotter", PLUGIN, "ls"], capture_output=True, text=True)
    assert down.returncode != 0

    served.start()
    deadline = time.monotonic() + 15  # containerd's proxy reconnects with a backoff of at most a few seconds
    while True:
        again = subprocess.run([*ns, "snapshots", "--snapshotter", PLUGIN, "ls"], capture_output=True, text=True)
        if again.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.returncode == 0, again.stderr
    assert ctr_snapshots(ns) == expected
    image2 = small_image(3)
    samples.push(reg.url, "restart", "v2", image2)
    run(*ns, "images", "pull", "--plain-http", "--snapshotter", PLUGIN, f"{reg.host}/restart:v2")
    assert chain_ids(diff_ids(image2))[-1] in ctr_snapshots(ns)


@needs_containerd
def test_a_socket_another_process_serves_is_refused(served: Served, base: Path) -> None:
    proc = cli(base / "second", "serve", "snapshots", "--snapshotter", "native", "--socket", str(served.sock),
               check=False, timeout=30)
    assert proc.returncode != 0
    assert f"cargohold: error: socket {served.sock}: another process is serving on it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert listening(served.sock)  # the first server is untouched


# --- the server on its own -------------------------------------------------------------------------------


@pytest.fixture
def short(tmp_path: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ch-sns-"))
    yield path
    for point in reversed(mounts_under(path)):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _stub(server: SnapshotsServer) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(server.address)
    return channel, snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]


def _code(call: Any, *args: Any, namespace: str = "default") -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        reply = call(*args, metadata=((NAMESPACE_HEADER, namespace),), timeout=10)
        if hasattr(reply, "__next__"):  # a server stream fails when read
            list(reply)
    return exc.value.code()  # type: ignore[no-any-return, attr-defined]


def test_errors_map_to_the_codes_containerd_reads_back(short: Path) -> None:
    name = "overlayfs" if overlay_supported(short) else "native"
    with SnapshotsServer(name, short / "root", short / "s.sock") as server:
        channel, stub = _stub(server)
        md = ((NAMESPACE_HEADER, "default"),)
        with channel:
            assert _code(stub.Stat, snapshots_pb2.StatSnapshotRequest(key="nope")) is grpc.StatusCode.NOT_FOUND
            stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="a", labels={"containerd.io/snapshot.ref": "x"}),
                         metadata=md)
            assert _code(stub.Prepare, snapshots_pb2.PrepareSnapshotRequest(key="a")) is \
                grpc.StatusCode.ALREADY_EXISTS
            assert _code(stub.Prepare, snapshots_pb2.PrepareSnapshotRequest(key="")) is \
                grpc.StatusCode.INVALID_ARGUMENT
            # One key space whatever the header (containerd's keys carry its namespace; its GC sends none).
            assert len(stub.Mounts(snapshots_pb2.MountsRequest(key="a"), metadata=((NAMESPACE_HEADER, "other"),)
                                   ).mounts) == 1
            assert len(stub.Mounts(snapshots_pb2.MountsRequest(key="a")).mounts) == 1
            info = stub.Stat(snapshots_pb2.StatSnapshotRequest(key="a"), metadata=md).info
            assert (info.kind, dict(info.labels)) == (snapshots_pb2.ACTIVE, {"containerd.io/snapshot.ref": "x"})
            stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="A", key="a"), metadata=md)
            stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="b", parent="A"), metadata=md)
            assert _code(stub.Remove, snapshots_pb2.RemoveSnapshotRequest(key="A")) is \
                grpc.StatusCode.FAILED_PRECONDITION
            assert _code(stub.Mounts, snapshots_pb2.MountsRequest(key="A")) is grpc.StatusCode.FAILED_PRECONDITION
            assert _code(stub.List, snapshots_pb2.ListSnapshotsRequest(filters=["kind=="])) is \
                grpc.StatusCode.INVALID_ARGUMENT
            # Commit's parent (containerd 2.x rebase): overlayfs re-parents, native refuses.
            stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="c"), metadata=md)
            commit = snapshots_pb2.CommitSnapshotRequest(name="C", key="c", parent="A")
            if name == "overlayfs":
                stub.Commit(commit, metadata=md)
                assert stub.Stat(snapshots_pb2.StatSnapshotRequest(key="C"), metadata=md).info.parent == "A"
            else:
                assert _code(stub.Commit, commit) is grpc.StatusCode.INVALID_ARGUMENT


def test_snapshots_are_shared_with_the_local_snapshotter(short: Path) -> None:
    root = short / "root"
    with SnapshotsServer("native", root, short / "s.sock") as server:
        proxy = ProxySnapshotter("t", str(server.socket_path), namespace="ns1")
        try:
            proxy.prepare("ns1/1/over-grpc", labels={"containerd.io/snapshot/x": "y"})
            db = MetadataDB(root / "metadata.db")
            local = open_snapshotter("native", root, db, "containerd")
            local.prepare("made-locally")
            assert [i.key for i in proxy.walk()] == ["made-locally", "ns1/1/over-grpc"]
            assert local.stat("ns1/1/over-grpc").labels == {"containerd.io/snapshot/x": "y"}
            local.close()
            db.close()
        finally:
            proxy.close()
    listed = cli(root, "--namespace", "containerd", "snapshots", "--snapshotter", "native", "ls").stdout
    assert "ns1/1/over-grpc" in listed and "made-locally" in listed


def test_a_client_gone_mid_list_stream_is_survived(short: Path) -> None:
    with SnapshotsServer("native", short / "root", short / "s.sock", list_batch=1) as server:
        proxy = ProxySnapshotter("t", str(server.socket_path), namespace="default")
        try:
            for i in range(6):
                proxy.prepare(f"k{i}")
            for how in ("cancel", "close"):
                channel, stub = _stub(server)
                stream = stub.List(snapshots_pb2.ListSnapshotsRequest(), metadata=((NAMESPACE_HEADER, "default"),))
                assert len(next(stream).info) == 1
                if how == "cancel":
                    stream.cancel()
                channel.close()
            assert [i.key for i in proxy.walk()] == [f"k{i}" for i in range(6)]
        finally:
            proxy.close()
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert not (short / "s.sock").exists()


def test_a_stale_socket_is_replaced(short: Path) -> None:
    stale = short / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))  # a socket file nobody listens on, as a killed server leaves it
    sock.close()
    with SnapshotsServer("native", short / "root", stale) as server:
        with pytest.raises(AlreadyExistsError, match="another process is serving"):
            SnapshotsServer("native", short / "root2", stale).start()
        proxy = ProxySnapshotter("t", str(server.socket_path), namespace="default")
        proxy.prepare("k")
        assert proxy.stat("k").kind is Kind.ACTIVE
        proxy.close()


def test_sigterm_lets_a_call_in_flight_finish_and_removes_the_socket(short: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()

    class GatedNative(NativeSnapshotter):
        """The native snapshotter, whose prepare waits until the test lets it go on."""

        def prepare(self, key: str, parent: str = "", labels: Any = None) -> list[Mount]:
            entered.set()
            release.wait(10)
            return super().prepare(key, parent, labels)

    monkeypatch.setitem(SNAPSHOTTERS, "gated", GatedNative)
    sock = short / "s.sock"
    results: dict[str, Any] = {}

    def drive(server: SnapshotsServer) -> None:
        client = ProxySnapshotter("t", str(server.socket_path), namespace="default", timeout=5)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.prepare, "in-flight")
            entered.wait(10)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.5)  # serve() notices the signal within 0.5 s and stops taking calls
            try:
                client.stat("in-flight")
            except UnavailableError as exc:  # stopping: no new calls
                results["late"] = exc
            release.set()
            results["mounts"] = pending.result(timeout=10)
        client.close()

    serve("gated", short / "root", sock, grace=10,
          ready=lambda server: threading.Thread(target=drive, args=(server,), daemon=True).start())
    assert results["mounts"] and "late" in results
    assert not sock.exists()
    db = MetadataDB(short / "root" / "metadata.db")
    try:
        assert open_snapshotter("native", short / "root", db, "containerd").stat("in-flight").key == "in-flight"
    finally:
        db.close()


def test_proxy_commit_with_parent_rebases_only_when_configured(short: Path) -> None:
    if not overlay_supported(short):
        pytest.skip(f"overlay mounts do not work under {short}")
    with SnapshotsServer("overlayfs", short / "root", short / "s.sock") as server:
        plain = ProxySnapshotter("t", str(server.socket_path), namespace="default")
        rebasing = ProxySnapshotter("t", str(server.socket_path), namespace="default", capabilities={"rebase"})
        try:
            plain.prepare("base-active")
            plain.commit("base", "base-active")
            plain.prepare("layer")  # prepared without its parent, chained at commit
            with pytest.raises(InvalidArgumentError, match="commit of snapshot layer with parent base: .* not "
                                                           "configured to rebase"):
                plain.commit("L", "layer", parent="base")
            rebasing.commit("L", "layer", parent="base")
            assert plain.stat("L").parent == "base"
            plain.prepare("other")
            with pytest.raises(NotFoundError, match="parent snapshot missing does not exist"):
                rebasing.commit("O", "other", parent="missing")
        finally:
            plain.close()
            rebasing.close()


def test_cleanup_deletes_directories_no_snapshot_owns(short: Path) -> None:
    with SnapshotsServer("native", short / "root", short / "s.sock") as server:
        proxy = ProxySnapshotter("t", str(server.socket_path), namespace="default")
        try:
            proxy.prepare("kept")
            proxy.prepare("removed")
            proxy.remove("removed")
            dirs = short / "root" / "snapshots" / "native" / "snapshots"
            # What a crash leaves: a removal renamed away but not deleted, a numbered directory without a row.
            (dirs / "rm-0123456789abcdef" / "fs").mkdir(parents=True)
            (dirs / "rm-0123456789abcdef" / "fs" / "data").write_bytes(b"x" * 4096)
            (dirs / "77" / "fs").mkdir(parents=True)
            assert sorted(os.listdir(dirs)) == ["1", "77", "rm-0123456789abcdef"]
            proxy.cleanup()
            assert os.listdir(dirs) == ["1"]
            assert [i.key for i in proxy.walk()] == ["kept"]
        finally:
            proxy.close()
