"""The proxy snapshotter: containerd's snapshots gRPC API, checked on the wire against an in-process server and
end to end against a real stargz remote snapshotter (built once per session from Debian packages), including
pulls into it as a remote snapshotter configured in config.toml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

import support.stargz as stargz_support
from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.errors import (
    AlreadyExistsError,
    CargoholdError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from cargohold.metadata.labels import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    SNAPSHOT_REF,
)
from cargohold.snapshots import Info, Kind, Mount, Snapshotter, Usage, open_proxy_snapshotter, with_temp_mount
from cargohold.snapshots.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from cargohold.snapshots.proxy import ProxySnapshotter
from support.cli import cli
from support.estargz import estargz_image
from support.stargz import (  # noqa: F401 (stargz_binary, stargz_daemon: fixtures)
    StargzDaemon,
    mounts_under,
    running_stargz,
    stargz_binary,
    stargz_daemon,
)

SERVICE = "/containerd.services.snapshots.v1.Snapshots"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the stargz daemon and mounts need root")


# --- on the wire: an in-process server recording what the client sends ------------------------------------


class _Recorder(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.calls.append((details.method, dict(details.invocation_metadata)))  # type: ignore[attr-defined]
        return continuation(details)


# The kind suffix containerd's errdefs leaves on messages.
_SUFFIX = {"NOT_FOUND": "not found", "ALREADY_EXISTS": "already exists", "FAILED_PRECONDITION": "failed precondition",
           "INVALID_ARGUMENT": "invalid argument", "UNAVAILABLE": "unavailable",
           "DEADLINE_EXCEEDED": "context deadline exceeded"}


class _FakeSnapshots(snapshots_pb2_grpc.SnapshotsServicer):
    """Answers from canned data; a key "fail-CODE" aborts with that status code."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.entered = threading.Event()  # a "slow-..." call has arrived
        self.release = threading.Event()  # ... and may answer

    def _check(self, request: Any, context: grpc.ServicerContext, key: str) -> None:
        self.requests.append(request)
        if key.startswith("slow-"):
            self.entered.set()
            self.release.wait(30)
        if key.startswith("fail-"):
            code = grpc.StatusCode[key.removeprefix("fail-")]
            # containerd's errdefs.ToGRPC keeps the error kind as a suffix of the message.
            context.abort(code, f"snapshot {key}: {_SUFFIX.get(code.name, code.name.lower())}")

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC names)
        self._check(request, context, request.key)
        return snapshots_pb2.PrepareSnapshotResponse(mounts=[
            mount_pb2.Mount(type="overlay", source="overlay", target="sub", options=["lowerdir=/a:/b", "ro"]),
        ])

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, request.key)
        return snapshots_pb2.ViewSnapshotResponse(mounts=[mount_pb2.Mount(type="bind", source="/x",
                                                                         options=["ro", "rbind"])])

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, request.key)
        return snapshots_pb2.MountsResponse()

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, request.key)
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, request.key)
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, request.key)
        info = snapshots_pb2.Info(name=request.key, parent="p", kind=snapshots_pb2.VIEW, labels={"a": "1"})
        info.created_at.FromNanoseconds(1_700_000_000_123_456_789)
        info.updated_at.FromNanoseconds(1_700_000_001_000_000_000)
        return snapshots_pb2.StatSnapshotResponse(info=info)

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, request.info.name)
        return snapshots_pb2.UpdateSnapshotResponse(info=request.info)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, "")
        # Two messages, not in key order, one of kind UNKNOWN (containerd's proxy reads that as committed).
        yield snapshots_pb2.ListSnapshotsResponse(info=[snapshots_pb2.Info(name="z", kind=snapshots_pb2.ACTIVE)])
        yield snapshots_pb2.ListSnapshotsResponse(info=[snapshots_pb2.Info(name="b", kind=snapshots_pb2.COMMITTED),
                                                        snapshots_pb2.Info(name="a")])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, request.key)
        return snapshots_pb2.UsageResponse(size=1 << 40, inodes=7)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request, context, "")
        return empty_pb2.Empty()


@pytest.fixture
def fake_server() -> Iterator[tuple[str, _FakeSnapshots, _Recorder]]:
    sockdir = Path(tempfile.mkdtemp(prefix="fake-sn-"))
    socket = sockdir / "sock"
    recorder = _Recorder()
    servicer = _FakeSnapshots()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[recorder])
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    try:
        yield str(socket), servicer, recorder
    finally:
        servicer.release.set()
        server.stop(grace=None)
        shutil.rmtree(sockdir, ignore_errors=True)


def test_wire_method_names_namespace_header_and_snapshotter_field(
    fake_server: tuple[str, _FakeSnapshots, _Recorder],
) -> None:
    socket, servicer, recorder = fake_server
    sn = ProxySnapshotter("remote-one", f"unix://{socket}", namespace="team-a")
    assert isinstance(sn, Snapshotter)
    assert (sn.name, sn.remote, sn.capabilities, sn.address) == ("remote-one", False, frozenset(), f"unix://{socket}")

    assert sn.prepare("k", "parent", {"l": "v"}) == [
        Mount(type="overlay", source="overlay", target="sub", options=("lowerdir=/a:/b", "ro"))
    ]
    assert sn.view("v", "parent") == [Mount(type="bind", source="/x", options=("ro", "rbind"))]
    assert sn.mounts("k") == []
    sn.commit("name", "k", {"c": "d"})
    info = sn.stat("s")
    assert info == Info(key="s", parent="p", kind=Kind.VIEW, labels={"a": "1"},
                        created_at=datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC),
                        updated_at=datetime(2023, 11, 14, 22, 13, 21, tzinfo=UTC))
    updated = sn.update(Info(key="u", kind=Kind.COMMITTED, labels={"x": "1", "gone": ""}), ["labels.x", "labels.gone"])
    assert (updated.key, updated.kind, dict(updated.labels)) == ("u", Kind.COMMITTED, {"x": "1", "gone": ""})
    walked = list(sn.walk("kind==committed", 'labels."a.b"==c'))
    assert [(i.key, i.kind) for i in walked] == [("a", Kind.COMMITTED), ("b", Kind.COMMITTED), ("z", Kind.ACTIVE)]
    assert sn.usage("k") == Usage(size=1 << 40, inodes=7)
    sn.remove("k")
    sn.cleanup()

    assert [m for m, _ in recorder.calls] == [
        f"{SERVICE}/{verb}" for verb in ("Prepare", "View", "Mounts", "Commit", "Stat", "Update", "List", "Usage",
                                         "Remove", "Cleanup")
    ]
    assert all(md.get("containerd-namespace") == "team-a" for _, md in recorder.calls)
    assert all(r.snapshotter == "remote-one" for r in servicer.requests)
    prepare, view, _, commit, _, update, listing = servicer.requests[:7]
    assert (prepare.key, prepare.parent, dict(prepare.labels)) == ("k", "parent", {"l": "v"})
    assert (view.key, view.parent, dict(view.labels)) == ("v", "parent", {})
    assert (commit.name, commit.key, dict(commit.labels)) == ("name", "k", {"c": "d"})
    assert list(update.update_mask.paths) == ["labels.x", "labels.gone"]
    assert (update.info.name, update.info.kind, dict(update.info.labels)) == (
        "u", snapshots_pb2.COMMITTED, {"x": "1", "gone": ""})
    assert list(listing.filters) == ["kind==committed", 'labels."a.b"==c']
    sn.close()
    sn.close()  # idempotent
    closed = f"stat snapshot s: snapshotter remote-one at unix://{socket} is closed"
    with pytest.raises(FailedPreconditionError, match=closed):
        sn.stat("s")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("NOT_FOUND", NotFoundError),
        ("ALREADY_EXISTS", AlreadyExistsError),
        ("FAILED_PRECONDITION", FailedPreconditionError),
        ("INVALID_ARGUMENT", InvalidArgumentError),
        ("UNAVAILABLE", UnavailableError),
        ("DEADLINE_EXCEEDED", UnavailableError),
        ("UNIMPLEMENTED", CargoholdError),
        ("INTERNAL", CargoholdError),
    ],
)
def test_status_codes_map_to_error_kinds(
    fake_server: tuple[str, _FakeSnapshots, _Recorder], code: str, kind: type[CargoholdError]
) -> None:
    socket, _, _ = fake_server
    sn = ProxySnapshotter("remote-one", socket, namespace="default")
    with pytest.raises(kind) as exc:
        sn.stat(f"fail-{code}")
    assert type(exc.value) is kind
    where = f"snapshotter remote-one at unix://{socket}"
    # The kind is the exception's type: containerd's ": not found"-style suffix is not repeated; a code without
    # a kind keeps its name and the daemon's whole message.
    expected = {
        UnavailableError: f"stat snapshot fail-{code}: {where} unavailable: snapshot fail-{code}",
        CargoholdError: f"stat snapshot fail-{code}: {code}: snapshot fail-{code}: {code.lower()} ({where})",
    }.get(kind, f"stat snapshot fail-{code}: snapshot fail-{code} ({where})")
    assert str(exc.value) == expected
    sn.close()


def test_client_side_checks_raise_before_any_call(fake_server: tuple[str, _FakeSnapshots, _Recorder]) -> None:
    socket, _, recorder = fake_server
    sn = ProxySnapshotter("remote-one", socket, namespace="default")
    with pytest.raises(InvalidArgumentError, match="filter"):
        sn.walk("labels.==x")
    with pytest.raises(InvalidArgumentError, match="big"):
        sn.prepare("k", labels={"big": "x" * 5000})
    with pytest.raises(InvalidArgumentError, match="big"):
        sn.update(Info(key="k", labels={"big": "x" * 5000}))
    with pytest.raises(InvalidArgumentError, match="empty"):
        sn.prepare("")
    with pytest.raises(InvalidArgumentError, match="name must not be empty"):
        sn.commit("", "k")
    with pytest.raises(InvalidArgumentError, match="invalid label ''"):
        sn.update(Info(key="k"), ["labels."])
    assert recorder.calls == []
    # As the local snapshotters: only the labels an update applies are checked (here "big" is not applied).
    ignored = sn.update(Info(key="k", labels={"x": "1", "big": "x" * 5000}), ["labels.x"])
    assert ignored.labels["x"] == "1"
    with pytest.raises(InvalidArgumentError, match="namespace"):
        ProxySnapshotter("x", socket, namespace="")
    with pytest.raises(InvalidArgumentError, match="address"):
        ProxySnapshotter("x", "unix://", namespace="default")
    relative = ProxySnapshotter("x", "some/sock", namespace="default")
    assert relative.address == "unix://" + os.path.abspath("some/sock")
    relative.close()
    assert ProxySnapshotter("x", "unix:/run/s.sock", namespace="default").address == "unix:///run/s.sock"
    sn.close()


def test_close_while_a_call_is_in_flight(fake_server: tuple[str, _FakeSnapshots, _Recorder]) -> None:
    socket, servicer, _ = fake_server
    sn = ProxySnapshotter("remote-one", socket, namespace="default")
    with futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(sn.stat, "slow-1")
        assert servicer.entered.wait(10)
        sn.close()  # grpc cancels the call in flight: it fails as a call on a closed snapshotter
        with pytest.raises(FailedPreconditionError, match=f"stat snapshot slow-1: snapshotter remote-one at "
                                                          f"unix://{socket} is closed"):
            pending.result(timeout=10)


def test_unreachable_socket_is_unavailable_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nobody-listens.sock"
    sn = open_proxy_snapshotter("stargz", str(missing), namespace="default", remote=True)
    assert isinstance(sn, ProxySnapshotter) and sn.remote is True
    with pytest.raises(UnavailableError, match=f"stat snapshot k: snapshotter stargz at unix://{missing} unavailable"):
        sn.stat("k")
    sn.close()


# --- a real stargz daemon ----------------------------------------------------------------------------------


@pytest.fixture
def stargz(stargz_daemon: StargzDaemon) -> ProxySnapshotter:  # noqa: F811 (the imported fixture)
    return stargz_daemon.snapshotter()


def _fs_types_under(path: Path) -> set[str]:
    """Filesystem types mounted at or below ``path`` (the field after " - " in mountinfo)."""
    found = set()
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields, _, rest = line.partition(" - ")
            point = fields.split()[4]
            if point == str(path) or point.startswith(f"{path}/"):
                found.add(rest.split()[0])
    return found


@needs_root
def test_stargz_errors_name_key_and_socket(stargz: ProxySnapshotter, stargz_daemon: StargzDaemon) -> None:  # noqa: F811
    """The error kinds themselves are test_snapshots.py::test_error_kinds, run against stargz too; here each
    stargz error names the key and the socket, and a stopped daemon is unavailable."""
    where = f"(snapshotter stargz at unix://{stargz_daemon.socket})"
    stargz.prepare("dup-key")
    stargz.commit("done", "dup-key")
    stargz.view("v", "done")
    stargz.prepare("other")
    cases: list[tuple[type[CargoholdError], str, Any]] = [
        (NotFoundError, "prepare snapshot x on missing-parent: ", lambda: stargz.prepare("x", "missing-parent")),
        (AlreadyExistsError, "prepare snapshot other: ", lambda: stargz.prepare("other")),
        (AlreadyExistsError, "commit snapshot other as done: ", lambda: stargz.commit("done", "other")),
        (InvalidArgumentError, "prepare snapshot on-active on other: ", lambda: stargz.prepare("on-active", "other")),
        (FailedPreconditionError, "commit snapshot done as again: ", lambda: stargz.commit("again", "done")),
        (FailedPreconditionError, "mounts of snapshot done: ", lambda: stargz.mounts("done")),
        (FailedPreconditionError, "remove snapshot done: ", lambda: stargz.remove("done")),  # "v" is its child
        (NotFoundError, "stat snapshot nope: ", lambda: stargz.stat("nope")),
        (NotFoundError, "usage of snapshot nope: ", lambda: stargz.usage("nope")),
        (InvalidArgumentError, "update snapshot other: ", lambda: stargz.update(Info(key="other", parent="done"),
                                                                                ["parent"])),
    ]
    for kind, prefix, call in cases:
        with pytest.raises(kind) as exc:
            call()
        assert type(exc.value) is kind
        message = str(exc.value)
        assert message.startswith(prefix) and message.endswith(where), message
    assert [(i.key, i.kind) for i in stargz.walk()] == [
        ("done", Kind.COMMITTED), ("other", Kind.ACTIVE), ("v", Kind.VIEW)]

    stargz_daemon.stop_process()
    with pytest.raises(UnavailableError, match=f"stat snapshot done: snapshotter stargz at unix://"
                                               f"{stargz_daemon.socket} unavailable"):
        stargz.stat("done")


@needs_root
def test_stargz_mounts_usage_and_remove(stargz: ProxySnapshotter, stargz_daemon: StargzDaemon,  # noqa: F811
                                        tmp_path: Path) -> None:
    """stargz's mount shapes, a whiteout in a child's usage, asynchronous removal; the usage of a layer and of
    a plain child is test_snapshots.py::test_usage_counts_bytes_and_inodes (stargz too)."""
    snapdir = stargz_daemon.root / "snapshotter" / "snapshots"
    first = stargz.prepare("a")
    assert len(first) == 1 and first[0].type == "bind" and sorted(first[0].options) == ["rbind", "rw"]
    assert Path(first[0].source).parent.parent == snapdir
    assert stargz.mounts("a") == first
    payload = os.urandom(1 << 20)
    with with_temp_mount(first, root=tmp_path / "mnt") as mnt:
        (mnt / "big").write_bytes(payload)
        os.link(mnt / "big", mnt / "big-link")
        (mnt / "d").mkdir()
        (mnt / "d" / "small").write_bytes(b"x" * 100)
    stargz.commit("A", "a", {"layer": "a"})

    child = stargz.prepare("b", "A")
    assert [m.type for m in child] == ["overlay"]
    options = sorted(o for o in child[0].options if o != "userxattr")
    upper = Path(options[1].removeprefix("upperdir="))
    assert options[0] == f"lowerdir={first[0].source}" and options[2].startswith("workdir=")
    with with_temp_mount(child, root=tmp_path / "mnt") as mnt:
        assert (mnt / "big").read_bytes() == payload
        (mnt / "more").write_bytes(b"y" * 16384)
        (mnt / "big").unlink()
    assert (upper / "more").is_file() and os.major(os.lstat(upper / "big").st_rdev) == 0  # whiteout
    grown = stargz.usage("b")
    assert grown.inodes == 3 and 16384 <= grown.size < 16384 + 3 * 8192  # root, "more", whiteout: upper only
    stargz.commit("B", "b")
    one = stargz.view("one", "A")
    assert one == [Mount(type="bind", source=first[0].source, options=("ro", "rbind"))]
    chain = stargz.view("chain", "B")
    assert chain[0].type == "overlay" and not any(o.startswith("upperdir=") for o in chain[0].options)
    with with_temp_mount(chain, root=tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == ["big-link", "d", "more"]
        with pytest.raises(OSError, match="Read-only"):
            (mnt / "x").write_text("no")

    with pytest.raises(FailedPreconditionError, match="A"):
        stargz.remove("A")
    for key in ("chain", "one", "B"):
        stargz.remove(key)
    with pytest.raises(NotFoundError, match="B"):
        stargz.stat("B")
    with pytest.raises(NotFoundError, match="B"):
        stargz.remove("B")
    stargz.remove("A")
    assert list(stargz.walk()) == []
    assert os.listdir(snapdir)  # stargz removes asynchronously: the directories wait for Cleanup
    stargz.cleanup()
    assert os.listdir(snapdir) == []
    assert not mounts_under(tmp_path / "mnt")


@needs_root
def test_stargz_second_client_shares_the_daemons_key_space(stargz: ProxySnapshotter,  # noqa: F811
                                                           stargz_daemon: StargzDaemon) -> None:  # noqa: F811
    """Parallel prepares on one client are test_snapshots.py::test_threads_prepare_in_parallel (stargz too)."""
    stargz.prepare("p-a")
    stargz.commit("parent", "p-a")
    keys = [f"k{i}" for i in range(6)]
    for key in keys:
        stargz.prepare(key, "parent", {"k": key})
    # Another client (another name, another namespace) sees the same snapshots: the daemon's key space is its
    # own, and the namespace header is for the daemon to use or ignore (stargz ignores it).
    other = stargz_daemon.snapshotter(namespace="elsewhere", name="stargz-2")
    assert [i.key for i in other.walk("kind==active")] == keys
    assert dict(other.stat("k3").labels) == {"k": "k3"}
    assert other.stat("k3").parent == "parent"
    other.remove("k3")
    with pytest.raises(NotFoundError, match="k3"):
        stargz.stat("k3")


# --- pulls into stargz as a remote snapshotter ------------------------------------------------------------


def _config_toml(socket: Path) -> str:
    return (
        f'[snapshotters.stargz]\naddress = "{socket}"\nremote = true\n\n'
        '[runtimes.kata]\nsnapshotter = "stargz"\n'
    )


def _stargz_config(registry_host: str) -> str:
    # The test registry speaks plain HTTP on loopback: tell stargz's resolver so (its default is https).
    text = f'[[resolver.host."{registry_host}".mirrors]]\nhost = "{registry_host}"\ninsecure = true\n'
    return "no_background_fetch = true\n" + text


def _tree(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "file:" + p.read_bytes().hex()
    return out


def _expected_tree(layers: list[bytes], scratch: Path) -> dict[str, str]:
    for i, tar in enumerate(layers):
        blob = scratch / f"layer{i}.tar"
        blob.write_bytes(tar)
        subprocess.run(["tar", "-xf", str(blob), "-C", str(scratch / "tree")], check=True)
        blob.unlink()
    return _tree(scratch / "tree")


@needs_root
def test_pull_into_stargz_ordinary_image_falls_back_to_local_apply(
    registry: Any, stargz_binary: Path, tmp_path: Path  # noqa: F811
) -> None:
    layers = [samples.small_base_layer(), samples.files_layer(samples.random_files(5, 30, prefix="opt"))]
    img = samples.build_image(layers)
    samples.push(registry.url, "team/app", "v1", img)
    ref = f"{registry.host}/team/app:v1"
    with running_stargz(stargz_binary, tmp_path, config=_stargz_config(registry.host)) as daemon:
        root = tmp_path / "root"
        root.mkdir()
        (root / "config.toml").write_text(_config_toml(daemon.socket))
        client = Client(root)
        try:
            name = client.config.snapshotter_for("kata")
            assert name == "stargz"
            sn = client.snapshotter(name)
            assert isinstance(sn, ProxySnapshotter) and sn.remote is True

            result = client.pull(ref, snapshotter=name, layer_labels=True)
            assert result.unpack is not None
            # stargz tried to mount each layer lazily, found no eStargz footer and left it to us: every layer
            # was force-fetched and applied through the mounts stargz returned.
            assert [(layer.status, layer.fetched) for layer in result.unpack.layers] == [("unpacked", True)] * 2
            log = daemon.log_text()
            assert log.count('"remote-snapshot-prepared":"false"') == 2, log[-3000:]
            for blob in img.layers:
                assert client.content.read_all(blob.digest) == blob.data

            chains = client.resolve_manifest(ref).chain_ids
            committed = {i.key: i for i in sn.walk("kind==committed")}
            assert sorted(committed) == sorted(str(c) for c in chains)
            for i, chain in enumerate(chains):
                info = committed[str(chain)]
                assert info.parent == (str(chains[i - 1]) if i else "")
                assert info.labels[SNAPSHOT_REF] == str(chain)
                assert info.labels[CRI_IMAGE_REF] == ref
                assert info.labels[CRI_MANIFEST_DIGEST] == str(img.digest)
                assert info.labels[CRI_LAYER_DIGEST] == str(img.layers[i].digest)
                assert info.labels[CRI_IMAGE_LAYERS] == ",".join(str(b.digest) for b in img.layers[i:])
            assert list(sn.walk("kind==active")) == []  # no extract-* snapshot left behind

            (tmp_path / "tree").mkdir()
            expected = _expected_tree(layers, tmp_path)
            view = sn.view("check", str(chains[-1]))
            with with_temp_mount(view, root=tmp_path / "mnt") as mnt:
                assert _tree(mnt) == expected
            sn.remove("check")

            # cargohold mount/unmount on the proxy: the mount's snapshot lives in the daemon and goes with unmount.
            target = tmp_path / "mounted"
            target.mkdir()
            client.mount(ref, target, snapshotter=name)
            try:
                assert _tree(target) == expected
            finally:
                client.unmount(target)
            assert not mounts_under(target)
            assert list(sn.walk("kind==view")) == []

            # A second pull finds the snapshots in the daemon and, remote, fetches nothing.
            again = client.pull(ref, snapshotter=name, layer_labels=True)
            assert again.unpack is not None
            assert [layer.status for layer in again.unpack.layers] == ["exists", "exists"]
        finally:
            client.close()
    assert not mounts_under(tmp_path)


# --- an eStargz layer: stargz mounts it lazily (FUSE) and the unpacker must not fetch it ----------------------


def _fuse_usable() -> str:
    """"" when FUSE mounts can work here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc}"
    os.close(fd)
    with open("/proc/filesystems") as fh:
        if not any(line.split()[-1] == "fuse" for line in fh if line.strip()):
            return "the kernel has no fuse filesystem"
    return ""


@needs_root
def test_pull_into_stargz_estargz_layer_is_lazy_and_never_fetched(
    registry: Any, stargz_binary: Path, tmp_path: Path  # noqa: F811
) -> None:
    why = _fuse_usable()
    if why:
        pytest.skip(f"lazy eStargz layers need FUSE: {why}")
    from support.estargz import TOC_DIGEST_ANNOTATION, estargz_image

    lazy_files = {"app/bin/server": b"#!/bin/sh\necho lazy\n" * 50, "app/data/big.bin": os.urandom(300_000),
                  "app/README": b"served by stargz over FUSE\n"}
    top = samples.files_layer({"etc/app.conf": b"mode=remote\n"})
    img, lazy_tar = estargz_image(lazy_files, extra_layers=[top])
    samples.push(registry.url, "lazy/app", "v1", img)
    ref = f"{registry.host}/lazy/app:v1"
    # The unpacker passes the layer's containerd.io/snapshot/stargz/toc.digest annotation on as a snapshot
    # label (as containerd does): stargz verifies the TOC against it, with its default verification on.
    config = _stargz_config(registry.host)
    with running_stargz(stargz_binary, tmp_path, config=config) as daemon:
        root = tmp_path / "root"
        root.mkdir()
        (root / "config.toml").write_text(_config_toml(daemon.socket))
        client = Client(root)
        try:
            result = client.pull(ref, snapshotter="stargz", layer_labels=True)
            assert result.unpack is not None
            log = daemon.log_text()
            lazy, local = result.unpack.layers
            assert (lazy.status, lazy.fetched) == ("remote", False), log[-3000:]
            assert (local.status, local.fetched) == ("unpacked", True)
            assert not client.content.exists(img.layers[0].digest)  # never fetched by cargohold
            assert client.content.read_all(img.layers[1].digest) == img.layers[1].data
            assert '"remote-snapshot-prepared":"true"' in log

            sn = client.snapshotter("stargz")
            chains = client.resolve_manifest(ref).chain_ids
            lazy_info = sn.stat(str(chains[0]))
            assert lazy_info.kind is Kind.COMMITTED
            assert lazy_info.labels["containerd.io/snapshot/remote"] == "remote snapshot"
            assert lazy_info.labels[CRI_LAYER_DIGEST] == str(img.layers[0].digest)
            assert lazy_info.labels[TOC_DIGEST_ANNOTATION] == img.layers[0].annotations[TOC_DIGEST_ANNOTATION]
            assert '"msg":"verified"' in log
            assert sn.stat(str(chains[1])).parent == str(chains[0])

            (tmp_path / "tree").mkdir()
            expected = _expected_tree([lazy_tar, top], tmp_path)
            expected.pop("stargz.index.json", None)
            expected.pop(".no.prefetch.landmark", None)
            view = sn.view("check", str(chains[-1]))
            # The lazy layer is stargz's FUSE filesystem, mounted on that snapshot's directory in the daemon root.
            assert any(t.startswith("fuse") for t in _fs_types_under(daemon.root))
            with with_temp_mount(view, root=tmp_path / "mnt") as mnt:
                got = _tree(mnt)
                got.pop(".no.prefetch.landmark", None)
                assert got == expected
            sn.remove("check")
        finally:
            client.close()
    assert not mounts_under(tmp_path)


def test_threads_share_one_channel(fake_server: tuple[str, _FakeSnapshots, _Recorder]) -> None:
    socket, _, recorder = fake_server
    sn = ProxySnapshotter("remote-one", socket, namespace="ns")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(10):
                assert sn.stat(f"k{i}").key == f"k{i}"
        except BaseException as exc:  # noqa: BLE001 (collected for the assert below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(recorder.calls) == 80
    sn.close()


@needs_root
def test_estargz_layer_verified_against_toc_digest_label(
    registry: Any, stargz_binary: Path, tmp_path: Path  # noqa: F811
) -> None:
    """The layer's containerd.io/snapshot/stargz/toc.digest annotation as a snapshot label, straight to the
    proxy (the unpacker passes it on in the pull test): stargz verifies the TOC (and every chunk as it is read)
    and serves the layer lazily; this also checks support/estargz.py."""
    why = _fuse_usable()
    if why:
        pytest.skip(f"lazy eStargz layers need FUSE: {why}")
    from support.estargz import TOC_DIGEST_ANNOTATION, estargz_image

    big = os.urandom(5 << 20)  # two chunks
    img, _ = estargz_image({"opt/big.bin": big, "opt/small": b"small\n"})
    samples.push(registry.url, "lazy/verified", "v1", img)
    layer = img.layers[0]
    with running_stargz(stargz_binary, tmp_path, config=_stargz_config(registry.host)) as daemon:
        sn = daemon.snapshotter(remote=True)
        labels = {
            SNAPSHOT_REF: "lazy-layer",
            CRI_IMAGE_REF: f"{registry.host}/lazy/verified:v1",
            CRI_MANIFEST_DIGEST: str(img.digest),
            CRI_LAYER_DIGEST: str(layer.digest),
            CRI_IMAGE_LAYERS: str(layer.digest),
            TOC_DIGEST_ANNOTATION: layer.annotations[TOC_DIGEST_ANNOTATION],
        }
        with pytest.raises(AlreadyExistsError, match="lazy-layer"):
            sn.prepare("extract-1", "", labels)
        assert '"msg":"verified"' in daemon.log_text()
        info = sn.stat("lazy-layer")
        assert info.kind is Kind.COMMITTED and info.labels["containerd.io/snapshot/remote"] == "remote snapshot"
        with pytest.raises(NotFoundError, match="extract-1"):
            sn.stat("extract-1")  # committed under the target name by stargz itself
        view = sn.view("check", "lazy-layer")
        with with_temp_mount(view, root=tmp_path / "mnt") as mnt:
            assert (mnt / "opt" / "big.bin").read_bytes() == big
            assert (mnt / "opt" / "small").read_bytes() == b"small\n"
        sn.remove("check")

    assert not mounts_under(tmp_path)


# --- lazy images end to end: check, export, push, copy, gc, rootfs ---------------------------------------


def _registry_blob(url: str, repo: str, digest: str) -> bytes | None:
    """The blob's bytes as the registry serves them, None when it has none."""
    try:
        with urllib.request.urlopen(f"{url}/v2/{repo}/blobs/{digest}") as resp:
            data: bytes = resp.read()
            return data
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _archive_blob(path: Path, digest: str) -> bytes:
    with tarfile.open(path) as tar:
        member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
        assert member is not None
        return member.read()


def _forget_blob(root: Path, digest: str) -> None:
    cli(root, "content", "rm", digest)
    assert cli(root, "content", "get", digest, check=False).returncode != 0


@needs_root
def test_lazy_image_checks_exports_pushes_copies_and_survives_gc(
    registry: Any, stargz_binary: Path, tmp_path: Path  # noqa: F811
) -> None:
    """An image unpacked lazily is complete for ``images check`` (its lazy layer blob is remote, not missing);
    export, push and copy fetch that blob from the image's registry on demand; gc loses nothing."""
    why = _fuse_usable()
    if why:
        pytest.skip(f"lazy eStargz layers need FUSE: {why}")
    img, _ = estargz_image({"app/run": b"#!/bin/sh\necho lazy\n", "app/data": os.urandom(100_000)},
                           extra_layers=[samples.files_layer({"etc/conf": b"x=1\n"})])
    samples.push(registry.url, "lazy/e2e", "v1", img)
    ref = f"{registry.host}/lazy/e2e:v1"
    lazy_blob = img.layers[0]
    with running_stargz(stargz_binary, tmp_path, config=_stargz_config(registry.host)) as daemon:
        root = tmp_path / "root"
        root.mkdir()
        (root / "config.toml").write_text(_config_toml(daemon.socket))
        client = Client(root)
        try:
            result = client.pull(ref, snapshotter="stargz", layer_labels=True)
        finally:
            client.close()
        assert result.unpack is not None and result.unpack.layers[0].status == "remote"

        report = json.loads(cli(root, "images", "check", ref, "--output", "json").stdout)[0]
        assert (report["status"], report["missing"], report["remote"]) == ("complete", [], [str(lazy_blob.digest)])
        table_out = cli(root, "images", "check", ref).stdout
        assert "complete (lazy)" in table_out

        # gc keeps the lazy snapshots and loses nothing: the image stays complete (lazy).
        chains = [str(c) for c in Client(root).resolve_manifest(ref).chain_ids]
        cli(root, "gc")
        assert sorted(i.key for i in daemon.snapshotter(namespaced_keys=True).walk()) == sorted(chains)
        assert json.loads(cli(root, "images", "check", ref, "--output", "json").stdout)[0]["remote"] == [
            str(lazy_blob.digest)]

        # export: no --fetch-missing needed; the archive has every blob.
        archive = tmp_path / "lazy.tar"
        cli(root, "export", str(archive), ref)
        for blob in (img.manifest, img.config, *img.layers):
            assert _archive_blob(archive, str(blob.digest)) == blob.data
        _forget_blob(root, str(lazy_blob.digest))

        # push to another repository: the lazy blob is fetched first, then pushed.
        cli(root, "push", f"{registry.host}/pushed/e2e:v1", ref)
        for blob in (img.config, *img.layers):
            assert _registry_blob(registry.url, "pushed/e2e", str(blob.digest)) == blob.data
        _forget_blob(root, str(lazy_blob.digest))

        # copy from the store to an archive and to a registry.
        copied = tmp_path / "copied.tar"
        cli(root, "copy", f"local:{ref}", f"oci-archive:{copied}")
        assert _archive_blob(copied, str(lazy_blob.digest)) == lazy_blob.data
        _forget_blob(root, str(lazy_blob.digest))
        cli(root, "copy", f"local:{ref}", f"{registry.host}/copied/e2e:v1")
        assert _registry_blob(registry.url, "copied/e2e", str(lazy_blob.digest)) == lazy_blob.data

        # Under a name no registry knows, the blob comes from where the image came from (its source label).
        _forget_blob(root, str(lazy_blob.digest))
        cli(root, "images", "tag", ref, f"{registry.host}/nowhere/e2e:v1")
        cli(root, "images", "rm", ref)
        renamed = tmp_path / "renamed.tar"
        cli(root, "export", str(renamed), f"{registry.host}/nowhere/e2e:v1")
        assert _archive_blob(renamed, str(lazy_blob.digest)) == lazy_blob.data

        # With its source gone, export and push fail naming the blob; the image itself is still lazy, not broken.
        _forget_blob(root, str(lazy_blob.digest))
        registry.stop()
        for args in (("export", str(tmp_path / "no.tar")), ("push", f"{registry.host}/again/e2e:v1")):
            failed = cli(root, *args, f"{registry.host}/nowhere/e2e:v1", check=False)
            error = failed.stderr.strip().splitlines()[-1]  # after the progress lines
            assert failed.returncode == 1 and error.startswith("cargohold: error: "), failed.stderr
            assert str(lazy_blob.digest) in error and "Connection refused" in error
            assert "Traceback" not in failed.stderr
        assert cli(root, "images", "check", f"{registry.host}/nowhere/e2e:v1").returncode == 0
    assert not mounts_under(tmp_path)


@needs_root
def test_prepare_rootfs_into_stargz_needs_no_local_layer_blobs(
    registry: Any, stargz_binary: Path, tmp_path: Path  # noqa: F811
) -> None:
    """A container rootfs for a handler whose snapshotter is stargz, from an image whose layer blobs are not
    in the store: the target labels let stargz fetch the layers itself."""
    why = _fuse_usable()
    if why:
        pytest.skip(f"lazy eStargz layers need FUSE: {why}")
    files = {"srv/index.html": b"<p>lazy rootfs</p>\n", "srv/blob": os.urandom(50_000)}
    img, _ = estargz_image(files)
    samples.push(registry.url, "lazy/rootfs", "v1", img)
    ref = f"{registry.host}/lazy/rootfs:v1"
    with running_stargz(stargz_binary, tmp_path, config=_stargz_config(registry.host)) as daemon:
        root = tmp_path / "root"
        root.mkdir()
        (root / "config.toml").write_text(_config_toml(daemon.socket))
        cli(root, "pull", "--no-unpack", ref)
        _forget_blob(root, str(img.layers[0].digest))
        client = Client(root)
        try:
            # Not so into a local snapshotter: that needs the blob, and names it.
            with pytest.raises(FailedPreconditionError, match=str(img.layers[0].digest)):
                client.prepare_rootfs("c-local", ref)
            mounts = client.prepare_rootfs("c1", ref, "kata")
            assert not client.content.exists(img.layers[0].digest)
            with with_temp_mount(mounts, root=tmp_path / "mnt") as mnt:
                for name, data in files.items():
                    assert (mnt / name).read_bytes() == data
            check = client.check(ref)
            assert check.complete and [d.digest for d in check.remote] == [img.layers[0].digest]
            client.snapshotter("stargz").remove("c1")
        finally:
            client.close()
    assert not mounts_under(tmp_path)


@needs_root
def test_two_namespaces_share_one_stargz_daemon_without_colliding(
    registry: Any, stargz_binary: Path, tmp_path: Path  # noqa: F811
) -> None:
    """stargz ignores the namespace header; with the remote proxy's namespaced keys (the default) two cargohold
    namespaces pulling the same image get their own snapshots, and removing one's leaves the other's."""
    why = _fuse_usable()
    if why:
        pytest.skip(f"lazy eStargz layers need FUSE: {why}")
    img, _ = estargz_image({"app/one": b"one\n"}, extra_layers=[samples.files_layer({"etc/two": b"two\n"})])
    samples.push(registry.url, "lazy/shared", "v1", img)
    ref = f"{registry.host}/lazy/shared:v1"
    with running_stargz(stargz_binary, tmp_path, config=_stargz_config(registry.host)) as daemon:
        root = tmp_path / "root"
        root.mkdir()
        (root / "config.toml").write_text(_config_toml(daemon.socket))
        clients = {ns: Client(root, namespace=ns) for ns in ("default", "team-b")}
        try:
            for client in clients.values():
                result = client.pull(ref, snapshotter="stargz", layer_labels=True)
                assert result.unpack is not None
                # Each namespace unpacks for itself: nothing "exists" from the other namespace.
                assert [layer.status for layer in result.unpack.layers] == ["remote", "unpacked"]
            chains = [str(c) for c in clients["default"].resolve_manifest(ref).chain_ids]
            raw = daemon.snapshotter()  # the daemon's own key space, no prefixes
            assert sorted(i.key for i in raw.walk("kind==committed")) == sorted(
                f"{ns}/{c}" for ns in clients for c in chains)
            for ns, client in clients.items():
                sn = client.snapshotter("stargz")
                assert sorted(i.key for i in sn.walk()) == sorted(chains)
                assert sn.stat(chains[1]).parent == chains[0]
                assert raw.stat(f"{ns}/{chains[1]}").parent == f"{ns}/{chains[0]}"

            default_sn, other_sn = (clients[ns].snapshotter("stargz") for ns in ("default", "team-b"))
            default_sn.remove(chains[1])
            default_sn.remove(chains[0])
            assert list(default_sn.walk()) == []
            assert sorted(i.key for i in other_sn.walk()) == sorted(chains)
            mounts = clients["team-b"].prepare_rootfs("c1", ref, "kata")
            with with_temp_mount(mounts, root=tmp_path / "mnt") as mnt:
                assert (mnt / "app" / "one").read_bytes() == b"one\n"
                assert (mnt / "etc" / "two").read_bytes() == b"two\n"
            other_sn.remove("c1")
            assert "c1" not in {i.key for i in default_sn.walk()}
        finally:
            for client in clients.values():
                client.close()
    assert not mounts_under(tmp_path)


def test_failed_daemon_build_is_a_failure_not_a_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe ships with the repository, so a build that fails must fail the stargz tests (with the
    build's own output), never skip them."""
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "build.sh").write_text("echo 'go: cannot find package broken/recipe' >&2\nexit 3\n")
    (recipe / "main.go").write_text(f"package main // {tmp_path}\n")  # a hash no cached binary has
    monkeypatch.setattr(stargz_support, "TOOL_DIR", recipe)
    monkeypatch.setattr(stargz_support, "_packages_present", lambda: True)
    try:
        stargz_support.build_stargz(tmp_path / "build.log")
    except BaseException as exc:  # noqa: BLE001 (pytest.skip raises a BaseException: that must not happen)
        assert isinstance(exc, AssertionError), f"{type(exc).__name__}: {exc}"
        assert "building the stargz daemon failed (exit 3)" in str(exc)
        assert "cannot find package broken/recipe" in str(exc)
    else:
        pytest.fail("a failing build.sh gave a binary")
    assert "broken/recipe" in (tmp_path / "build.log").read_text()


def test_daemon_recipe_is_in_the_repository() -> None:
    assert stargz_support.TOOL_DIR == Path(__file__).resolve().parents[1] / "scripts" / "stargz-grpc"
    assert (stargz_support.TOOL_DIR / "build.sh").is_file() and (stargz_support.TOOL_DIR / "main.go").is_file()
