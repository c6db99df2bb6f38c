"""Images as registries serve them today, through every verb: BuildKit indexes with attestation manifests,
indexes nested in indexes, foreign (non-distributable) layers; schema 1 refused clearly.

A data-driven harness: each ``Case`` is a sample graph pushed to a real docker-registry, the tree its host
platform (linux/amd64) unpacks to, its runnable platforms and how ``images inspect`` must classify its index
entries. Every verb runs through the real CLI (CRI PullImage through the real gRPC server). Add a sample by
adding a ``Case``.
"""

from __future__ import annotations

import json
import socket
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import urllib3

import test_cri
from cargohold.client import Client
from cargohold.devtools import artifacts, corners, modern, rhel_like, schema1
from cargohold.devtools.modern import SampleGraph
from cargohold.devtools.registry import RegistryProcess, push_blob, push_manifest
from cargohold.devtools.samples import Entry, gzip_bytes, small_base_layer
from cargohold.errors import NotFoundError
from cargohold.images.image import manifest_for
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.kinds import Kind
from cargohold.oci.manifest import Index
from cargohold.oci.platform import Platform, PlatformMatcher, host_platform
from support.cli import cli
from test_cri import CONFIG, CRI, make_root
from treeutil import expected_tree, read_tree

AMD64 = Platform.parse("linux/amd64")
ARM64 = Platform.parse("linux/arm64")

pytestmark = pytest.mark.skipif(host_platform().architecture != "amd64",
                                reason="expected trees are written for a linux/amd64 host")


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One sample: how to build it, what the host platform's rootfs holds, what ``images ls`` and
    ``images inspect`` say, and (optionally) another platform to pull by ``--platform`` with its tree."""

    name: str
    build: Callable[[str], SampleGraph]  # given the url foreign layers claim (a loopback listener)
    layers: Callable[[], Sequence[Sequence[Entry]]]
    platforms: tuple[str, ...]
    # The expected tree when entry lists cannot express it (hand-built tars), and how to read a real one.
    tree: Callable[[], dict[str, object]] | None = None
    read: Callable[[Path], dict[str, object]] = read_tree
    attestations: int = 0
    entry_kinds: tuple[tuple[int, str, str], ...] = ()  # (depth, kind, platform) per index entry
    other: tuple[str, Callable[[], Sequence[Sequence[Entry]]]] | None = None
    foreign: bool = False  # has non-distributable layers: push skips them
    every_verb: bool = True  # False: only the whole-graph verbs (a media-type variant of another case)

    def want(self) -> dict[str, object]:
        """The host platform's expected rootfs."""
        return self.tree() if self.tree is not None else expected_tree(self.layers())


CASES = [
    Case(name="buildkit", build=lambda _: modern.buildkit_index(), layers=lambda: [modern.platform_files(AMD64)],
         platforms=("linux/amd64", "linux/arm64"), attestations=2,
         entry_kinds=((0, "image", "linux/amd64"), (0, "image", "linux/arm64"),
                      (0, "attestation", "unknown/unknown"), (0, "attestation", "unknown/unknown")),
         other=("linux/arm64", lambda: [modern.platform_files(ARM64)])),
    Case(name="nested", build=lambda _: modern.nested_index(), layers=lambda: [modern.platform_files(AMD64)],
         platforms=("linux/amd64", "linux/arm64", "linux/s390x"),
         entry_kinds=((0, "index", ""), (1, "image", "linux/amd64"), (1, "image", "linux/arm64"),
                      (0, "image", "linux/s390x")),
         other=("linux/s390x", lambda: [modern.platform_files(Platform.parse("linux/s390x"))])),
    Case(name="foreign", build=lambda url: modern.foreign_layer_image(url=url), layers=modern.foreign_layer_entries,
         platforms=("linux/amd64",), foreign=True),
    Case(name="nondist", build=lambda url: modern.foreign_layer_image(oci=True, url=url),
         layers=modern.foreign_layer_entries, platforms=("linux/amd64",), foreign=True, every_verb=False),
    # Tar corners (sparse files, long and non-UTF-8 names, repeats, late dirs, a symlink climbing past the root)
    # in multi-member gzip blobs; their tree is listed by devtools.corners (entry lists cannot express it).
    Case(name="corners", build=lambda _: modern.image_graph(corners.corner_image()),
         layers=lambda: [[] for _ in corners.corner_layers()], tree=corners.corner_tree,
         read=corners.tree_listing, platforms=("linux/amd64",)),
    # RHEL/UBI-shaped: read-only directories written into by the next layer, devices, foreign owners.
    Case(name="rhel", build=lambda _: modern.image_graph(rhel_like.rootless_sample()),
         layers=rhel_like.rootless_entries, platforms=("linux/amd64",)),
]

_http = urllib3.PoolManager()
# The CRI server fixtures of test_cri, shared.
sock_dir = test_cri.sock_dir
start_cri = test_cri.start_cri


def manifest_digest(reg: RegistryProcess, repo: str, tag: str) -> str:
    """What the registry serves for ``repo:tag`` (its Docker-Content-Digest)."""
    accept = ", ".join(sorted(mt.MANIFEST_TYPES | mt.INDEX_TYPES))
    resp = _http.request("GET", f"{reg.url}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
    assert resp.status == 200, resp.data
    return str(Digest.from_bytes(resp.data))


def archive_index(path: Path) -> tuple[dict[str, object], set[str], list[dict[str, object]]]:
    """An archive's index.json, its blob digests and its docker manifest.json."""
    with tarfile.open(path) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        docker = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    blobs = {"sha256:" + n.rsplit("/", 1)[1] for n in names if n.startswith("blobs/sha256/")}
    return index, blobs, docker


def distributable(graph: SampleGraph) -> set[str]:
    return {str(b.digest) for b in graph.all_blobs if b.media_type not in mt.NON_DISTRIBUTABLE}


class _Listener:
    """A loopback TCP listener that counts connections: where foreign layers' urls point."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/base.tar.gz"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class Seeded:
    case: Case
    graph: SampleGraph
    ref: str
    foreign_host: _Listener  # must see no connection: foreign layers come from the registry


@pytest.fixture
def seeded(registry: RegistryProcess, request: pytest.FixtureRequest) -> Iterator[Seeded]:
    """The case's sample pushed to ``src/<name>:v1``; after the test, its foreign urls were never contacted."""
    case: Case = request.param
    listener = _Listener()
    try:
        graph = case.build(listener.url)
        modern.push_graph(registry.url, f"src/{case.name}", "v1", graph)
        yield Seeded(case=case, graph=graph, ref=f"{registry.host}/src/{case.name}:v1", foreign_host=listener)
    finally:
        listener.close()
    assert listener.connections == 0


EVERY_VERB = [c for c in CASES if c.every_verb]


@pytest.mark.parametrize("seeded", CASES, ids=[c.name for c in CASES], indirect=True)
def test_every_verb(seeded: Seeded, registry: RegistryProcess, tmp_path: Path) -> None:
    """One root per sample: the default-platform verbs, then (after pull --all-platforms into the same root)
    the whole-graph verbs."""
    root = tmp_path / "root"
    if seeded.case.every_verb:
        default_platform_verbs(seeded, root, tmp_path)
    whole_graph_verbs(seeded, registry, root, tmp_path)


def default_platform_verbs(seeded: Seeded, root: Path, tmp_path: Path) -> None:
    """pull (default), images ls/inspect/check, rootfs, mount, unpack, export (default)."""
    case, graph, ref = seeded.case, seeded.graph, seeded.ref
    want, read = case.want(), case.read
    pulled = json.loads(cli(root, "pull", ref, "--output", "json").stdout)
    assert pulled["digest"] == str(graph.digest)

    listed = json.loads(cli(root, "images", "ls", "--output", "json").stdout)
    assert [(i["name"], i["digest"], i["platforms"], i["attestations"]) for i in listed] == [
        (ref, str(graph.digest), list(case.platforms), case.attestations)]
    inspected = json.loads(cli(root, "images", "inspect", ref, "--output", "json").stdout)
    assert tuple((e["depth"], e["kind"], e.get("platform", "")) for e in inspected.get("entries", [])) == \
        case.entry_kinds
    assert inspected["manifest"]["platform"] == "linux/amd64"
    for e in inspected.get("entries", []):
        if e["kind"] == "attestation":  # not pulled for the default platform: its predicates are unknown
            assert e["attests"] in {str(d["digest"]) for d in inspected["entries"] if d["kind"] == "image"}

    check = json.loads(cli(root, "images", "check", ref, "--output", "json").stdout)
    assert check[0]["status"] == "complete" and check[0]["unpacked"]["overlayfs"]
    every = cli(root, "images", "check", "--all-platforms", ref, "--output", "json", check=False)
    assert every.returncode == (0 if len(case.platforms) == 1 else 1)

    flat = tmp_path / "flat"
    cli(root, "rootfs", ref, str(flat))
    assert read(flat) == want
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli(root, "mount", ref, str(mnt))
    try:
        assert read(mnt) == want
    finally:
        cli(root, "unmount", str(mnt))
    unpacked = json.loads(cli(root, "unpack", "--snapshotter", "native", ref, "--output", "json").stdout)
    assert [layer["status"] for layer in unpacked["layers"]] == ["unpacked"] * len(case.layers())

    out = tmp_path / "default.tar"
    exported = json.loads(cli(root, "export", str(out), ref, "--output", "json").stdout)
    assert exported["images"][0]["digest"] == str(graph.digest)
    index, blobs, docker = archive_index(out)
    assert index["manifests"][0]["digest"] == str(graph.digest)  # type: ignore[index]
    assert len(docker) == 1 and docker[0]["Config"].endswith(inspected["manifest"]["config"]["digest"][7:])
    assert str(graph.digest) in blobs


def whole_graph_verbs(seeded: Seeded, registry: RegistryProcess, root: Path, tmp_path: Path) -> None:
    """pull --all-platforms, check --all-platforms, rootfs --platform, export --all-platforms, import, push,
    copy to every kind of destination: the index digest and every blob (attestations included) are kept."""
    case, graph, ref = seeded.case, seeded.graph, seeded.ref
    want, read = case.want(), case.read
    pulled = json.loads(cli(root, "pull", "--all-platforms", ref, "--output", "json").stdout)
    assert sorted(pulled["manifests"]) == sorted(str(b.digest) for b in graph.all_blobs
                                                 if kinds.is_runnable(b.descriptor))
    if case.other is not None:
        plat, layers = case.other
        cli(root, "rootfs", "--platform", plat, ref, str(tmp_path / "altflat"))
        assert read_tree(tmp_path / "altflat") == expected_tree(layers())
    table = cli(root, "images", "ls").stdout
    shown = ",".join(case.platforms) + (f" (+{case.attestations} attestations)" if case.attestations else "")
    assert shown in table
    check = json.loads(cli(root, "images", "check", "--all-platforms", ref, "--output", "json").stdout)
    assert check[0]["status"] == "complete" and check[0]["required"] == len(graph.all_blobs)
    if case.attestations:
        inspected = json.loads(cli(root, "images", "inspect", ref, "--output", "json").stdout)
        preds = [e["predicate_types"] for e in inspected["entries"] if e["kind"] == "attestation"]
        assert preds == [[modern.SPDX_PREDICATE, modern.PROVENANCE_PREDICATE]] * case.attestations
        shown = cli(root, "images", "inspect", ref).stdout
        assert f"attestation for {graph.manifests[0].digest} ({modern.SPDX_PREDICATE}" in shown

    out = tmp_path / "all.tar"
    cli(root, "export", "--all-platforms", str(out), ref)
    index, blobs, docker = archive_index(out)
    assert index["manifests"][0]["digest"] == str(graph.digest)  # type: ignore[index]
    assert blobs == {str(b.digest) for b in graph.all_blobs}
    assert len(docker) == 1  # only runnable manifests, the host's
    other = tmp_path / "other"
    imported = json.loads(cli(other, "import", "--all-platforms", str(out), "--output", "json").stdout)
    assert imported["images"][0]["digest"] == str(graph.digest)
    assert json.loads(cli(other, "images", "check", "--all-platforms", imported["images"][0]["name"],
                          "--output", "json").stdout)[0]["status"] == "complete"
    cli(other, "rootfs", imported["images"][0]["name"], str(tmp_path / "imported"))
    assert read(tmp_path / "imported") == want

    pushed = json.loads(cli(root, "push", f"{registry.host}/pushed/{case.name}:v1", ref,
                            "--output", "json").stdout)
    assert pushed["digest"] == str(graph.digest)
    assert manifest_digest(registry, f"pushed/{case.name}", "v1") == str(graph.digest)
    nondist = {str(b.digest) for b in graph.all_blobs if b.media_type in mt.NON_DISTRIBUTABLE}
    assert set(pushed["skipped"]) == nondist
    assert bool(nondist) == case.foreign
    if nondist:
        said = cli(root, "push", f"{registry.host}/pushed/{case.name}:v2", ref).stdout
        assert "skipped" in said and next(iter(nondist)) in said

    # From a fresh store: copy fetches the whole graph itself (attestations were what stopped it).
    copied = json.loads(cli(tmp_path / "c", "copy", ref, f"{registry.host}/copied/{case.name}:v1",
                            "--output", "json").stdout)
    assert copied["digest"] == str(graph.digest)
    assert manifest_digest(registry, f"copied/{case.name}", "v1") == str(graph.digest)
    for kind in ("oci-archive", "docker-archive"):
        path = tmp_path / f"{kind}.tar"
        cli(tmp_path / "c", "copy", ref, f"{kind}:{path}")
        index, blobs, _ = archive_index(path)
        assert index["manifests"][0]["digest"] == str(graph.digest)  # type: ignore[index]
        assert blobs == {str(b.digest) for b in graph.all_blobs}
    cli(tmp_path / "c", "copy", ref, "local:copied/local:v1")
    local = json.loads(cli(tmp_path / "c", "images", "check", "--all-platforms", "copied/local:v1",
                           "--output", "json").stdout)
    assert local[0]["status"] == "complete"


@pytest.mark.parametrize("seeded", EVERY_VERB, ids=[c.name for c in EVERY_VERB], indirect=True)
def test_cri_pull_image(seeded: Seeded, start_cri: Callable[[Path], CRI], tmp_path: Path) -> None:
    """CRI PullImage unpacks the host platform; an index with attestations is one image."""
    case, ref = seeded.case, seeded.ref
    cri = start_cri(make_root(tmp_path, CONFIG))
    image_id = cri.pull(ref)
    listed = cri.list()
    assert [list(i.repo_tags) for i in listed] == [[ref]]
    assert listed[0].id == image_id
    mnt = tmp_path / "flat"
    cri.client.rootfs(ref, mnt)
    assert case.read(mnt) == case.want()


SCHEMA1 = json.dumps({"schemaVersion": 1, "name": "old", "tag": "v1", "architecture": "amd64",
                      "fsLayers": [], "history": []}).encode()


def test_schema1_index_entry_is_refused_clearly(registry: RegistryProcess, tmp_path: Path) -> None:
    """An index entry of a schema 1 media type: the error names the reference and says to convert; no
    traceback; the index's other platforms still pull."""
    good = modern.platform_image("linux/arm64")
    for blob in good.blobs:
        push_blob(registry.url, "old", blob.data)
    push_manifest(registry.url, "old", str(good.digest), good.manifest.data, good.manifest.media_type)
    blob_digest = push_blob(registry.url, "old", SCHEMA1)
    entry = {"mediaType": mt.DOCKER_MANIFEST_SCHEMA1_SIGNED, "digest": str(blob_digest), "size": len(SCHEMA1),
             "platform": {"os": "linux", "architecture": "amd64"}}
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
           "manifests": [entry, {**good.manifest.descriptor.to_dict(), "platform": {"os": "linux",
                                                                                "architecture": "arm64"}}]}
    raw = json.dumps(doc).encode()
    resp = _http.request("PUT", f"{registry.url}/v2/old/manifests/v1", body=raw,
                         headers={"Content-Type": mt.OCI_INDEX})
    assert resp.status == 201, resp.data
    ref = f"{registry.host}/old:v1"
    root = tmp_path / "root"
    for args in (("pull", ref), ("pull", "--all-platforms", ref), ("copy", ref, f"{registry.host}/new:v1")):
        proc = cli(root, *args, check=False)
        assert proc.returncode == 2, proc.stderr  # an unsupported media type is bad input: exit 2
        assert "schema 1 is not supported" in proc.stderr and "convert" in proc.stderr
        assert "Traceback" not in proc.stderr
    # The runnable platform beside it still pulls.
    cli(root, "pull", "--platform", "linux/arm64", ref)


def test_index_entries_are_classified_in_one_place() -> None:
    graph = modern.buildkit_index()
    index = Index.parse(graph.root.data, graph.root.media_type)
    assert [kinds.classify(d) for d in index.manifests] == [Kind.IMAGE, Kind.IMAGE, Kind.ATTESTATION,
                                                            Kind.ATTESTATION]
    assert [kinds.attests(d) for d in index.manifests[2:]] == [str(d.digest) for d in index.manifests[:2]]
    nested = Index.parse(modern.nested_index().root.data)
    assert [kinds.classify(d) for d in nested.manifests] == [Kind.INDEX, Kind.IMAGE]
    other = Descriptor(media_type="application/vnd.example.thing+json", digest=graph.digest, size=1)
    assert kinds.classify(other) is Kind.UNKNOWN
    old = Descriptor(media_type=mt.DOCKER_MANIFEST_SCHEMA1_SIGNED, digest=graph.digest, size=1)
    assert kinds.classify(old) is Kind.SCHEMA1
    unknown_platform = Descriptor(media_type=mt.OCI_MANIFEST, digest=graph.digest, size=1,
                                  platform=Platform(os="unknown", architecture="unknown"))
    assert kinds.classify(unknown_platform) is Kind.ARTIFACT and not kinds.is_runnable(unknown_platform)


def test_attestations_are_never_a_platform_even_when_asked_for(registry: RegistryProcess, tmp_path: Path) -> None:
    graph = modern.buildkit_index()
    modern.push_graph(registry.url, "att", "v1", graph)
    ref = f"{registry.host}/att:v1"
    root = tmp_path / "root"
    proc = cli(root, "pull", "--platform", "unknown/unknown", ref, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"index {graph.digest}: no manifest for platform" in proc.stderr
    assert "available: linux/amd64, linux/arm64)" in proc.stderr
    # With every platform pulled, a matcher accepting unknown/unknown still resolves no attestation.
    client = Client(root)
    try:
        client.pull(ref, all_platforms=True, unpack=False)
        with pytest.raises(NotFoundError, match="no manifest for platform"):
            manifest_for(client.content, client.image(ref).target,
                         PlatformMatcher([Platform(os="unknown", architecture="unknown")]))
        assert client.check(ref, all_platforms=True).manifests == tuple(
            b.descriptor for b in graph.manifests[:2])
        # push --platform: every runnable platform asked for sends the index whole, attestations with it;
        # one platform sends just its manifest.
        both = client.push(f"{registry.host}/att-both:v1", ref, platforms=["linux/amd64", "linux/arm64"])
        assert both.target.digest == graph.digest
        assert manifest_digest(registry, "att-both", "v1") == str(graph.digest)
        one = client.push(f"{registry.host}/att-one:v1", ref, platforms=["linux/arm64"])
        assert one.target.digest == graph.manifests[1].digest
    finally:
        client.close()


def test_schema1_served_by_a_registry_is_refused_clearly(make_registry: Callable[..., RegistryProcess],
                                                          tmp_path: Path, start_cri: Callable[[Path], CRI]) -> None:
    """A real signed schema 1 manifest served by docker-registry (schema 1 compatibility on): every verb that
    resolves it says so, naming the reference."""
    reg = make_registry(schema1=True)
    layer = push_blob(reg.url, "old/app", gzip_bytes(small_base_layer()))
    raw = schema1.signed_manifest("old/app", "v1", [layer])
    resp = _http.request("PUT", f"{reg.url}/v2/old/app/manifests/v1", body=raw,
                         headers={"Content-Type": mt.DOCKER_MANIFEST_SCHEMA1_SIGNED})
    assert resp.status == 201, resp.data
    ref = f"{reg.host}/old/app:v1"
    root = tmp_path / "cli"
    for args in (("pull", ref), ("pull", "--all-platforms", ref), ("copy", ref, f"{reg.host}/new:v1"),
                 ("copy", ref, f"oci-archive:{tmp_path / 'out.tar'}")):
        proc = cli(root, *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"{ref}: Docker image manifest schema 1 is not supported, convert it" in proc.stderr
        assert "Traceback" not in proc.stderr
    cri = start_cri(make_root(tmp_path, CONFIG))
    with pytest.raises(grpc.RpcError) as info:
        cri.pull(ref)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "schema 1 is not supported, convert it" in str(info.value.details())


def test_cri_pull_of_an_artifact_says_it_is_not_runnable(registry: RegistryProcess, tmp_path: Path,
                                                        start_cri: Callable[[Path], CRI]) -> None:
    """CRI PullImage of an OCI 1.1 artifact: INVALID_ARGUMENT saying it is not a runnable image; nothing listed."""
    img = modern.platform_image("linux/amd64")
    for blob in img.blobs:
        push_blob(registry.url, "art", blob.data)
    push_manifest(registry.url, "art", "v1", img.manifest.data, img.manifest.media_type)
    sbom = artifacts.sbom_artifact(img.manifest.descriptor)
    artifacts.push_artifact(registry.url, "art", "sbom", sbom)
    ref = f"{registry.host}/art:sbom"
    cri = start_cri(make_root(tmp_path, CONFIG))
    with pytest.raises(grpc.RpcError) as info:
        cri.pull(ref)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{ref}: not a runnable image: an artifact of type {sbom.artifact_type}" in str(info.value.details())
    assert cri.list() == []
