"""OCI 1.1 artifacts and referrers against the real docker-registry 2.8 (which has no referrers API: the
referrers tag schema is what cargohold writes and reads there): push with the fallback tag, ``cargohold
referrers``, pull/copy/export/import byte for byte, and the clear refusal to unpack an artifact. The referrers
API's parsing and pagination are tested on real bytes without a server (no registry in Debian has the API)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import urllib3

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.artifacts import (
    LEGACY_CONFIG,
    NOTARY_SIGNATURE,
    SPDX,
    SampleArtifact,
    legacy_config_artifact,
    push_artifact,
    sbom_artifact,
    signature_artifact,
)
from cargohold.devtools.registry import RegistryProcess
from cargohold.errors import InvalidArgumentError, UnsupportedMediaTypeError
from cargohold.oci import mediatypes as mt
from cargohold.oci.artifact import (
    EMPTY_JSON_DIGEST,
    artifact_type,
    is_image,
    referrer_descriptor,
    referrers_tag,
)
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.manifest import Index, Manifest
from cargohold.remotes.referrers import (
    ReferrersPage,
    collect_pages,
    filters_applied,
    next_link,
    parse_page,
)
from support.cli import cli

RegistryFactory = Callable[..., RegistryProcess]

_http = urllib3.PoolManager()


def subject_image() -> samples.SampleImage:
    return samples.build_image([samples.small_base_layer(), samples.files_layer({"app": b"subject\n"})])


def get_manifest(reg: RegistryProcess, repo: str, reference: str) -> tuple[int, str, bytes]:
    """Status, Content-Type and bytes of ``/v2/<repo>/manifests/<reference>``, straight from the registry."""
    resp = _http.request("GET", f"{reg.url}/v2/{repo}/manifests/{reference}",
                         headers={"Accept": f"{mt.OCI_INDEX}, {mt.OCI_MANIFEST}"})
    return resp.status, resp.headers.get("Content-Type", ""), bytes(resp.data)


def entry(art: SampleArtifact, annotations: dict[str, str]) -> dict[str, object]:
    """A referrers index entry as the distribution spec defines it, written out by hand."""
    return {"mediaType": mt.OCI_MANIFEST, "digest": str(art.digest), "size": len(art.manifest.data),
            "artifactType": art.artifact_type, "annotations": annotations}


def assert_stored(client: Client, art: SampleArtifact) -> None:
    for blob in [art.manifest, *art.blobs]:
        assert client.content.read_all(blob.digest) == blob.data


@pytest.fixture
def seeded(registry: RegistryProcess) -> tuple[RegistryProcess, samples.SampleImage, dict[str, SampleArtifact]]:
    """The subject image at ``app:v1``; its three artifacts seeded in ``staging`` (no referrers tag there)."""
    img = subject_image()
    samples.push(registry.url, "app", "v1", img)
    subject = Descriptor(media_type=img.manifest.media_type, digest=img.digest, size=len(img.manifest.data))
    arts = {"sbom": sbom_artifact(subject), "sig": signature_artifact(subject),
            "legacy": legacy_config_artifact(subject)}
    for tag, art in arts.items():
        push_artifact(registry.url, "staging", tag, art)
    return registry, img, arts


# -- the model -----------------------------------------------------------------------------------------------


def test_artifact_model_and_builder_are_deterministic() -> None:
    img = subject_image()
    subject = img.manifest.descriptor
    sbom, again = sbom_artifact(subject), sbom_artifact(subject)
    assert sbom.manifest.data == again.manifest.data
    doc = json.loads(sbom.manifest.data)
    assert doc["artifactType"] == SPDX
    assert doc["config"] == {"mediaType": mt.OCI_EMPTY, "digest": str(EMPTY_JSON_DIGEST), "size": 2}
    assert str(EMPTY_JSON_DIGEST) == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert doc["subject"] == {"mediaType": mt.OCI_MANIFEST, "digest": str(img.digest),
                              "size": len(img.manifest.data)}
    parsed = Manifest.parse(sbom.manifest.data)
    assert not is_image(parsed) and artifact_type(parsed) == SPDX
    legacy = Manifest.parse(legacy_config_artifact(subject).manifest.data)
    assert "artifactType" not in json.loads(legacy.raw) and artifact_type(legacy) == LEGACY_CONFIG
    assert is_image(Manifest.parse(img.manifest.data))
    assert referrers_tag(img.digest) == f"sha256-{img.digest.hex}"

    # Entries of the referrers index: a manifest's type falls back to its config's; an index has its own or none.
    sbom_desc = sbom.manifest.descriptor
    assert referrer_descriptor(sbom_desc, parsed).to_dict() == {
        "mediaType": mt.OCI_MANIFEST, "digest": str(sbom.digest), "size": len(sbom.manifest.data),
        "artifactType": SPDX, "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z",
                                              "org.example.kind": "sbom"}}
    assert referrer_descriptor(sbom_desc, legacy).artifact_type == LEGACY_CONFIG
    for extra, kind in (({"artifactType": "application/x.bundle"}, "application/x.bundle"), ({}, "")):
        raw = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [sbom_desc.to_dict()],
                          "subject": subject.to_dict(), **extra}).encode()
        index = Index.parse(raw)
        got = referrer_descriptor(Descriptor(media_type=mt.OCI_INDEX, digest=index.digest, size=len(raw)), index)
        assert got.artifact_type == kind and "artifactType" not in got.to_dict() if not kind else True


# -- push, the fallback tag, `cargohold referrers` --------------------------------------------------------------


def test_push_keeps_the_referrers_tag_and_referrers_lists_it(
        seeded: tuple[RegistryProcess, samples.SampleImage, dict[str, SampleArtifact]], tmp_path: Path) -> None:
    reg, img, arts = seeded
    root = tmp_path / "root"
    tag = f"sha256-{img.digest.hex}"
    image_ref = f"{reg.host}/app:v1"
    assert get_manifest(reg, "app", tag)[0] == 404
    assert json.loads(cli(root, "referrers", image_ref, "--output", "json").stdout) == []

    for name in ("sbom", "sig", "legacy"):
        cli(root, "pull", "--no-unpack", f"{reg.host}/staging:{name}")
    cli(root, "push", f"{reg.host}/app:sbom", f"{reg.host}/staging:sbom")
    status, content_type, raw = get_manifest(reg, "app", tag)
    assert status == 200 and content_type == mt.OCI_INDEX
    sbom_entry = entry(arts["sbom"], {"org.opencontainers.image.created": "2024-01-01T00:00:00Z",
                                      "org.example.kind": "sbom"})
    assert json.loads(raw) == {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [sbom_entry]}
    # The artifact itself arrived byte for byte.
    assert get_manifest(reg, "app", "sbom")[2] == arts["sbom"].manifest.data

    # Pushed again (under another tag, so the manifest PUT happens): listed once.
    cli(root, "push", f"{reg.host}/app:sbom-again", f"{reg.host}/staging:sbom")
    assert get_manifest(reg, "app", tag)[2] == raw
    # A second artifact is added after the first; the legacy one's type is its config media type.
    cli(root, "push", f"{reg.host}/app:sig", f"{reg.host}/staging:sig")
    cli(root, "push", f"{reg.host}/app:legacy", f"{reg.host}/staging:legacy")
    expected = [sbom_entry,
                entry(arts["sig"], {"org.opencontainers.image.created": "2024-01-02T00:00:00Z"}),
                entry(arts["legacy"], {"org.opencontainers.image.created": "2024-01-03T00:00:00Z"})]
    assert json.loads(get_manifest(reg, "app", tag)[2])["manifests"] == expected

    assert json.loads(cli(root, "referrers", image_ref, "--output", "json").stdout) == expected
    by_digest = cli(root, "referrers", f"{reg.host}/app@{img.digest}", "--output", "json").stdout
    assert json.loads(by_digest) == expected
    only_sig = cli(root, "referrers", image_ref, "--artifact-type", NOTARY_SIGNATURE, "--output", "json").stdout
    assert json.loads(only_sig) == [expected[1]]
    assert json.loads(cli(root, "referrers", image_ref, "--artifact-type", "x/none", "-o", "json").stdout) == []

    lines = cli(root, "referrers", image_ref).stdout.splitlines()
    assert lines[0].split() == ["DIGEST", "ARTIFACT", "TYPE", "SIZE", "CREATED", "ANNOTATIONS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {str(a.digest) for a in arts.values()}
    sbom_row = rows[str(arts["sbom"].digest)]
    assert SPDX in sbom_row and "2024-01-01T00:00:00Z" in sbom_row and "org.example.kind=sbom" in sbom_row
    assert LEGACY_CONFIG in rows[str(arts["legacy"].digest)]

    # A subject nobody refers to, and a reference that does not exist.
    assert Client(tmp_path / "api").referrers(f"{reg.host}/staging:sbom") == []
    missing = cli(root, "referrers", f"{reg.host}/app:nope", check=False)
    assert missing.returncode == 1 and "app:nope" in missing.stderr and "Traceback" not in missing.stderr


def test_a_referrers_tag_that_is_not_an_index_fails_the_push_clearly(
        seeded: tuple[RegistryProcess, samples.SampleImage, dict[str, SampleArtifact]], tmp_path: Path) -> None:
    reg, img, arts = seeded
    tag = f"sha256-{img.digest.hex}"
    samples.push(reg.url, "app", tag, img)  # someone put an image where the referrers index belongs
    client = Client(tmp_path / "root")
    client.pull(f"{reg.host}/staging:sbom", unpack=False)
    with pytest.raises(UnsupportedMediaTypeError, match=f"referrers tag {reg.host}/app:{tag}"):
        client.push(f"{reg.host}/app:sbom", f"{reg.host}/staging:sbom")
    assert get_manifest(reg, "app", tag)[2] == img.manifest.data  # left as it was
    with pytest.raises(UnsupportedMediaTypeError, match=f"referrers tag {reg.host}/app:{tag}"):
        client.referrers(f"{reg.host}/app:v1")
    client.close()


# -- pull, unpack refusal ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [("sbom", SPDX), ("legacy", LEGACY_CONFIG)])
def test_pull_refuses_to_unpack_an_artifact_and_records_nothing(
        seeded: tuple[RegistryProcess, samples.SampleImage, dict[str, SampleArtifact]], tmp_path: Path,
        name: str, kind: str) -> None:
    reg, _, arts = seeded
    art = arts[name]
    root = tmp_path / "root"
    ref = f"{reg.host}/staging:{name}"
    refused = cli(root, "pull", ref, check=False)
    message = f"cargohold: error: {ref}: not a runnable image: an artifact of type {kind} (pull --no-unpack fetches it)"
    # Progress lines come first on stderr; the error is the last line, and no traceback.
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in refused.stderr
    assert json.loads(cli(root, "images", "ls", "--output", "json").stdout) == []
    client = Client(root)
    assert not any(client.content.exists(b.digest) for b in art.blobs)  # nothing fetched past the manifest
    client.close()

    cli(root, "pull", "--no-unpack", ref)
    client = Client(root)
    assert_stored(client, art)
    assert client.check(ref).complete
    assert "complete" in cli(root, "images", "check", ref).stdout
    for args in (["unpack", ref], ["rootfs", ref, str(tmp_path / "rootfs")], ["mount", ref, str(tmp_path)]):
        same = cli(root, *args, check=False)
        assert same.returncode == 2, args
        assert same.stderr.strip().splitlines()[-1] == message and "Traceback" not in same.stderr
    assert not (tmp_path / "rootfs").exists() or not any((tmp_path / "rootfs").iterdir())
    with pytest.raises(UnsupportedMediaTypeError, match="not a runnable image"):
        client.resolve_manifest(ref)
    client.close()


# -- copy, export, import ------------------------------------------------------------------------------------


def test_copy_export_import_keep_artifacts_byte_for_byte(
        seeded: tuple[RegistryProcess, samples.SampleImage, dict[str, SampleArtifact]],
        make_registry: RegistryFactory, tmp_path: Path) -> None:
    reg, img, arts = seeded
    dst = make_registry()
    client = Client(tmp_path / "root")
    # registry -> registry: the image and its artifacts; the destination lists them as referrers.
    client.copy(f"{reg.host}/app:v1", f"{dst.host}/app:v1")
    for name in ("sbom", "sig"):
        result = client.copy(f"{reg.host}/staging:{name}", f"{dst.host}/app:{name}")
        assert result.target.digest == arts[name].digest
        assert get_manifest(dst, "app", name)[2] == arts[name].manifest.data
    listed = client.referrers(f"{dst.host}/app:v1")
    assert [d.digest for d in listed] == [arts["sbom"].digest, arts["sig"].digest]
    assert [d.artifact_type for d in listed] == [SPDX, NOTARY_SIGNATURE]
    assert [d.digest for d in client.referrers(f"{dst.host}/app:v1", artifact_type=SPDX)] == [arts["sbom"].digest]

    # registry -> oci-archive -> local store (import): same digests, same bytes.
    oci = tmp_path / "sig.tar"
    client.copy(f"{reg.host}/staging:sig", f"oci-archive:{oci}:sig:v1")
    local = client.copy(f"oci-archive:{oci}:sig:v1", "local:sig:v1")
    assert local.image is not None and local.image.target.digest == arts["sig"].digest
    assert_stored(client, arts["sig"])
    assert client.check("sig:v1").complete

    # export / import of a pulled artifact (import unpacks images by default: the artifact is skipped).
    root = tmp_path / "cli"
    ref = f"{reg.host}/staging:legacy"
    cli(root, "pull", "--no-unpack", ref)
    tar = tmp_path / "legacy.tar"
    cli(root, "export", str(tar), ref)
    other = tmp_path / "other"
    cli(other, "import", str(tar))
    imported = Client(other)
    assert imported.image(ref).target.digest == arts["legacy"].digest
    assert_stored(imported, arts["legacy"])
    assert imported.check(ref).complete
    # ... and pushed from there, byte for byte, listed under its subject.
    imported.push(f"{dst.host}/app:legacy", ref)
    assert get_manifest(dst, "app", "legacy")[2] == arts["legacy"].manifest.data
    assert [d.digest for d in imported.referrers(f"{dst.host}/app:v1")][-1] == arts["legacy"].digest
    imported.close()
    client.close()


# -- the referrers API (parsing and pagination, on real bytes) ------------------------------------------------


def referrers_page(*arts: SampleArtifact) -> bytes:
    """A referrers API answer as a registry writes it (pretty-printed, unlike our fallback tag)."""
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
           "manifests": [{**a.manifest.descriptor.to_dict(), "artifactType": a.artifact_type} for a in arts]}
    return json.dumps(doc, indent=3).encode()


def test_referrers_api_link_filters_and_pagination() -> None:
    subject = subject_image().manifest.descriptor
    sbom, sig, legacy = sbom_artifact(subject), signature_artifact(subject), legacy_config_artifact(subject)
    base = f"http://127.0.0.1:5000/v2/app/referrers/{subject.digest}"

    assert next_link({"Link": '</v2/app/referrers/x?n=2&last=abc>; rel="next"'}, base) == \
        "http://127.0.0.1:5000/v2/app/referrers/x?n=2&last=abc"
    assert next_link({"Link": '<http://127.0.0.1:5001/p2>; rel=next'}, base) == "http://127.0.0.1:5001/p2"
    assert next_link({"Link": '<https://x/prev>; rel="prev", <p3>; title="t"; rel="next"'}, base) == \
        "http://127.0.0.1:5000/v2/app/referrers/p3"
    assert next_link({"Link": '<https://x/prev>; rel="prev"'}, base) == ""
    assert next_link({}, base) == ""
    assert filters_applied({"OCI-Filters-Applied": "artifactType, other"}) == {"artifactType", "other"}
    assert filters_applied({}) == frozenset()

    # Not filtered by the registry: filtered here. Filtered by it: taken as is.
    raw = referrers_page(sbom, sig, legacy)
    page = parse_page(raw, {}, base, SPDX)
    assert [d.digest for d in page.entries] == [sbom.digest] and page.next_url == ""
    trusted = parse_page(raw, {"OCI-Filters-Applied": "artifactType"}, base, SPDX)
    assert [d.digest for d in trusted.entries] == [sbom.digest, sig.digest, legacy.digest]
    assert [d.artifact_type for d in parse_page(raw, {}, base, None).entries] == [SPDX, NOTARY_SIGNATURE,
                                                                                   LEGACY_CONFIG]

    # Three pages linked by Link headers; a digest repeated across pages is listed once.
    pages = {
        base: (referrers_page(sbom), {"Link": f'<{base}?last=1>; rel="next"'}),
        f"{base}?last=1": (referrers_page(sig, sbom), {"Link": '</v2/app/referrers/p3>; rel="next"'}),
        "http://127.0.0.1:5000/v2/app/referrers/p3": (referrers_page(legacy), {}),
    }
    got = collect_pages(base, lambda url: parse_page(pages[url][0], pages[url][1], url, None))
    assert [d.digest for d in got] == [sbom.digest, sig.digest, legacy.digest]

    # A Link that loops back is an error, not an endless listing.
    def loop(url: str) -> ReferrersPage:
        return ReferrersPage(entries=(), next_url=base)

    with pytest.raises(InvalidArgumentError, match="pagination does not end"):
        collect_pages(base, loop)
    # A Link to another host is not followed (the request would carry this registry's credentials).
    elsewhere = {base: (referrers_page(sbom), {"Link": '<http://127.0.0.1:5001/v2/app/referrers/p2>; rel="next"'})}
    with pytest.raises(InvalidArgumentError, match="is on another host"):
        collect_pages(base, lambda url: parse_page(elsewhere[url][0], elsewhere[url][1], url, None))
    # A referrers answer must be an OCI index.
    docker_list = json.dumps({"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST_LIST, "manifests": []}).encode()
    with pytest.raises(InvalidArgumentError, match="not an OCI index"):
        parse_page(docker_list, {}, base, None)
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        parse_page(b"404 page not found\n", {}, base, None)
