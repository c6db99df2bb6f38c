"""The registry client against real docker-registry processes: resolve, fetch with resume, auth (Basic,
Bearer, docker config, credential helpers), hosts.toml mirrors, retries and limits."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cargohold.content.local import LocalStore
from cargohold.devtools.registry import RegistryProcess, free_port, push_blob, push_manifest, start_registry
from cargohold.errors import (
    DigestMismatchError,
    InvalidArgumentError,
    NotFoundError,
    RegistryError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from cargohold.events import Event
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.remotes.auth import parse_challenges
from cargohold.remotes.credentials import (
    ChainCredentials,
    Credentials,
    DockerConfigCredentials,
    StaticCredentials,
    credentials_for,
)
from cargohold.remotes.fetch import fetch_blob, ingest_ref
from cargohold.remotes.hosts import load_hosts_toml, registry_hosts
from cargohold.remotes.http import RetryPolicy
from cargohold.remotes.resolver import Resolver
from support import BasicAuthRegistry, TokenRegistry
from support.faultproxy import FaultProxy

# -- a small image, built here -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Img:
    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]

    @property
    def digest(self) -> Digest:
        return Digest.from_bytes(self.manifest)

    @property
    def desc(self) -> Descriptor:
        return Descriptor(media_type=mt.OCI_MANIFEST, digest=self.digest, size=len(self.manifest))

    def layer_desc(self, i: int) -> Descriptor:
        data = self.layers[i]
        return Descriptor(media_type=mt.OCI_LAYER_GZIP, digest=Digest.from_bytes(data), size=len(data))

    @property
    def config_desc(self) -> Descriptor:
        return Descriptor(
            media_type=mt.OCI_CONFIG, digest=Digest.from_bytes(self.config), size=len(self.config)
        )


def make_image(seed: int = 1, layer_sizes: tuple[int, ...] = (3000, 300_000)) -> Img:
    rnd = random.Random(seed)
    layers = tuple(rnd.randbytes(n) for n in layer_sizes)  # opaque bytes: the client never looks inside
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": str(Digest.from_bytes(config)), "size": len(config)},
        "layers": [
            {"mediaType": mt.OCI_LAYER_GZIP, "digest": str(Digest.from_bytes(b)), "size": len(b)}
            for b in layers
        ],
    }
    return Img(manifest=json.dumps(doc, indent=1).encode(), config=config, layers=layers)


def seed(reg: RegistryProcess, repo: str, tag: str, img: Img, *, auth_header: str | None = None) -> None:
    for blob in (img.config, *img.layers):
        push_blob(reg.url, repo, blob, auth_header=auth_header)
    push_manifest(reg.url, repo, tag, img.manifest, mt.OCI_MANIFEST, auth_header=auth_header)


def pull_all(resolver: Resolver, ref: str, store: LocalStore) -> Descriptor:
    """Resolve and fetch the manifest, config and layers of a single-platform image."""
    name, desc = resolver.resolve(ref)
    fetcher = resolver.fetcher(name)
    fetch_blob(fetcher, store, desc)
    manifest = json.loads(store.read_all(desc.digest))
    for d in [manifest["config"], *manifest["layers"]]:
        fetch_blob(fetcher, store, Descriptor.from_dict(d))
    return desc


def assert_stored(store: LocalStore, img: Img) -> None:
    assert store.read_all(img.digest) == img.manifest
    assert store.read_all(img.config_desc.digest) == img.config
    for i, layer in enumerate(img.layers):
        assert store.read_all(img.layer_desc(i).digest) == layer


ProxyFactory = Callable[[RegistryProcess], FaultProxy]

# -- resolve -------------------------------------------------------------------------------------------------


def test_resolve_by_tag_uses_head_only(registry: RegistryProcess, fault_proxy: ProxyFactory) -> None:
    img = make_image()
    seed(registry, "team/app", "v1", img)
    proxy = fault_proxy(registry)
    name, desc = Resolver().resolve(f"{proxy.host}/team/app:v1")
    assert name == f"{proxy.host}/team/app:v1"
    assert desc == img.desc and desc.size == len(img.manifest) and desc.media_type == mt.OCI_MANIFEST
    seen = proxy.seen(path="/manifests/")
    assert [(r.method, r.path) for r in seen] == [("HEAD", "/v2/team/app/manifests/v1")]
    assert mt.OCI_INDEX in seen[0].headers["accept"] and mt.DOCKER_MANIFEST in seen[0].headers["accept"]


def test_resolve_falls_back_to_get_when_head_is_refused(
    registry: RegistryProcess, fault_proxy: ProxyFactory
) -> None:
    img = make_image()
    seed(registry, "app", "v1", img)
    proxy = fault_proxy(registry)
    proxy.add_fault(r"/manifests/", method="HEAD", status=405)
    _, desc = Resolver().resolve(f"{proxy.host}/app:v1")
    assert desc.digest == img.digest and desc.size == len(img.manifest)
    assert [r.method for r in proxy.seen(path="/manifests/")] == ["HEAD", "GET"]


def test_resolve_get_fallback_digests_the_bytes_when_head_lacks_headers(
    registry: RegistryProcess, fault_proxy: ProxyFactory
) -> None:
    img = make_image()
    seed(registry, "app", "v1", img)
    proxy = fault_proxy(registry)
    # A HEAD answer without Docker-Content-Digest and with a generic type: the GET body decides.
    proxy.add_fault(r"/manifests/", method="HEAD", status=200, headers={"Content-Type": "application/json"})
    _, desc = Resolver().resolve(f"{proxy.host}/app:v1")
    assert desc == img.desc


def test_resolve_by_digest(registry: RegistryProcess) -> None:
    img = make_image()
    seed(registry, "app", "v1", img)
    name, desc = Resolver().resolve(f"{registry.host}/app@{img.digest}")
    assert name == f"{registry.host}/app@{img.digest}"
    assert desc.digest == img.digest and desc.size == len(img.manifest)
    _, both = Resolver().resolve(f"{registry.host}/app:v1@{img.digest}")
    assert both.digest == img.digest


def test_resolve_by_digest_with_get_verifies_the_bytes(
    registry: RegistryProcess, fault_proxy: ProxyFactory
) -> None:
    img = make_image()
    other = make_image(seed=2)
    seed(registry, "app", "v1", img)
    seed(registry, "app", "v2", other)
    proxy = fault_proxy(registry)
    proxy.add_fault(r"/manifests/", method="HEAD", status=405, times=5)
    # The proxy answers the GET for img's digest with other's manifest: a lying registry.
    proxy.add_fault(
        rf"/manifests/{img.digest}",
        method="GET",
        status=200,
        body=other.manifest,
        headers={"Content-Type": mt.OCI_MANIFEST},
    )
    with pytest.raises(DigestMismatchError, match=img.digest.hex):
        Resolver().resolve(f"{proxy.host}/app@{img.digest}")


def test_missing_tag_and_repository_are_not_found(registry: RegistryProcess) -> None:
    seed(registry, "app", "v1", make_image())
    resolver = Resolver()
    with pytest.raises(NotFoundError) as err:
        resolver.resolve(f"{registry.host}/app:nope")
    assert str(err.value) == f"{registry.host}/app:nope: not found (MANIFEST_UNKNOWN)"
    with pytest.raises(NotFoundError, match=r"/nothing/here:v1: not found \((MANIFEST|NAME)_UNKNOWN\)"):
        resolver.resolve(f"{registry.host}/nothing/here:v1")


def test_schema1_is_refused_clearly(registry: RegistryProcess, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(registry)
    proxy.add_fault(
        r"/manifests/",
        method="HEAD",
        status=200,
        body=b"{}" * 50,
        headers={
            "Content-Type": mt.DOCKER_MANIFEST_SCHEMA1_SIGNED,
            "Docker-Content-Digest": str(Digest.from_bytes(b"x")),
        },
    )
    with pytest.raises(UnsupportedMediaTypeError, match=r"old/app:v1: .*schema 1 is not supported, convert it"):
        Resolver().resolve(f"{proxy.host}/old/app:v1")


def test_manifests_over_4_mib_are_refused(registry: RegistryProcess, fault_proxy: ProxyFactory) -> None:
    big = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "layers": [],
            "annotations": {"pad": "x" * (4 << 20)},
        }
    ).encode()
    proxy = fault_proxy(registry)
    # HEAD announces the size: refused before any body is read.
    proxy.add_fault(
        r"/manifests/",
        method="HEAD",
        status=200,
        body=big,
        headers={"Content-Type": mt.OCI_MANIFEST, "Docker-Content-Digest": str(Digest.from_bytes(big))},
    )
    with pytest.raises(
        InvalidArgumentError, match=r"huge:v1: manifest is \d+ bytes, larger than the 4 MiB limit"
    ):
        Resolver().resolve(f"{proxy.host}/huge:v1")
    # GET fallback with the body streamed: cut at the cap.
    proxy.add_fault(r"/manifests/", method="HEAD", status=405)
    proxy.add_fault(
        r"/manifests/", method="GET", status=200, body=big, headers={"Content-Type": mt.OCI_MANIFEST}
    )
    with pytest.raises(
        InvalidArgumentError, match=r"huge:v2: manifest is \d+ bytes, larger than the 4 MiB limit"
    ):
        Resolver().resolve(f"{proxy.host}/huge:v2")
    # And a fetch by descriptor.
    desc = Descriptor(media_type=mt.OCI_MANIFEST, digest=Digest.from_bytes(big), size=len(big))
    with pytest.raises(InvalidArgumentError, match="4 MiB"):
        Resolver().fetcher(f"{proxy.host}/huge:v3").fetch(desc)


# -- fetch ---------------------------------------------------------------------------------------------------


def test_fetch_everything_and_ingest_refs(
    registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path
) -> None:
    img = make_image()
    seed(registry, "app", "v1", img)
    proxy = fault_proxy(registry)
    store = LocalStore(tmp_path / "store")
    pull_all(Resolver(), f"{proxy.host}/app:v1", store)
    assert_stored(store, img)
    gets = [r.path for r in proxy.seen(method="GET")]
    assert f"/v2/app/manifests/{img.digest}" in gets
    assert f"/v2/app/blobs/{img.config_desc.digest}" in gets
    assert ingest_ref(img.desc) == f"manifest-{img.digest}"
    assert ingest_ref(img.layer_desc(0)) == f"layer-{img.layer_desc(0).digest}"
    assert ingest_ref(img.config_desc) == f"config-{img.config_desc.digest}"
    # Already present: nothing is fetched again.
    before = len(proxy.requests)
    fetch_blob(Resolver().fetcher(f"{proxy.host}/app:v1"), store, img.layer_desc(1))
    assert len(proxy.requests) == before


def test_dropped_connection_resumes_with_range(
    registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path
) -> None:
    img = make_image(layer_sizes=(2_000_000,))
    seed(registry, "app", "v1", img)
    layer = img.layer_desc(0)
    proxy = fault_proxy(registry)
    proxy.add_fault(rf"/blobs/{layer.digest}", method="GET", cut_after=700_000, times=2)
    store = LocalStore(tmp_path / "store")
    progress: list[tuple[int, int]] = []
    fetch_blob(
        Resolver().fetcher(f"{proxy.host}/app:v1"),
        store,
        layer,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert store.read_all(layer.digest) == img.layers[0]
    ranges = [r.range for r in proxy.seen(method="GET", path=f"/blobs/{layer.digest}")]
    assert ranges == [None, "bytes=700000-", "bytes=1400000-"]
    assert progress[-1] == (layer.size, layer.size)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


def test_server_ignoring_range_is_handled_by_skipping(
    registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path
) -> None:
    img = make_image(layer_sizes=(1_000_000,))
    seed(registry, "app", "v1", img)
    layer = img.layer_desc(0)
    proxy = fault_proxy(registry)
    proxy.add_fault(rf"/blobs/{layer.digest}", method="GET", cut_after=300_000)
    proxy.add_fault(rf"/blobs/{layer.digest}", method="GET", strip_request_headers=("Range",))
    store = LocalStore(tmp_path / "store")
    fetch_blob(Resolver().fetcher(f"{proxy.host}/app:v1"), store, layer)
    assert store.read_all(layer.digest) == img.layers[0]
    assert [r.fault for r in proxy.seen(path="/blobs/")] == ["cut after 300000", "strip range"]


def test_a_partial_ingest_left_by_an_earlier_run_is_resumed(
    registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path
) -> None:
    img = make_image(layer_sizes=(500_000,))
    seed(registry, "app", "v1", img)
    layer = img.layer_desc(0)
    store = LocalStore(tmp_path / "store")
    with store.writer(ingest_ref(layer), expected=layer.digest, total=layer.size) as w:
        w.write(img.layers[0][:123_456])
    proxy = fault_proxy(registry)
    fetch_blob(Resolver().fetcher(f"{proxy.host}/app:v1"), store, layer)
    assert store.read_all(layer.digest) == img.layers[0]
    assert [r.range for r in proxy.seen(path="/blobs/")] == ["bytes=123456-"]


def test_too_many_cuts_give_up_and_keep_the_partial(
    registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path
) -> None:
    img = make_image(layer_sizes=(400_000,))
    seed(registry, "app", "v1", img)
    layer = img.layer_desc(0)
    proxy = fault_proxy(registry)
    proxy.add_fault(r"/blobs/", method="GET", cut_after=50_000, times=10)
    store = LocalStore(tmp_path / "store")
    with pytest.raises(Exception, match=rf"{layer.digest}: gave up after 2 resumes"):
        fetch_blob(Resolver().fetcher(f"{proxy.host}/app:v1"), store, layer, max_resumes=2)
    assert not store.exists(layer.digest)
    assert store.status(ingest_ref(layer)).offset == 150_000


def test_corrupt_blob_in_registry_is_never_committed(registry: RegistryProcess, tmp_path: Path) -> None:
    img = make_image()
    seed(registry, "app", "v1", img)
    layer = img.layer_desc(1)
    data_path = registry.blob_data_path(layer.digest)
    raw = bytearray(data_path.read_bytes())
    raw[1000] ^= 0xFF
    data_path.write_bytes(bytes(raw))
    store = LocalStore(tmp_path / "store")
    with pytest.raises(DigestMismatchError) as err:
        fetch_blob(Resolver().fetcher(f"{registry.host}/app:v1"), store, layer)
    assert str(layer.digest) in str(err.value)
    assert not store.exists(layer.digest)
    assert store.list_statuses() == []  # the bad ingest is discarded, not left to "resume"


def test_missing_blob_is_not_found(registry: RegistryProcess, tmp_path: Path) -> None:
    seed(registry, "app", "v1", make_image())
    ghost = Descriptor(media_type=mt.OCI_LAYER_GZIP, digest=Digest.from_bytes(b"ghost"), size=5)
    with pytest.raises(NotFoundError, match=rf"app@{ghost.digest}: not found \(BLOB_UNKNOWN\)"):
        fetch_blob(Resolver().fetcher(f"{registry.host}/app:v1"), LocalStore(tmp_path / "s"), ghost)


def test_redirects_are_followed_without_the_authorization_header(
    make_token_registry: Callable[..., TokenRegistry],
    registry: RegistryProcess,
    fault_proxy: ProxyFactory,
    tmp_path: Path,
) -> None:
    tr = make_token_registry()
    img = make_image()
    seed(tr.registry, "app", "v1", img, auth_header=tr.auth_header("app"))
    seed(registry, "app", "v1", img)  # the "storage backend" the registry redirects to
    front = fault_proxy(tr.registry)
    backend = fault_proxy(registry)
    layer = img.layer_desc(1)
    front.add_fault(
        rf"/blobs/{layer.digest}",
        method="GET",
        status=307,
        headers={"Location": f"{backend.url}/v2/app/blobs/{layer.digest}?signed=1"},
    )
    store = LocalStore(tmp_path / "store")
    resolver = Resolver()
    resolver.resolve(f"{front.host}/app:v1")  # learns the token challenge; the fetch sends the token up front
    fetch_blob(resolver.fetcher(f"{front.host}/app:v1"), store, layer)
    assert store.read_all(layer.digest) == img.layers[1]
    [sent] = front.seen(path="/blobs/")
    assert sent.headers["authorization"].startswith("Bearer ")
    [followed] = backend.seen(path="/blobs/")
    assert followed.query == "signed=1" and "authorization" not in followed.headers


# -- retries -------------------------------------------------------------------------------------------------


def test_503_with_retry_after_is_retried(registry: RegistryProcess, fault_proxy: ProxyFactory) -> None:
    img = make_image()
    seed(registry, "app", "v1", img)
    proxy = fault_proxy(registry)
    proxy.add_fault(
        r"/manifests/",
        method="HEAD",
        status=503,
        headers={"Retry-After": "1"},
        body=b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}',
    )
    events: list[Event] = []
    t0 = time.monotonic()
    _, desc = Resolver(on_event=events.append).resolve(f"{proxy.host}/app:v1")
    elapsed = time.monotonic() - t0
    assert desc.digest == img.digest
    assert elapsed >= 0.95, f"Retry-After: 1 not honoured ({elapsed:.2f}s)"
    assert [r.method for r in proxy.seen(path="/manifests/")] == ["HEAD", "HEAD"]
    assert any(e.action == "host" and "HTTP 503" in e.message and "in 1.0s" in e.message for e in events)


def test_429_then_success_on_a_blob(
    registry: RegistryProcess, fault_proxy: ProxyFactory, tmp_path: Path
) -> None:
    img = make_image()
    seed(registry, "app", "v1", img)
    proxy = fault_proxy(registry)
    proxy.add_fault(r"/blobs/", status=429, times=2, headers={"Retry-After": "0"})
    store = LocalStore(tmp_path / "s")
    fetch_blob(Resolver().fetcher(f"{proxy.host}/app:v1"), store, img.layer_desc(0))
    assert store.read_all(img.layer_desc(0).digest) == img.layers[0]
    assert len(proxy.seen(path="/blobs/")) == 3


def test_persistent_5xx_gives_a_registry_error(registry: RegistryProcess, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(registry)
    proxy.add_fault(
        r"/manifests/",
        status=502,
        times=100,
        body=b'{"errors":[{"code":"UNAVAILABLE","message":"upstream down"}]}',
        headers={"Content-Type": "application/json"},
    )
    resolver = Resolver(retries=RetryPolicy(attempts=2, backoff=0.01))
    with pytest.raises(RegistryError) as err:
        resolver.resolve(f"{proxy.host}/app:v1")
    assert err.value.status == 502 and err.value.code == "UNAVAILABLE" and err.value.retryable
    assert proxy.host in str(err.value) and "upstream down" in str(err.value)
    # 2 HEADs, then the GET fallback's 2 attempts.
    assert [r.method for r in proxy.seen()] == ["HEAD", "HEAD", "GET", "GET"]


# -- Basic auth ----------------------------------------------------------------------------------------------


def test_htpasswd_basic_auth(basic_registry: BasicAuthRegistry, tmp_path: Path) -> None:
    br = basic_registry
    reg: RegistryProcess = br.registry
    img = make_image()
    seed(reg, "private/app", "v1", img, auth_header=br.auth_header)
    ref = f"{reg.host}/private/app:v1"

    good = Resolver(credentials=StaticCredentials(Credentials(username="alice", password="s3cret-pw")))
    store = LocalStore(tmp_path / "store")
    pull_all(good, ref, store)
    assert_stored(store, img)

    bad = Resolver(credentials=StaticCredentials(Credentials(username="alice", password="wrong")))
    with pytest.raises(UnauthorizedError) as err:
        bad.resolve(ref)
    assert (
        str(err.value)
        == f"{reg.host}/private/app: unauthorized: {reg.host} rejected credentials for user 'alice'"
    )

    with pytest.raises(
        UnauthorizedError, match=rf"{reg.host}/private/app: unauthorized: .*none is configured"
    ):
        Resolver().resolve(ref)


def test_docker_config_auths_entry(basic_registry: BasicAuthRegistry, tmp_path: Path) -> None:
    reg: RegistryProcess = basic_registry.registry
    img = make_image()
    seed(reg, "app", "v1", img, auth_header=basic_registry.auth_header)
    cfg = tmp_path / "docker" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(
        json.dumps(
            {
                "auths": {
                    f"http://{reg.host}/v1/": {"auth": base64.b64encode(b"alice:s3cret-pw").decode()},
                    "other.example:5000": {"username": "x", "password": "y"},
                }
            }
        )
    )
    store = LocalStore(tmp_path / "store")
    pull_all(Resolver(credentials=DockerConfigCredentials(cfg)), f"{reg.host}/app:v1", store)
    assert_stored(store, img)
    # $DOCKER_CONFIG is honoured by credentials_for, and --user comes first.
    os.environ["DOCKER_CONFIG"] = str(cfg.parent)
    try:
        chain = credentials_for(None)
        assert chain.get(reg.host) == Credentials(username="alice", password="s3cret-pw")
        explicit = credentials_for("carol:pw")
        assert explicit.get(reg.host) == Credentials(username="carol", password="pw")
        assert isinstance(explicit, ChainCredentials)
    finally:
        del os.environ["DOCKER_CONFIG"]
    with pytest.raises(InvalidArgumentError, match="--user carol: no password"):
        credentials_for("carol")
    assert credentials_for("carol", password_prompt=lambda user: f"pw-of-{user}").get("x") == Credentials(
        username="carol", password="pw-of-carol"
    )


def _helper_script(bin_dir: Path, name: str, answers: dict[str, tuple[str, str]], log: Path) -> None:
    """A real docker-credential-<name> executable: logs its stdin and answers from ``answers``."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    cases = "\n".join(
        f'  "{server}") printf \'{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}\' "$server" ;;'
        for server, (user, secret) in answers.items()
    )
    script.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
echo "$server" >> {log}
case "$server" in
{cases}
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_docker_config_cred_helpers_and_store(
    basic_registry: BasicAuthRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg: RegistryProcess = basic_registry.registry
    img = make_image()
    seed(reg, "app", "v1", img, auth_header=basic_registry.auth_header)
    bin_dir = tmp_path / "bin"
    log = tmp_path / "helper.log"
    _helper_script(bin_dir, "fake", {reg.host: ("alice", "s3cret-pw")}, log)
    _helper_script(bin_dir, "empty", {}, log)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"credHelpers": {reg.host: "fake"}}))
    store = LocalStore(tmp_path / "store")
    pull_all(Resolver(credentials=DockerConfigCredentials(cfg)), f"{reg.host}/app:v1", store)
    assert_stored(store, img)
    assert log.read_text().splitlines() == [reg.host]  # asked once, then cached

    # credsStore knows nothing: the auths entry is used.
    cfg.write_text(
        json.dumps(
            {"credsStore": "empty", "auths": {reg.host: {"username": "alice", "password": "s3cret-pw"}}}
        )
    )
    assert DockerConfigCredentials(cfg).get(reg.host) == Credentials(username="alice", password="s3cret-pw")
    # Docker Hub is asked for by its legacy server URL.
    assert DockerConfigCredentials(cfg).get("registry-1.docker.io") is None
    assert log.read_text().splitlines()[-1] == "https://index.docker.io/v1/"


# -- Bearer tokens -------------------------------------------------------------------------------------------


def test_bearer_token_anonymous_pull(
    make_token_registry: Callable[..., TokenRegistry], tmp_path: Path
) -> None:
    tr = make_token_registry(allow_anonymous=True)
    reg: RegistryProcess = tr.registry
    img = make_image()
    seed(reg, "pub/app", "v1", img, auth_header=tr.auth_header("pub/app"))
    store = LocalStore(tmp_path / "store")
    pull_all(Resolver(), f"{reg.host}/pub/app:v1", store)
    assert_stored(store, img)
    reqs = tr.issuer.requests
    assert len(reqs) == 1, "one token serves the resolve and every fetch"
    assert reqs[0].user is None and reqs[0].scopes == ["repository:pub/app:pull"]
    assert reqs[0].service == tr.issuer.service


def test_bearer_token_requires_credentials(
    make_token_registry: Callable[..., TokenRegistry], tmp_path: Path
) -> None:
    tr = make_token_registry(allow_anonymous=False)
    reg: RegistryProcess = tr.registry
    img = make_image()
    seed(reg, "priv/app", "v1", img, auth_header=tr.auth_header("priv/app"))
    ref = f"{reg.host}/priv/app:v1"
    with pytest.raises(
        UnauthorizedError,
        match=rf"{reg.host}/priv/app: unauthorized: token server .* refused "
        rf"anonymous access; no credentials for {reg.host}",
    ):
        Resolver().resolve(ref)
    with pytest.raises(UnauthorizedError, match=r"rejected user 'bob'"):
        Resolver(credentials=StaticCredentials(Credentials(username="bob", password="nope"))).resolve(ref)
    store = LocalStore(tmp_path / "store")
    pull_all(
        Resolver(credentials=StaticCredentials(Credentials(username="bob", password="t0ken-pw"))), ref, store
    )
    assert_stored(store, img)
    assert tr.issuer.requests[-1].user == "bob"


def test_bearer_identity_token_uses_the_oauth2_refresh_grant(
    make_token_registry: Callable[..., TokenRegistry], tmp_path: Path
) -> None:
    tr = make_token_registry(allow_anonymous=False)
    reg: RegistryProcess = tr.registry
    img = make_image()
    seed(reg, "app", "v1", img, auth_header=tr.auth_header("app"))
    refresh = tr.issuer.issue_refresh_token("bob")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {reg.host: {"identitytoken": refresh}}}))
    _, desc = Resolver(credentials=DockerConfigCredentials(cfg)).resolve(f"{reg.host}/app:v1")
    assert desc.digest == img.digest
    last = tr.issuer.requests[-1]
    assert (last.method, last.grant_type, last.user) == ("POST", "refresh_token", "bob")


def test_a_rejected_cached_token_is_refreshed_once(tmp_path: Path) -> None:
    """The registry restarts trusting a new signing key: the cached token fails, a new one is fetched."""
    from support.token_issuer import TokenIssuer

    img = make_image()
    port = free_port()
    first = TokenIssuer(tmp_path / "t1", users={"bob": "pw"}).start()
    try:
        reg = start_registry(tmp_path / "reg", token=first.token_auth(), port=port)
        with reg:
            seed(
                reg,
                "app",
                "v1",
                img,
                auth_header="Bearer "
                + first.make_token("bob", ["repository:app:pull,push"], anonymous=False),
            )
            resolver = Resolver()
            assert resolver.resolve(f"{reg.host}/app:v1")[1].digest == img.digest
            assert len(first.requests) == 1
    finally:
        first.stop()
    second = TokenIssuer(tmp_path / "t2", users={"bob": "pw"}).start()
    try:
        with start_registry(tmp_path / "reg", token=second.token_auth(), port=port) as reg:
            store = LocalStore(tmp_path / "store")
            fetch_blob(resolver.fetcher(f"{reg.host}/app:v1"), store, img.layer_desc(0))
            assert store.read_all(img.layer_desc(0).digest) == img.layers[0]
            assert len(second.requests) == 1
    finally:
        second.stop()


def test_challenge_parsing() -> None:
    [bearer, basic] = parse_challenges(
        [
            'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"',
            'Basic realm="x, y"',
        ]
    )
    assert bearer.scheme == "bearer" and bearer.params["realm"] == "https://auth.example/token"
    assert (
        bearer.scopes == frozenset({"repository:a/b:pull,push"})
        and bearer.params["service"] == "registry.example"
    )
    assert basic.scheme == "basic" and basic.params == {"realm": "x, y"}
    both = parse_challenges(['Basic realm="r", Bearer realm="t", error="invalid_token"'])
    assert [c.scheme for c in both] == ["basic", "bearer"] and both[1].params["error"] == "invalid_token"


# -- hosts.toml ----------------------------------------------------------------------------------------------


def test_hosts_toml_mirror_is_used_first(
    registry: RegistryProcess,
    make_registry: Callable[..., RegistryProcess],
    fault_proxy: ProxyFactory,
    tmp_path: Path,
) -> None:
    img = make_image()
    mirror = make_registry()
    seed(mirror, "team/app", "v1", img)  # only the mirror has the image
    mproxy = fault_proxy(mirror)
    hosts_dir = tmp_path / "hosts"
    (hosts_dir / registry.host).mkdir(parents=True)
    (hosts_dir / registry.host / "hosts.toml").write_text(f"""
server = "http://{registry.host}"

[host."http://{mproxy.host}"]
  capabilities = ["pull", "resolve"]
""")
    events: list[Event] = []
    resolver = Resolver(hosts_dir=hosts_dir, on_event=events.append)
    store = LocalStore(tmp_path / "store")
    pull_all(resolver, f"{registry.host}/team/app:v1", store)
    assert_stored(store, img)
    seen = mproxy.seen()
    assert seen and all(r.query == f"ns={registry.host}" for r in seen)
    assert "/v2/team/app/manifests/" not in registry.log_text()


def test_broken_mirror_falls_back_to_the_server(registry: RegistryProcess, tmp_path: Path) -> None:
    img = make_image()
    seed(registry, "app", "v1", img)
    dead = free_port()  # nothing listens there
    hosts_dir = tmp_path / "hosts"
    (hosts_dir / "_default").mkdir(parents=True)
    (hosts_dir / "_default" / "hosts.toml").write_text(f'[host."http://127.0.0.1:{dead}"]\n')
    events: list[Event] = []
    resolver = Resolver(hosts_dir=hosts_dir, on_event=events.append)
    t0 = time.monotonic()
    store = LocalStore(tmp_path / "store")
    pull_all(resolver, f"{registry.host}/app:v1", store)
    assert time.monotonic() - t0 < 5, "connection refused must not be retried with backoff"
    assert_stored(store, img)
    errors = [e for e in events if e.action == "host" and e.status == "error"]
    assert errors and all(f"127.0.0.1:{dead}" in e.item and "cannot connect" in e.message for e in errors)
    assert any(e.status == "done" and e.item == f"registry http://{registry.host}/v2" for e in events)


def test_mirror_missing_a_blob_falls_back_for_that_blob(
    registry: RegistryProcess, make_registry: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    img = make_image()
    mirror = make_registry()
    seed(mirror, "app", "v1", img)
    seed(registry, "app", "v1", img)
    gone = img.layer_desc(1).digest
    mirror.blob_data_path(gone).unlink()  # the mirror lost a blob: it answers 404 for it
    hosts_dir = tmp_path / "hosts"
    name, _, port = registry.host.partition(":")
    (hosts_dir / f"{name}_{port}_").mkdir(parents=True)
    (hosts_dir / f"{name}_{port}_" / "hosts.toml").write_text(f'[host."http://{mirror.host}"]\n')
    store = LocalStore(tmp_path / "store")
    mark = len(registry.log_text())
    pull_all(Resolver(hosts_dir=hosts_dir), f"{registry.host}/app:v1", store)
    assert_stored(store, img)
    served = [line for line in registry.log_text()[mark:].splitlines() if line.startswith("127.0.0.1 - -")]
    assert len(served) == 1 and f'"GET /v2/app/blobs/{gone} HTTP/1.1" 200' in served[0]


def test_hosts_toml_fields(tmp_path: Path) -> None:
    d = tmp_path / "registry.example:5000"
    d.mkdir()
    (d / "hosts.toml").write_text("""
server = "https://registry.example:5000"
skip_verify = true

[host."https://mirror.example/some/prefix"]
  capabilities = ["pull"]
  ca = "mirror-ca.pem"
  client = [["/etc/certs/c.cert", "/etc/certs/c.key"], ["c2.pem", ""]]
  [host."https://mirror.example/some/prefix".header]
    x-custom = "one"
    x-multi = ["a", "b"]

[host."http://flat.example:8080/api"]
  override_path = true
  ca = ["a.pem", "/abs/b.pem"]
  client = "client.pem"
""")
    hosts = load_hosts_toml(d / "hosts.toml", "registry.example:5000")
    mirror, flat, server = hosts
    assert (mirror.scheme, mirror.host, mirror.path, mirror.is_mirror) == (
        "https",
        "mirror.example",
        "/some/prefix/v2",
        True,
    )
    assert mirror.capabilities == frozenset({"pull"}) and not mirror.skip_verify
    assert mirror.ca == (d / "mirror-ca.pem",)
    assert mirror.client == ((Path("/etc/certs/c.cert"), Path("/etc/certs/c.key")), (d / "c2.pem", None))
    assert dict(mirror.headers) == {"x-custom": ("one",), "x-multi": ("a", "b")}
    assert mirror.url("app/manifests/v1") == (
        "https://mirror.example/some/prefix/v2/app/manifests/v1?ns=registry.example:5000"
    )
    assert (flat.scheme, flat.host, flat.path) == ("http", "flat.example:8080", "/api")
    assert flat.ca == (d / "a.pem", Path("/abs/b.pem")) and flat.client == ((d / "client.pem", None),)
    assert flat.capabilities == frozenset({"pull", "resolve", "push"})
    assert (server.host, server.is_mirror, server.skip_verify, server.path) == (
        "registry.example:5000",
        False,
        True,
        "/v2",
    )
    assert server.url("x/blobs/y") == "https://registry.example:5000/v2/x/blobs/y"
    # Found through --hosts-dir by the host:port directory; other hosts get the default.
    assert registry_hosts("registry.example:5000", hosts_dir=tmp_path) == hosts
    [default] = registry_hosts("docker.io", hosts_dir=tmp_path)
    assert (default.scheme, default.host, default.is_mirror) == ("https", "registry-1.docker.io", False)
    [local] = registry_hosts("localhost:5000")
    assert local.base_url == "http://localhost:5000"
    [forced] = registry_hosts("registry.example", plain_http=True)
    assert forced.base_url == "http://registry.example"
    bad = tmp_path / "bad.example"
    bad.mkdir()
    (bad / "hosts.toml").write_text('[host."https://m"]\n  capabilities = ["pull", "teleport"]\n')
    with pytest.raises(
        InvalidArgumentError, match=r"bad.example/hosts.toml: host 'https://m': unknown capabilities"
    ):
        registry_hosts("bad.example", hosts_dir=tmp_path)


def test_transport_is_thread_safe_under_parallel_fetches(registry: RegistryProcess, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    img = make_image(layer_sizes=tuple(50_000 + i for i in range(12)))
    seed(registry, "app", "v1", img)
    resolver = Resolver()
    fetcher = resolver.fetcher(f"{registry.host}/app:v1")
    store = LocalStore(tmp_path / "store")
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: fetch_blob(fetcher, store, img.layer_desc(i)), range(len(img.layers))))
    for i, layer in enumerate(img.layers):
        assert (
            hashlib.sha256(store.read_all(img.layer_desc(i).digest)).hexdigest()
            == hashlib.sha256(layer).hexdigest()
        )


# -- TLS -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("cargohold test CA"))
        .issuer_name(name("cargohold test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: x509.GeneralName | None) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return write_cert(cert, d / f"{cn}.pem"), write_key(key, d / f"{cn}.key")

    return Pki(
        ca=write_cert(ca_cert, d / "ca.pem"),
        server=leaf(
            "server", ExtendedKeyUsageOID.SERVER_AUTH, x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        ),
        client=leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH, None),
    )


def test_tls_registry_with_ca_client_certificate_and_skip_verify(tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="needs the cryptography package (test extra) for certificates")
    pki = make_pki(tmp_path / "pki")
    img = make_image()
    with start_registry(tmp_path / "reg") as plain:
        seed(plain, "app", "v1", img)
    # Same storage, now served over TLS and requiring a client certificate.
    with start_registry(tmp_path / "reg", tls=pki.server, tls_client_ca=pki.ca) as reg:
        assert reg.url.startswith("https://")
        host_dir = tmp_path / "hosts" / reg.host
        host_dir.mkdir(parents=True)
        for name in ("ca.pem", "client.pem", "client.key"):
            (host_dir / name).write_bytes((tmp_path / "pki" / name).read_bytes())
        toml = host_dir / "hosts.toml"
        ref = f"{reg.host}/app:v1"
        resolver = Resolver(hosts_dir=tmp_path / "hosts")

        toml.write_text(f'server = "https://{reg.host}"\n')
        with pytest.raises(UnavailableError, match=rf"{reg.host}: HEAD .*CERTIFICATE_VERIFY_FAILED"):
            resolver.resolve(ref)

        toml.write_text(f'server = "https://{reg.host}"\nca = "ca.pem"\n')
        with pytest.raises(UnavailableError, match=rf"{reg.host}: HEAD "):
            resolver.resolve(ref)  # the server wants a client certificate

        toml.write_text(
            f'server = "https://{reg.host}"\nca = "ca.pem"\nclient = [["client.pem", "client.key"]]\n'
        )
        store = LocalStore(tmp_path / "store")
        pull_all(resolver, ref, store)
        assert_stored(store, img)

        toml.write_text(
            f'server = "https://{reg.host}"\nskip_verify = true\nclient = [["client.pem", "client.key"]]\n'
        )
        assert resolver.resolve(ref)[1].digest == img.digest
