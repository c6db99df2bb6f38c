"""The CRI image service over real gRPC on a unix socket, against real registries on loopback, and runtime
handlers with their own snapshotters (containerd PR #12835): per-layer CRI labels when an image pulled for one
handler is unpacked for another, no registry contact for that, and errors that name missing blobs."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cargohold.client import Client, PullAuth
from cargohold.cri.proto import api_pb2 as pb
from cargohold.cri.proto import api_pb2_grpc as pb_grpc
from cargohold.cri.server import CRI_NAMESPACE, CRIServer
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess, free_port, push_blob, push_manifest
from cargohold.devtools.samples import Blob, SampleImage
from cargohold.errors import (
    AlreadyExistsError,
    DigestMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    LockedError,
    NeedsParentsError,
    NotFoundError,
    RegistryError,
    UnauthorizedError,
)
from cargohold.events import Event
from cargohold.metadata import labels as L
from cargohold.oci import mediatypes as mt
from cargohold.snapshots.base import Kind
from cargohold.snapshots.mount import mount_all, unmount
from support import BasicAuthRegistry, TokenRegistry
from support.cli import cargohold_cmd, cli, wait_for_socket

CRI_LABELS = (L.CRI_IMAGE_REF, L.CRI_MANIFEST_DIGEST, L.CRI_LAYER_DIGEST, L.CRI_IMAGE_LAYERS)
CONFIG = """
[runtimes.runc]
snapshotter = "overlayfs"

[runtimes.kata]
snapshotter = "native"
"""


def image_with(files: dict[str, bytes], *, user: str = "", layers: int = 2) -> SampleImage:
    """An image of ``layers`` layers holding ``files`` (split across them), with config User ``user``."""
    items = sorted(files.items())
    tars = [samples.files_layer(dict(items[i::layers])) for i in range(layers)]
    img = samples.build_image(tars)
    if not user:
        return img
    doc = json.loads(img.config.data)
    doc["config"]["User"] = user
    config = Blob(media_type=img.config.media_type, data=json.dumps(doc, sort_keys=True).encode())
    manifest_doc = json.loads(img.manifest.data)
    manifest_doc["config"] = config.descriptor.to_dict()
    manifest = Blob(media_type=img.manifest.media_type, data=json.dumps(manifest_doc, indent=2).encode(),
                    platform=img.platform)
    return SampleImage(manifest=manifest, config=config, layers=img.layers, diff_ids=img.diff_ids,
                       uncompressed=img.uncompressed, platform=img.platform)


def seed(reg: RegistryProcess, repo: str, tag: str, img: SampleImage, auth_header: str) -> None:
    for blob in img.blobs:
        push_blob(reg.url, repo, blob.data, auth_header=auth_header)
    push_manifest(reg.url, repo, tag, img.manifest.data, img.manifest.media_type, auth_header=auth_header)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (a unix socket path holds at most 107 bytes; tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_root(tmp_path: Path, config: str = CONFIG) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "config.toml").write_text(config)
    return root


@dataclass
class CRI:
    """A running in-process server and stubs talking to it over its socket."""

    client: Client
    server: CRIServer
    channel: grpc.Channel
    images: pb_grpc.ImageServiceStub
    runtime: pb_grpc.RuntimeServiceStub
    events: list[Event]

    def pull(self, ref: str, handler: str = "", auth: pb.AuthConfig | None = None) -> str:
        req = pb.PullImageRequest(image=pb.ImageSpec(image=ref, runtime_handler=handler), auth=auth)
        return str(self.images.PullImage(req, timeout=60).image_ref)

    def status(self, ref: str, verbose: bool = False) -> pb.ImageStatusResponse:
        return self.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref), verbose=verbose),
                                       timeout=30)

    def list(self) -> list[pb.Image]:
        return list(self.images.ListImages(pb.ListImagesRequest(), timeout=30).images)


@pytest.fixture
def start_cri(sock_dir: Path) -> Iterator[Callable[[Path], CRI]]:
    """``start_cri(root)``: a CRI server on ``root`` (namespace k8s.io, ROOT/config.toml), stopped after."""
    running: list[CRI] = []

    def start(root: Path) -> CRI:
        events: list[Event] = []
        client = Client(root, namespace=CRI_NAMESPACE, on_event=events.append)
        server = CRIServer(client, sock_dir / f"cri{len(running)}.sock")
        server.start()
        channel = grpc.insecure_channel(server.address)
        cri = CRI(client=client, server=server, channel=channel, images=pb_grpc.ImageServiceStub(channel),
                  runtime=pb_grpc.RuntimeServiceStub(channel), events=events)
        running.append(cri)
        return cri

    yield start
    for cri in running:
        cri.channel.close()
        cri.server.stop(grace=1)
        cri.client.close()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def committed(client: Client, snapshotter: str) -> dict[str, dict[str, str]]:
    return {i.key: dict(i.labels) for i in client.snapshotter(snapshotter).walk() if i.kind == Kind.COMMITTED}


def applied(events: list[Event]) -> int:
    """Layers applied: one ``done`` each (``running`` events also report progress while a layer extracts)."""
    return sum(1 for e in events if e.action == "apply" and e.status == "done")


# -- the image service ---------------------------------------------------------------------------------------


def test_version_empty_store_and_socket(start_cri: Callable[[Path], CRI], tmp_path: Path) -> None:
    cri = start_cri(make_root(tmp_path))
    version = cri.runtime.Version(pb.VersionRequest(version="v1"), timeout=10)
    assert (version.runtime_name, version.runtime_api_version) == ("cargohold", "v1")
    assert version.version and version.runtime_version
    assert stat.S_IMODE(os.stat(cri.server.socket_path).st_mode) == 0o660
    assert cri.list() == []
    unknown = cri.status("127.0.0.1:1/nothing:here", verbose=True)
    assert not unknown.HasField("image") and dict(unknown.info) == {}
    cri.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image="nothing:here")), timeout=10)
    fs = cri.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=10).image_filesystems
    assert fs[0].fs_id.mountpoint == str(cri.client.root / "snapshots" / cri.client.default_snapshotter)
    assert fs[-1].fs_id.mountpoint == str(cri.client.root / "content")
    assert all(f.timestamp > 0 and f.HasField("used_bytes") and f.HasField("inodes_used") for f in fs)
    # An RPC this server does not declare is UNIMPLEMENTED, as for any gRPC server.
    status = cri.channel.unary_unary("/runtime.v1.RuntimeService/RunPodSandbox")
    assert rpc_error(lambda: status(b"", timeout=10)).code() == grpc.StatusCode.UNIMPLEMENTED
    # A second server on a live socket is refused; a stale one (its server died) is replaced.
    with pytest.raises(AlreadyExistsError, match="listening"):
        CRIServer(cri.client, cri.server.socket_path).start()
    stale_path = cri.server.socket_path.with_name("stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(stale_path))
    stale.close()
    before = set(threading.enumerate())
    with CRIServer(cri.client, stale_path) as again, grpc.insecure_channel(again.address) as channel:
        assert pb_grpc.RuntimeServiceStub(channel).Version(pb.VersionRequest(), timeout=10).runtime_name
        workers = [t for t in threading.enumerate() if t.name.startswith("cri_") and t not in before]
        assert workers
    assert not stale_path.exists()
    # Its worker threads (each with its own database connection) are gone with it.
    assert not [t for t in workers if t.is_alive()]
    # Stopping a server that never started leaves the socket alone: here it is the running server's.
    CRIServer(cri.client, cri.server.socket_path).stop()
    assert cri.runtime.Version(pb.VersionRequest(), timeout=10).runtime_name == "cargohold"


def test_error_kinds_map_to_status_codes() -> None:
    from cargohold.cri.errors import grpc_code

    assert grpc_code(NotFoundError("x")) == grpc.StatusCode.NOT_FOUND
    assert grpc_code(DigestMismatchError("a", "b")) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(UnauthorizedError("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_code(NeedsParentsError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert grpc_code(AlreadyExistsError("x")) == grpc.StatusCode.ALREADY_EXISTS
    assert grpc_code(LockedError("ref")) == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(RegistryError("h", 500, "", "boom")) == grpc.StatusCode.INTERNAL
    assert grpc_code(ValueError("x")) == grpc.StatusCode.INTERNAL


def test_pull_list_status_remove(start_cri: Callable[[Path], CRI], registry: RegistryProcess,
                                 tmp_path: Path) -> None:
    img = image_with({"bin/app": b"app", "etc/conf": b"x" * 5000}, user="1000:1000")
    named = image_with({"etc/other": b"y"}, user="nginx", layers=1)
    samples.push(registry.url, "cri/app", "v1", img)
    samples.push(registry.url, "cri/named", "v1", named)
    ref = f"{registry.host}/cri/app:v1"
    # sandbox_image is a top-level key: before the tables.
    cri = start_cri(make_root(tmp_path, f'sandbox_image = "{registry.host}/cri/named:v1"\n' + CONFIG))

    image_id = cri.pull(ref)
    assert image_id == str(img.config.digest)
    assert cri.pull(f"{registry.host}/cri/named:v1") == str(named.config.digest)
    by_id = {i.id: i for i in cri.list()}
    assert set(by_id) == {str(img.config.digest), str(named.config.digest)}
    app = by_id[image_id]
    assert list(app.repo_tags) == [ref]
    assert list(app.repo_digests) == [f"{registry.host}/cri/app@{img.digest}"]
    assert app.size == img.config.descriptor.size + sum(layer.descriptor.size for layer in img.layers)
    assert app.HasField("uid") and app.uid.value == 1000 and app.username == ""
    assert not app.pinned
    other = by_id[str(named.config.digest)]
    assert not other.HasField("uid") and other.username == "nginx" and other.pinned

    for how in (ref, image_id, img.config.digest.hex[:12], f"{registry.host}/cri/app@{img.digest}"):
        status = cri.status(how)
        assert status.image.id == image_id, how
        assert dict(status.info) == {}
    info = json.loads(cri.status(ref, verbose=True).info["info"])
    chain_ids = [str(c) for c in cri.client.resolve_manifest(ref).chain_ids]
    assert info["chainID"] == chain_ids[-1] and info["chainIDs"] == chain_ids
    assert info["manifestDigest"] == str(img.digest)
    assert info["snapshotters"] == [cri.client.default_snapshotter]
    assert info["imageSpec"]["config"]["User"] == "1000:1000"
    streamed = [i.id for r in cri.images.StreamImages(pb.StreamImagesRequest(), timeout=10) for i in r.images]
    assert sorted(streamed) == sorted(by_id)
    only = cri.images.ListImages(pb.ListImagesRequest(filter=pb.ImageFilter(image=pb.ImageSpec(image=ref))))
    assert [i.id for i in only.images] == [image_id]

    used_before = cri.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=10).image_filesystems
    assert used_before[0].used_bytes.value > 0 and used_before[-1].inodes_used.value > 0
    # Removing by id removes every name; content and snapshots go in the gc it schedules.
    cri.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)), timeout=30)
    assert cri.server.gc.wait_idle(timeout=30) and cri.server.gc.runs == 1
    assert [i.id for i in cri.list()] == [str(named.config.digest)]
    assert not cri.status(ref).HasField("image")
    assert [i.name for i in cri.client.list_images()] == [f"{registry.host}/cri/named:v1",
                                                         f"{registry.host}/cri/named@{named.digest}"]
    assert not cri.client.content.exists(img.layers[0].digest)
    used_after = cri.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=10).image_filesystems
    assert used_after[-1].used_bytes.value < used_before[-1].used_bytes.value
    assert used_after[0].inodes_used.value < used_before[0].inodes_used.value
    cri.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)), timeout=30)  # idempotent


def test_pull_errors_map_to_grpc_codes(start_cri: Callable[[Path], CRI], registry: RegistryProcess,
                                       tmp_path: Path) -> None:
    samples.push(registry.url, "cri/app", "v1", image_with({"a": b"a"}))
    cri = start_cri(make_root(tmp_path))
    missing = rpc_error(lambda: cri.pull(f"{registry.host}/cri/app:nope"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "cri/app:nope" in str(missing.details())
    assert rpc_error(lambda: cri.pull(f"{registry.host}/cri/absent:v1")).code() == grpc.StatusCode.NOT_FOUND
    bad = rpc_error(lambda: cri.pull(f"{registry.host}/Cri/App:v1"))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "lowercase" in str(bad.details())
    assert rpc_error(lambda: cri.pull("")).code() == grpc.StatusCode.INVALID_ARGUMENT
    garbled = pb.AuthConfig(auth="not base64!")
    assert rpc_error(lambda: cri.pull(f"{registry.host}/cri/app:v1", auth=garbled)).code() == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert cri.list() == []


def test_pull_with_basic_auth(start_cri: Callable[[Path], CRI], basic_registry: BasicAuthRegistry,
                              tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reg = basic_registry.registry
    img = image_with({"secret": b"s"})
    seed(reg, "private/app", "v1", img, basic_registry.auth_header)
    ref = f"{reg.host}/private/app:v1"
    cri = start_cri(make_root(tmp_path))
    user, password = basic_registry.user, basic_registry.password

    anonymous = rpc_error(lambda: cri.pull(ref))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED and reg.host in str(anonymous.details())
    wrong = rpc_error(lambda: cri.pull(ref, auth=pb.AuthConfig(username=user, password="wrong")))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and "wrong" not in str(wrong.details())
    elsewhere = pb.AuthConfig(username=user, password=password, server_address="https://other.example:5000")
    assert rpc_error(lambda: cri.pull(ref, auth=elsewhere)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert cri.list() == []

    assert cri.pull(ref, auth=pb.AuthConfig(username=user, password=password)) == str(img.config.digest)
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert cri.pull(ref, auth=pb.AuthConfig(auth=encoded, server_address=reg.host)) == str(img.config.digest)
    # Credentials were for those pulls only: none is cached in the client's own resolver.
    assert rpc_error(lambda: cri.pull(ref)).code() == grpc.StatusCode.UNAUTHENTICATED
    # Nothing logged a secret, at any level.
    assert caplog.records and password not in caplog.text and encoded not in caplog.text


def test_pull_with_token_auth(start_cri: Callable[[Path], CRI], make_token_registry: Callable[..., TokenRegistry],
                              tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tr = make_token_registry(allow_anonymous=False)
    img = image_with({"tok": b"t"})
    seed(tr.registry, "team/app", "v1", img, tr.auth_header("team/app"))
    ref = f"{tr.registry.host}/team/app:v1"
    cri = start_cri(make_root(tmp_path))

    assert rpc_error(lambda: cri.pull(ref)).code() == grpc.StatusCode.UNAUTHENTICATED
    bad = pb.AuthConfig(username=tr.user, password="nope")
    assert rpc_error(lambda: cri.pull(ref, auth=bad)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error(lambda: cri.pull(ref, auth=pb.AuthConfig(registry_token="garbage"))).code() == \
        grpc.StatusCode.UNAUTHENTICATED
    assert cri.pull(ref, auth=pb.AuthConfig(username=tr.user, password=tr.password)) == str(img.config.digest)
    token = tr.issuer.make_token(tr.user, ["repository:team/app:pull"], anonymous=False)
    assert cri.pull(ref, auth=pb.AuthConfig(registry_token=token)) == str(img.config.digest)
    assert caplog.records and tr.password not in caplog.text and token not in caplog.text


def test_always_pull_picks_up_a_moved_tag(start_cri: Callable[[Path], CRI], registry: RegistryProcess,
                                          tmp_path: Path) -> None:
    first, second = image_with({"v": b"1"}), image_with({"v": b"2"})
    samples.push(registry.url, "moving", "latest", first)
    ref = f"{registry.host}/moving:latest"
    cri = start_cri(make_root(tmp_path))
    assert cri.pull(ref) == str(first.config.digest)
    samples.push(registry.url, "moving", "latest", second)
    assert cri.pull(ref) == str(second.config.digest)
    by_id = {i.id: i for i in cri.list()}
    assert list(by_id[str(second.config.digest)].repo_tags) == [ref]
    old = by_id[str(first.config.digest)]  # still there by digest, as with containerd
    assert list(old.repo_tags) == [] and list(old.repo_digests) == [f"{registry.host}/moving@{first.digest}"]
    assert cri.status(ref).image.id == str(second.config.digest)


# -- runtime handlers ------------------------------------------------------------------------------------


def test_pull_for_one_handler_prepare_for_another(start_cri: Callable[[Path], CRI], registry: RegistryProcess,
                                                   tmp_path: Path) -> None:
    img = image_with({"bin/sh": b"#!/bin/true\n", "etc/motd": b"hello\n", "usr/lib/x": b"x" * 3000}, layers=3)
    samples.push(registry.url, "handlers/app", "v1", img)
    ref = f"{registry.host}/handlers/app:v1"
    cri = start_cri(make_root(tmp_path))
    client = cri.client
    assert client.snapshotter_for("runc") == "overlayfs" and client.snapshotter_for("kata") == "native"
    assert client.snapshotter_for("unknown") == client.default_snapshotter

    cri.pull(ref, handler="runc")
    chains = [str(c) for c in client.resolve_manifest(ref).chain_ids]
    assert set(committed(client, "overlayfs")) == set(chains)
    assert committed(client, "native") == {}

    cri.events.clear()
    mounts = client.prepare_rootfs("sandbox-1", ref, "kata")
    assert applied(cri.events) == 3
    native = committed(client, "native")
    assert set(native) == set(chains)
    for i, chain in enumerate(chains):
        labels = native[chain]
        assert labels[L.CRI_IMAGE_REF] == ref
        assert labels[L.CRI_MANIFEST_DIGEST] == str(img.digest)
        assert labels[L.CRI_LAYER_DIGEST] == str(img.layers[i].digest)
        assert labels[L.CRI_IMAGE_LAYERS] == ",".join(str(layer.digest) for layer in img.layers[i:])
    for labels in committed(client, "overlayfs").values():
        assert all(key in labels for key in CRI_LABELS)
    info = client.snapshotter("native").stat("sandbox-1")
    assert (info.kind, info.parent) == (Kind.ACTIVE, chains[-1])

    target = tmp_path / "rootfs"
    target.mkdir()
    mount_all(mounts, target)
    try:
        assert (target / "etc" / "motd").read_bytes() == b"hello\n"
        assert (target / "usr" / "lib" / "x").stat().st_size == 3000
    finally:
        unmount(target)

    cri.events.clear()
    assert client.ensure_unpacked(ref, "kata") is None
    client.prepare_rootfs("container-2", str(img.config.digest), "kata", readonly=True)
    assert applied(cri.events) == 0  # already unpacked there: no unpack work
    assert client.snapshotter("native").stat("container-2").kind == Kind.VIEW
    with pytest.raises(AlreadyExistsError, match="sandbox-1"):
        client.prepare_rootfs("sandbox-1", ref, "kata")
    verbose = json.loads(cri.status(ref, verbose=True).info["info"])
    assert verbose["snapshotters"] == ["native", "overlayfs"]

    # Older kubelets name the handler in the sandbox's annotations only.
    other = image_with({"srv/data": b"d"}, layers=1)
    samples.push(registry.url, "handlers/other", "v1", other)
    sandbox = pb.PodSandboxConfig(annotations={"io.kubernetes.cri.runtime-handler": "kata"})
    cri.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=f"{registry.host}/handlers/other:v1"),
                                             sandbox_config=sandbox), timeout=60)
    assert str(other.diff_ids[0]) in committed(client, "native")
    assert str(other.diff_ids[0]) not in committed(client, "overlayfs")


def test_handler_with_unknown_snapshotter_fails_before_fetching(registry: RegistryProcess, tmp_path: Path) -> None:
    samples.push(registry.url, "app", "v1", image_with({"a": b"a"}))
    client = Client(make_root(tmp_path, CONFIG + '[runtimes.broken]\nsnapshotter = "nosuch"\n'),
                    namespace=CRI_NAMESPACE)
    with pytest.raises(InvalidArgumentError, match="nosuch"):
        client.pull_for_runtime(f"{registry.host}/app:v1", "broken")
    assert list(client.content.walk()) == [] and client.list_images() == []


def test_disable_snapshot_annotations(registry: RegistryProcess, tmp_path: Path) -> None:
    img = image_with({"a": b"a", "b": b"b"})
    samples.push(registry.url, "plain", "v1", img)
    ref = f"{registry.host}/plain:v1"
    root = make_root(tmp_path, "disable_snapshot_annotations = true\n" + CONFIG)
    client = Client(root, namespace=CRI_NAMESPACE)
    client.pull_for_runtime(ref, "runc")
    client.prepare_rootfs("c1", ref, "kata")
    for sn in ("overlayfs", "native"):
        snaps = committed(client, sn)
        assert len(snaps) == 2
        for labels in snaps.values():
            assert not any(key.startswith("containerd.io/snapshot/cri.") for key in labels), labels


def test_missing_blobs_are_named(registry: RegistryProcess, tmp_path: Path) -> None:
    img = image_with({"a": b"a", "b": b"b"})
    samples.push(registry.url, "gone", "v1", img)
    ref = f"{registry.host}/gone:v1"
    client = Client(make_root(tmp_path), namespace=CRI_NAMESPACE)
    client.pull_for_runtime(ref, "runc")
    for layer in img.layers:  # as a GC that kept the overlayfs snapshots but not the blobs would leave it
        client.content.delete(layer.digest)
    registry.stop()  # and nothing may be fetched
    with pytest.raises(FailedPreconditionError) as info:
        client.prepare_rootfs("c1", ref, "kata")
    message = str(info.value)
    assert ref in message and "native" in message
    assert all(str(layer.digest) in message for layer in img.layers)
    assert committed(client, "native") == {}
    # Where it is unpacked already, the rootfs needs no blob.
    assert client.prepare_rootfs("c2", ref, "runc")
    client.content.delete(img.config.digest)
    client.content.delete(img.digest)
    with pytest.raises(FailedPreconditionError, match=str(img.digest)):
        client.prepare_rootfs("c3", ref, "kata")


def test_auth_config_parsing() -> None:
    from cargohold.cri.images import image_user, pull_auth

    assert pull_auth(pb.AuthConfig()) is None
    assert pull_auth(pb.AuthConfig(username="u", password="p", server_address="https://r.example:5000/v2/")) == \
        PullAuth(username="u", password="p", server="r.example:5000")
    assert pull_auth(pb.AuthConfig(auth=base64.b64encode(b"u:p:q").decode())) == PullAuth(username="u",
                                                                                          password="p:q")
    assert pull_auth(pb.AuthConfig(identity_token="it")) == PullAuth(identity_token="it")
    assert pull_auth(pb.AuthConfig(registry_token="rt")) == PullAuth(registry_token="rt")
    shown = repr(PullAuth(username="u", password="pw-xyzzy", identity_token="id-xyzzy", registry_token="rt-xyzzy"))
    assert "xyzzy" not in shown and "'u'" in shown
    assert image_user("") == (None, "")
    assert image_user("0") == (0, "")
    assert image_user("1000:50") == (1000, "")
    assert image_user("www-data:www") == (None, "www-data")
    # What Go's ParseInt refuses is a user name, as containerd reads it; an int64 overflow too.
    assert image_user("1_000") == (None, "1_000") and image_user(" 7") == (None, " 7")
    assert image_user(str(1 << 63)) == (None, str(1 << 63)) and image_user("-5") == (-5, "")


# -- the command line ----------------------------------------------------------------------------------------


def test_cli_serve_cri_and_snapshots_prepare(registry: RegistryProcess, sock_dir: Path, tmp_path: Path) -> None:
    img = image_with({"etc/motd": b"from the cli\n"})
    samples.push(registry.url, "cli/app", "v1", img)
    ref = f"{registry.host}/cli/app:v1"
    root = make_root(tmp_path)
    sock = sock_dir / "cri.sock"
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}
    proc = subprocess.Popen(cargohold_cmd(root, "serve", "cri",
                             "--socket", str(sock)), stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_socket(proc, sock)
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            runtime = pb_grpc.RuntimeServiceStub(channel)
            assert runtime.Version(pb.VersionRequest(), timeout=10).runtime_name == "cargohold"
            images = pb_grpc.ImageServiceStub(channel)
            pulled = images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref, runtime_handler="runc")),
                                      timeout=60)
            assert pulled.image_ref == str(img.config.digest)
            listed = images.ListImages(pb.ListImagesRequest(), timeout=10).images
            assert [i.id for i in listed] == [str(img.config.digest)]

        out = cli(root, "-n", CRI_NAMESPACE, "snapshots", "prepare", "--image", ref, "--runtime-handler", "kata",
                  "--output", "json", "box-1", env=env)
        doc = json.loads(out.stdout)
        assert doc["key"] == "box-1" and doc["snapshotter"] == "native"
        assert [m["type"] for m in doc["mounts"]] == ["bind"]
        snaps = json.loads(cli(root, "-n", CRI_NAMESPACE, "snapshots", "--snapshotter", "native", "ls",
                               "--output", "json", env=env).stdout)
        assert {s["key"] for s in snaps} >= {"box-1", *(str(c) for c in Client(
            root, namespace=CRI_NAMESPACE).resolve_manifest(ref).chain_ids)}
        text = cli(root, "-n", CRI_NAMESPACE, "snapshots", "prepare", "--image", ref, "box-2", env=env).stdout
        assert text.startswith("mount -t ")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in err
    assert not sock.exists()


# -- air-gapped: an imported image, no registry ---------------------------------------------------------


def oci_archive(path: Path, name: str, img: SampleImage) -> Path:
    """An OCI layout tar of ``img`` named ``name`` (``io.containerd.image.name``), as ``ctr export`` writes."""
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [{
        **img.manifest.descriptor.to_dict(),
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "3.10"}}]}
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
             "index.json": json.dumps(index).encode()}
    for blob in [img.manifest, *img.blobs]:
        files[f"blobs/sha256/{blob.digest.hex}"] = blob.data
    with tarfile.open(path, "w") as tar:
        for entry, data in files.items():
            info = tarfile.TarInfo(entry)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_airgapped_import_then_sandbox_for_another_handler(start_cri: Callable[[Path], CRI],
                                                           tmp_path: Path) -> None:
    pause = image_with({"pause": b"\x7fELF pause"}, layers=1)
    name = f"127.0.0.1:{free_port()}/pause:3.10"  # a registry nobody listens on: any contact would fail
    archive = oci_archive(tmp_path / "pause.tar", name, pause)
    cri = start_cri(make_root(tmp_path, f'sandbox_image = "{name}"\n' + CONFIG))
    client = cri.client
    client.import_archive(archive, snapshotter="overlayfs")
    assert committed(client, "native") == {}

    cri.events.clear()
    mounts = client.prepare_rootfs("pod-sandbox", name, "kata")
    assert mounts and applied(cri.events) == 1
    assert not [e for e in cri.events if e.action in ("resolve", "fetch", "host")]
    (chain,) = committed(client, "native").values()
    assert chain[L.CRI_IMAGE_REF] == name and chain[L.CRI_LAYER_DIGEST] == str(pause.layers[0].digest)
    (listed,) = cri.list()
    assert listed.id == str(pause.config.digest) and listed.pinned and list(listed.repo_tags) == [name]
    # The repo digest it is listed with finds it too, though no record has that name.
    (repo_digest,) = listed.repo_digests
    assert repo_digest == f"{name.rsplit(':', 1)[0]}@{pause.digest}"
    assert cri.status(repo_digest).image.id == listed.id
