"""``cargohold push`` and ``copy`` against real docker-registry processes: uploads (monolithic, chunked,
resumed, restarted), HEAD skips, cross-repository mounts, platforms, auth, copy between ends, the CLI."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess, push_blob
from cargohold.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RegistryError,
    UnauthorizedError,
)
from cargohold.events import Event
from cargohold.oci import mediatypes as mt
from cargohold.oci.platform import Platform, PlatformMatcher
from cargohold.remotes.credentials import Credentials, StaticCredentials
from cargohold.remotes.pushplan import plan_push
from support import BasicAuthRegistry, TokenRegistry
from support.cli import cli
from support.faultproxy import FaultProxy

RegistryFactory = Callable[..., RegistryProcess]


def two_layer_image(seed: int = 3, **kw: object) -> samples.SampleImage:
    return samples.build_image(
        [samples.small_base_layer(), samples.files_layer(samples.random_files(seed, 20, prefix="opt"))], **kw
    )


def big_layer_image(size: int = 40_000) -> samples.SampleImage:
    """One layer of incompressible bytes (``size`` of them, plus tar framing) above a tiny base."""
    data = random.Random(size).randbytes(size)
    return samples.build_image([samples.small_base_layer(), samples.files_layer({"big.bin": data})])


def multi_arch() -> tuple[samples.SampleIndex, dict[str, samples.SampleImage]]:
    images = {p: samples.build_image([samples.small_base_layer(), samples.files_layer({"arch": p.encode()})],
                                     platform=p)
              for p in ("linux/amd64", "linux/arm64", "linux/arm/v7")}
    return samples.build_index(list(images.values())), images


def digests(img: samples.SampleImage) -> set[str]:
    return {str(b.digest) for b in [img.manifest, *img.blobs]}


def access_log(reg: RegistryProcess, since: int = 0) -> list[str]:
    """The registry's access-log request lines (``"METHOD /v2/... HTTP/1.1" STATUS``) after ``since`` chars."""
    return re.findall(r'"([A-Z]+ /v2/\S* HTTP/1\.1" \d+)', reg.log_text()[since:])


def pulled(root: Path, ref: str, **kw: object) -> Client:
    client = Client(root)
    client.pull(ref, unpack=False, **kw)  # type: ignore[arg-type]
    return client


def assert_same_image(client: Client, img: samples.SampleImage) -> None:
    for blob in [img.manifest, *img.blobs]:
        assert client.content.read_all(blob.digest) == blob.data


# -- push ----------------------------------------------------------------------------------------------------


def test_push_single_manifest_round_trip_then_head_skip(make_registry: RegistryFactory, tmp_path: Path) -> None:
    src, dst = make_registry(), make_registry()
    img = two_layer_image()
    samples.push(src.url, "team/app", "v1", img)
    client = pulled(tmp_path / "root", f"{src.host}/team/app:v1")
    events: list[Event] = []
    client.on_event = events.append

    result = client.push(f"{dst.host}/copy/app:v1", f"{src.host}/team/app:v1")
    assert result.name == f"{dst.host}/copy/app:v1"
    assert result.digest == img.digest
    assert {str(d.digest) for d in result.pushed} == digests(img)
    assert result.mounted == () and result.existing == ()
    assert result.pushed[-1].digest == img.digest  # the manifest goes last
    done = {e.item for e in events if e.action == "push" and e.status == "done" and e.total}
    assert done == digests(img)
    # The store remembers the new home of each blob, for mounts later.
    assert client.content.info(img.layers[0].digest).labels[
        f"containerd.io/distribution.source.{dst.host}"] == "copy/app"

    back = pulled(tmp_path / "back", f"{dst.host}/copy/app:v1")
    assert back.image(f"{dst.host}/copy/app:v1").target.digest == img.digest
    assert_same_image(back, img)

    # Second push: HEADs only, nothing uploaded or PUT.
    mark = len(dst.log_text())
    again = client.push(f"{dst.host}/copy/app:v1", f"{src.host}/team/app:v1")
    assert again.pushed == () and again.mounted == ()
    assert {str(d.digest) for d in again.existing} == digests(img)
    lines = access_log(dst, mark)
    assert lines and all(line.startswith("HEAD ") for line in lines), lines

    # By digest: no tag is written; a digest that is not the image's is refused before anything is sent.
    by_digest = client.push(f"{dst.host}/pinned@{img.digest}", f"{src.host}/team/app:v1")
    assert by_digest.name == f"{dst.host}/pinned@{img.digest}"
    assert f"PUT /v2/pinned/manifests/{img.digest} HTTP/1.1\" 201" in access_log(dst)
    with pytest.raises(InvalidArgumentError, match=str(img.config.digest)):
        client.push(f"{dst.host}/pinned@{img.config.digest}", f"{src.host}/team/app:v1")


def test_push_multi_arch_all_platforms_and_one_platform(make_registry: RegistryFactory, tmp_path: Path) -> None:
    src, dst = make_registry(), make_registry()
    index, images = multi_arch()
    samples.push(src.url, "multi", "v1", index)
    client = pulled(tmp_path / "root", f"{src.host}/multi:v1", all_platforms=True)

    every = client.push(f"{dst.host}/multi:v1", f"{src.host}/multi:v1", all_platforms=True)
    assert every.digest == index.digest and every.target.media_type == mt.OCI_INDEX
    assert every.pushed[-1].digest == index.digest
    back = pulled(tmp_path / "back", f"{dst.host}/multi:v1", all_platforms=True)
    assert back.image(f"{dst.host}/multi:v1").target.digest == index.digest
    assert back.content.read_all(index.digest) == index.index.data
    for img in images.values():
        assert_same_image(back, img)

    # One platform of three: just that manifest, under the tag (the index would name absent manifests).
    arm = images["linux/arm64"]
    one = client.push(f"{dst.host}/arm:v1", f"{src.host}/multi:v1", platforms=["linux/arm64"])
    assert one.digest == arm.digest and one.target.media_type == arm.manifest.media_type
    assert {str(d.digest) for d in [*one.pushed, *one.existing, *one.mounted]} == digests(arm)
    single = pulled(tmp_path / "single", f"{dst.host}/arm:v1", platforms=["linux/arm64"])
    assert single.image(f"{dst.host}/arm:v1").target.digest == arm.digest
    assert_same_image(single, arm)

    # Every platform named: the index goes whole.
    named = client.push(f"{dst.host}/named:v1", f"{src.host}/multi:v1",
                        platforms=["linux/amd64", "linux/arm64", "linux/arm/v7"])
    assert named.digest == index.digest


def test_push_of_a_partly_pulled_index_names_every_missing_digest(registry: RegistryProcess, tmp_path: Path
                                                                  ) -> None:
    index, images = multi_arch()
    samples.push(registry.url, "multi", "v1", index)
    client = pulled(tmp_path / "root", f"{registry.host}/multi:v1", platforms=["linux/amd64"])
    mark = len(registry.log_text())
    with pytest.raises(FailedPreconditionError) as info:
        client.push(f"{registry.host}/elsewhere:v1", f"{registry.host}/multi:v1")
    message = str(info.value)
    for p in ("linux/arm64", "linux/arm/v7"):
        assert str(images[p].digest) in message
    assert "--platform" in message
    assert not [line for line in access_log(registry, mark) if "elsewhere" in line]  # nothing was sent
    # The platform that is there can be pushed.
    ok = client.push(f"{registry.host}/elsewhere:v1", f"{registry.host}/multi:v1", platforms=["linux/amd64"])
    assert ok.digest == images["linux/amd64"].digest


def test_cross_repository_mount(registry: RegistryProcess, tmp_path: Path) -> None:
    img = two_layer_image(seed=5)
    samples.push(registry.url, "a/x", "v1", img)
    client = pulled(tmp_path / "root", f"{registry.host}/a/x:v1")
    mark = len(registry.log_text())

    result = client.push(f"{registry.host}/b/y:v1", f"{registry.host}/a/x:v1")
    assert {d.digest for d in result.mounted} == {b.digest for b in img.blobs}
    assert [d.digest for d in result.pushed] == [img.digest]
    lines = access_log(registry, mark)
    mounts = [line for line in lines if line.startswith("POST /v2/b/y/blobs/uploads/?mount=")]
    assert len(mounts) == len(img.blobs) and all("from=a%2Fx" in m and m.endswith(" 201") for m in mounts)
    assert not [line for line in lines if line.startswith(("PUT /v2/b/y/blobs", "PATCH "))]
    assert_same_image(pulled(tmp_path / "back", f"{registry.host}/b/y:v1"), img)


def test_mount_that_fails_falls_back_to_upload(registry: RegistryProcess, tmp_path: Path) -> None:
    img = two_layer_image(seed=6)
    samples.push(registry.url, "a/x", "v1", img)
    client = pulled(tmp_path / "root", f"{registry.host}/a/x:v1")
    # The label claims a repository that does not hold the blobs: the registry opens an upload instead (202).
    for blob in img.blobs:
        client.content.update(blob.digest, {f"containerd.io/distribution.source.{registry.host}": "gone/repo"})
    mark = len(registry.log_text())
    result = client.push(f"{registry.host}/c/z:v1", f"{registry.host}/a/x:v1")
    assert result.mounted == ()
    assert {str(d.digest) for d in result.pushed} == digests(img)
    lines = access_log(registry, mark)
    assert [line for line in lines if "mount=" in line and line.endswith(" 202")]
    # The upload went into the session the refused mount opened: no second POST.
    assert not [line for line in lines if line.startswith("POST /v2/c/z/blobs/uploads/ ")]
    assert_same_image(pulled(tmp_path / "back", f"{registry.host}/c/z:v1"), img)


def test_chunked_upload(make_registry: RegistryFactory, tmp_path: Path) -> None:
    src, dst = make_registry(), make_registry()
    img = big_layer_image()
    samples.push(src.url, "big", "v1", img)
    client = pulled(tmp_path / "root", f"{src.host}/big:v1")
    events: list[Event] = []
    client.on_event = events.append
    mark = len(dst.log_text())

    client.push(f"{dst.host}/big:v1", f"{src.host}/big:v1", chunk_threshold=8192, chunk_size=8192)
    big = img.layers[1]
    patches = [line for line in access_log(dst, mark) if line.startswith("PATCH ")]
    assert len(patches) == -(-len(big.data) // 8192)
    progress = [e.current for e in events if e.item == str(big.digest) and e.status == "running" and e.current]
    assert progress == list(range(8192, len(big.data), 8192)) + [len(big.data)]
    assert_same_image(pulled(tmp_path / "back", f"{dst.host}/big:v1"), img)


def test_chunked_upload_resumes_from_the_registrys_range(
    make_registry: RegistryFactory, fault_proxy: Callable[[RegistryProcess], FaultProxy], tmp_path: Path
) -> None:
    src, dst = make_registry(), make_registry()
    img = big_layer_image()
    samples.push(src.url, "big", "v1", img)
    client = pulled(tmp_path / "root", f"{src.host}/big:v1")
    proxy = fault_proxy(dst)
    big = img.layers[1]

    def refuse_second_chunk(event: Event) -> None:  # once a chunk is in, the next PATCH is answered 416
        if event.item == str(big.digest) and event.status == "running" and event.current and not proxy.faults:
            proxy.add_fault(r"/blobs/uploads/", method="PATCH", status=416)

    client.on_event = refuse_second_chunk
    client.push(f"{proxy.host}/big:v1", f"{src.host}/big:v1", chunk_threshold=8192, chunk_size=8192)
    assert proxy.faults[0].hits == 1
    statuses = proxy.seen("GET", r"/blobs/uploads/")
    assert len(statuses) == 1  # asked where the upload stands ...
    assert len(proxy.seen("POST", r"/blobs/uploads/")) == len(img.blobs)  # ... and went on, no new upload
    chunks = -(-len(big.data) // 8192)
    assert len(proxy.seen("PATCH")) == chunks + 1
    assert_same_image(pulled(tmp_path / "back", f"{dst.host}/big:v1"), img)


def test_upload_the_registry_forgot_starts_over(
    make_registry: RegistryFactory, fault_proxy: Callable[[RegistryProcess], FaultProxy], tmp_path: Path
) -> None:
    src, dst = make_registry(), make_registry()
    img = big_layer_image()
    samples.push(src.url, "big", "v1", img)
    client = pulled(tmp_path / "root", f"{src.host}/big:v1")
    proxy = fault_proxy(dst)
    body = json.dumps({"errors": [{"code": "BLOB_UPLOAD_UNKNOWN", "message": "blob upload unknown"}]}).encode()
    proxy.add_fault(r"/blobs/uploads/", method="PATCH", status=404, body=body,
                    headers={"Content-Type": "application/json"})

    client.push(f"{proxy.host}/big:v1", f"{src.host}/big:v1", chunk_threshold=8192, chunk_size=8192)
    assert len(proxy.seen("POST", r"/blobs/uploads/")) == len(img.blobs) + 1  # the big blob started twice
    assert_same_image(pulled(tmp_path / "back", f"{dst.host}/big:v1"), img)


def test_failed_upload_cancels_its_session(
    make_registry: RegistryFactory, fault_proxy: Callable[[RegistryProcess], FaultProxy], tmp_path: Path
) -> None:
    src, dst = make_registry(), make_registry()
    img = two_layer_image(seed=4)
    samples.push(src.url, "app", "v1", img)
    client = pulled(tmp_path / "root", f"{src.host}/app:v1")
    for blob in img.blobs[:-1]:  # the destination lacks just one blob
        push_blob(dst.url, "app", blob.data)
    proxy = fault_proxy(dst)
    body = json.dumps({"errors": [{"code": "UNSUPPORTED", "message": "not here"}]}).encode()
    proxy.add_fault(r"/blobs/uploads/", method="PUT", status=400, body=body,
                    headers={"Content-Type": "application/json"})

    with pytest.raises(RegistryError, match=f"UNSUPPORTED.*{img.blobs[-1].digest}"):
        client.push(f"{proxy.host}/app:v1", f"{src.host}/app:v1")
    # Not a failure a new session would mend: no second POST, and the session is deleted.
    assert len(proxy.seen("POST", r"/blobs/uploads/")) == 1
    assert len(proxy.seen("DELETE", r"/blobs/uploads/")) == 1
    assert not proxy.seen("PUT", r"/manifests/")
    assert client.push(f"{proxy.host}/app:v1", f"{src.host}/app:v1").digest == img.digest


def test_push_with_token_auth(registry: RegistryProcess, make_token_registry: Callable[..., TokenRegistry],
                              tmp_path: Path) -> None:
    img = two_layer_image(seed=7)
    samples.push(registry.url, "app", "v1", img)
    tok = make_token_registry()
    ref = f"{tok.registry.host}/team/app:v1"

    anonymous = pulled(tmp_path / "anon", f"{registry.host}/app:v1")
    with pytest.raises(UnauthorizedError) as info:
        anonymous.push(ref, f"{registry.host}/app:v1")
    assert f"{tok.registry.host}/team/app" in str(info.value)
    assert "unauthorized" in str(info.value)

    bob = Client(tmp_path / "anon",
                 credentials=StaticCredentials(Credentials(username=tok.user, password=tok.password)))
    result = bob.push(ref, f"{registry.host}/app:v1")
    assert {str(d.digest) for d in result.pushed} == digests(img)
    scopes = {s for r in tok.issuer.requests if r.user == "bob" for s in r.scopes}
    assert "repository:team/app:pull,push" in scopes
    assert_same_image(pulled(tmp_path / "back", ref), img)  # anonymous pull is allowed

    # A mount asks for pull on the source repository too; bob has it.
    moved = bob.push(f"{tok.registry.host}/other/app:v1", f"{registry.host}/app:v1")
    assert {d.digest for d in moved.mounted} == {b.digest for b in img.blobs}
    assert any("repository:team/app:pull" in r.scopes and "repository:other/app:pull,push" in r.scopes
               for r in tok.issuer.requests if r.user == "bob")


def test_push_with_basic_auth(registry: RegistryProcess, basic_registry: BasicAuthRegistry, tmp_path: Path
                              ) -> None:
    img = two_layer_image(seed=8)
    samples.push(registry.url, "app", "v1", img)
    client = pulled(tmp_path / "root", f"{registry.host}/app:v1")
    ref = f"{basic_registry.registry.host}/app:v1"
    with pytest.raises(UnauthorizedError, match=re.escape(basic_registry.registry.host)):
        client.push(ref, f"{registry.host}/app:v1")
    alice = Client(tmp_path / "root", credentials=StaticCredentials(
        Credentials(username=basic_registry.user, password=basic_registry.password)))
    assert alice.push(ref, f"{registry.host}/app:v1").digest == img.digest
    assert alice.push(ref, f"{registry.host}/app:v1").pushed == ()


# -- copy ----------------------------------------------------------------------------------------------------


def test_copy_registry_to_registry_leaves_no_image_record(make_registry: RegistryFactory, tmp_path: Path
                                                          ) -> None:
    src, dst = make_registry(), make_registry()
    index, images = multi_arch()
    samples.push(src.url, "multi", "v1", index)
    client = Client(tmp_path / "root")
    result = client.copy(f"registry://{src.host}/multi:v1", f"{dst.host}/copied:v2")
    assert result.target.digest == index.digest
    assert client.list_images() == []
    back = pulled(tmp_path / "back", f"{dst.host}/copied:v2", all_platforms=True)
    for img in images.values():
        assert_same_image(back, img)
    # What passed through the store is garbage once the copy is over.
    gc, _ = client.gc()
    assert index.digest in gc.removed_content


def test_copy_registry_to_local_and_back(make_registry: RegistryFactory, tmp_path: Path) -> None:
    src, dst = make_registry(), make_registry()
    img = two_layer_image(seed=9)
    samples.push(src.url, "app", "v1", img)
    client = Client(tmp_path / "root")
    result = client.copy(f"{src.host}/app:v1", "local:mine/app:latest")
    assert [i.name for i in client.list_images()] == ["docker.io/mine/app:latest"]
    assert result.image is not None and result.image.target.digest == img.digest
    assert client.check("mine/app:latest").complete
    client.copy("local:mine/app:latest", f"registry://{dst.host}/app:v9")
    assert_same_image(pulled(tmp_path / "back", f"{dst.host}/app:v9"), img)


def test_copy_through_archives(make_registry: RegistryFactory, tmp_path: Path) -> None:
    src, dst = make_registry(), make_registry()
    index, images = multi_arch()
    samples.push(src.url, "multi", "v1", index)
    client = Client(tmp_path / "root")
    oci = tmp_path / "multi.tar"
    wrote = client.copy(f"{src.host}/multi:v1", f"oci-archive:{oci}:{dst.host}/multi:v1")
    assert wrote.archive == oci and oci.is_file() and wrote.target.digest == index.digest
    assert client.list_images() == []
    read = client.copy(f"oci-archive:{oci}:{dst.host}/multi:v1", f"{dst.host}/multi:v1")
    assert read.target.digest == index.digest and client.list_images() == []
    back = pulled(tmp_path / "back", f"{dst.host}/multi:v1", all_platforms=True)
    for img in images.values():
        assert_same_image(back, img)

    # One platform into a docker archive, then into the local store (the only image: no NAME needed).
    docker = tmp_path / "arm.tar"
    client.copy(f"{src.host}/multi:v1", f"docker-archive:{docker}", platforms=["linux/arm64"])
    local = client.copy(f"docker-archive:{docker}", "local:arm:v1", platforms=["linux/arm64"])
    assert local.image is not None and local.image.name == "docker.io/library/arm:v1"
    assert client.check("arm:v1", platforms=["linux/arm64"]).complete
    with pytest.raises(NotFoundError, match="nope"):
        client.copy(f"oci-archive:{oci}:nope", "local:x")


# -- CLI -----------------------------------------------------------------------------------------------------


def test_cli_push_and_copy(make_registry: RegistryFactory, make_token_registry: Callable[..., TokenRegistry],
                           basic_registry: BasicAuthRegistry, tmp_path: Path) -> None:
    src, dst = make_registry(), make_registry()
    img = two_layer_image(seed=11)
    samples.push(src.url, "cli/app", "v1", img)
    root = tmp_path / "root"
    ref = f"{src.host}/cli/app:v1"
    cli(root, "pull", "--no-unpack", ref)

    out = json.loads(cli(root, "push", f"{dst.host}/cli/app:v2", ref, "--output", "json").stdout)
    assert out["name"] == f"{dst.host}/cli/app:v2" and out["digest"] == str(img.digest)
    assert sorted(out["pushed"]) == sorted(digests(img))
    assert out["mounted"] == [] and out["existing"] == []
    plain = cli(root, "push", f"{dst.host}/cli/app:v2", ref)
    assert "0 pushed" in plain.stdout and "4 already there" in plain.stdout

    missing = cli(root, "push", f"{dst.host}/cli/app:v3", "no/such:image", check=False)
    assert missing.returncode == 1 and "no/such" in missing.stderr
    bad = cli(root, "push", "Bad/Ref", check=False)
    assert bad.returncode == 2

    tok = make_token_registry()
    denied = cli(root, "push", f"{tok.registry.host}/team/app:v1", ref, check=False)
    assert denied.returncode == 1
    assert "unauthorized" in denied.stderr and f"{tok.registry.host}/team/app" in denied.stderr
    allowed = cli(root, "push", "--user", f"{tok.user}:{tok.password}", f"{tok.registry.host}/team/app:v1", ref,
                  "--output", "json")
    assert json.loads(allowed.stdout)["digest"] == str(img.digest)

    copied = json.loads(cli(root, "copy", ref, "local:copied:v1", "--output", "json").stdout)
    assert copied["digest"] == str(img.digest)
    names = [i["name"] for i in json.loads(cli(root, "images", "ls", "--output", "json").stdout)]
    assert "docker.io/library/copied:v1" in names
    unknown = cli(root, "copy", ref, "ftp://host/x", check=False)
    assert unknown.returncode == 2

    # Credentials for one end only: the anonymous source is read without them.
    locked = f"{basic_registry.registry.host}/cli/app:v1"
    assert cli(root, "copy", ref, locked, check=False).returncode == 1
    both = cli(root, "copy", f"registry://{ref}", locked, "--dest-user",
               f"{basic_registry.user}:{basic_registry.password}", "--output", "json")
    assert sorted(json.loads(both.stdout)["pushed"]) == sorted(digests(img))


# -- planning (no registry) ----------------------------------------------------------------------------------


def put_blob(client: Client, blob: samples.Blob) -> None:
    if client.content.exists(blob.digest):
        return
    with client.content.writer(f"test-{blob.digest.hex}", expected=blob.digest, total=len(blob.data)) as w:
        w.write(blob.data)
        w.commit(len(blob.data), blob.digest)


def test_plan_orders_levels_skips_foreign_layers_and_chooses_platforms(tmp_path: Path) -> None:
    client = Client(tmp_path / "root")
    foreign = samples.build_image([samples.small_base_layer(), samples.files_layer({"f": b"x"})], docker=True,
                                  layer_media_types=[mt.DOCKER_LAYER_GZIP, mt.DOCKER_LAYER_FOREIGN_GZIP])
    for blob in [foreign.manifest, foreign.config, foreign.layers[0]]:  # the foreign layer is not in the store
        put_blob(client, blob)
    plan = plan_push(client.content, foreign.manifest.descriptor)
    assert plan.missing == () and [d.digest for d in plan.skipped] == [foreign.layers[1].digest]
    assert [{d.digest for d in level} for level in plan.levels] == [
        {foreign.config.digest, foreign.layers[0].digest}, {foreign.digest}]
    strict = plan_push(client.content, foreign.manifest.descriptor, allow_nondistributable=True)
    assert [d.digest for d in strict.missing] == [foreign.layers[1].digest]

    index, images = multi_arch()
    put_blob(client, index.index)
    for img in images.values():
        for blob in [img.manifest, *img.blobs]:
            put_blob(client, blob)
    whole = plan_push(client.content, index.index.descriptor)
    assert whole.whole and len(whole.levels) == 3 and whole.levels[-1] == (index.index.descriptor,)
    assert {d.digest for d in whole.levels[1]} == {img.digest for img in images.values()}
    arm = plan_push(client.content, index.index.descriptor, matcher=PlatformMatcher([Platform.parse("linux/arm64")]))
    assert not arm.whole and arm.target.digest == images["linux/arm64"].digest
    assert len(arm.descriptors) == 1 + len(images["linux/arm64"].blobs)
    with pytest.raises(NotFoundError, match="s390x"):
        plan_push(client.content, index.index.descriptor, matcher=PlatformMatcher([Platform.parse("linux/s390x")]))
