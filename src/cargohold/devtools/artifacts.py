"""Deterministic OCI 1.1 artifacts that refer to an image (``subject``): an SBOM, a signature, and an older
ORAS-style artifact with a custom config media type. The same subject always gives the same bytes.

>>> art = sbom_artifact(image.manifest.descriptor)  # doctest: +SKIP
>>> push_artifact(registry.url, "team/app", "sbom", art)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cargohold.devtools.registry import push_blob, push_manifest
from cargohold.devtools.samples import Blob
from cargohold.oci import mediatypes as mt
from cargohold.oci.artifact import EMPTY_JSON
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest

SPDX = "application/spdx+json"
NOTARY_SIGNATURE = "application/vnd.cncf.notary.signature"
LEGACY_CONFIG = "application/vnd.example.config+json"
CREATED = "org.opencontainers.image.created"
FIXED_CREATED = "2024-01-01T00:00:00Z"


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleArtifact:
    """An artifact manifest (``manifest.data`` are its exact bytes) and the blobs it names: config first."""

    manifest: Blob
    blobs: tuple[Blob, ...]
    artifact_type: str

    @property
    def digest(self) -> Digest:
        return self.manifest.digest


def _doc(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def build_artifact(subject: Descriptor, *, artifact_type: str, config: Blob, layers: list[Blob],
                   annotations: dict[str, str]) -> SampleArtifact:
    """An OCI image manifest with ``subject``; ``artifactType`` is written only when the config is the empty
    blob (with a custom config, the config's media type is the artifact type, as older ORAS wrote it)."""
    doc: dict[str, object] = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST}
    if config.media_type == mt.OCI_EMPTY:
        doc["artifactType"] = artifact_type
    doc["config"] = config.descriptor.to_dict()
    doc["layers"] = [b.descriptor.to_dict() for b in layers]
    doc["subject"] = Descriptor(media_type=subject.media_type, digest=subject.digest, size=subject.size).to_dict()
    doc["annotations"] = annotations
    manifest = Blob(media_type=mt.OCI_MANIFEST, data=json.dumps(doc, indent=2).encode())
    return SampleArtifact(manifest=manifest, blobs=(config, *layers), artifact_type=artifact_type)


def empty_config() -> Blob:
    """The 2-byte ``{}`` config of OCI 1.1 artifacts."""
    return Blob(media_type=mt.OCI_EMPTY, data=EMPTY_JSON)


def sbom_artifact(subject: Descriptor) -> SampleArtifact:
    """An SPDX SBOM of ``subject``: artifactType and one layer ``application/spdx+json``, empty config."""
    sbom = _doc({
        "spdxVersion": "SPDX-2.3", "SPDXID": "SPDXRef-DOCUMENT", "name": f"sbom of {subject.digest}",
        "dataLicense": "CC0-1.0", "creationInfo": {"created": FIXED_CREATED, "creators": ["Tool: cargohold"]},
        "packages": [{"SPDXID": "SPDXRef-busybox", "name": "busybox", "versionInfo": "1.36.1"}],
    })
    return build_artifact(subject, artifact_type=SPDX, config=empty_config(),
                          layers=[Blob(media_type=SPDX, data=sbom)],
                          annotations={CREATED: FIXED_CREATED, "org.example.kind": "sbom"})


def signature_artifact(subject: Descriptor) -> SampleArtifact:
    """A (fake, deterministic) Notary signature of ``subject`` and a ``text/plain`` note, empty config."""
    payload = _doc({"targetArtifact": subject.to_dict()})
    signature = _doc({"payload": payload.hex(), "protected": "e30", "signature": "c2lnbmF0dXJl"})
    return build_artifact(subject, artifact_type=NOTARY_SIGNATURE, config=empty_config(),
                          layers=[Blob(media_type=NOTARY_SIGNATURE, data=signature),
                                  Blob(media_type="text/plain", data=b"signed by cargohold tests\n")],
                          annotations={CREATED: "2024-01-02T00:00:00Z"})


def legacy_config_artifact(subject: Descriptor) -> SampleArtifact:
    """An older ORAS-style artifact: no artifactType, a non-empty config of a custom media type (which is
    then its artifact type), one ``text/plain`` layer."""
    config = Blob(media_type=LEGACY_CONFIG, data=_doc({"tool": "example", "version": 1}))
    return build_artifact(subject, artifact_type=LEGACY_CONFIG, config=config,
                          layers=[Blob(media_type="text/plain", data=b"hello from an older artifact\n")],
                          annotations={CREATED: "2024-01-03T00:00:00Z"})


def push_artifact(base_url: str, repo: str, tag: str, artifact: SampleArtifact) -> Digest:
    """Seed a registry with an artifact (plain uploads; no referrers tag is written: cargohold's push does
    that). Returns the manifest digest."""
    for blob in artifact.blobs:
        push_blob(base_url, repo, blob.data)
    return push_manifest(base_url, repo, tag, artifact.manifest.data, artifact.manifest.media_type)
