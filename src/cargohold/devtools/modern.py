"""Deterministic samples of images as registries serve them today: BuildKit indexes with attestation
manifests, indexes nested in indexes, images with foreign (non-distributable) layers.

Each sample is a ``SampleGraph``: the root (index or manifest), every manifest/index below it (children
before parents, so they push in order) and every leaf blob. ``push_graph`` seeds a registry with one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from cargohold.devtools.registry import push_blob, push_manifest
from cargohold.devtools.samples import Blob, Entry, SampleImage, build_image, tar_layer
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.digest import Digest
from cargohold.oci.platform import Platform

SPDX_PREDICATE = "https://spdx.dev/Document"
PROVENANCE_PREDICATE = "https://slsa.dev/provenance/v0.2"
FOREIGN_URL = "https://foreign.invalid/layers/base.tar.gz"
"""Where foreign layers claim to live: never contacted (only loopback is a network target)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleGraph:
    """An image graph: ``root``, the manifests and indexes below it (children first), and leaf blobs."""

    root: Blob
    manifests: tuple[Blob, ...]
    blobs: tuple[Blob, ...]

    @property
    def digest(self) -> Digest:
        return self.root.digest

    @property
    def all_blobs(self) -> list[Blob]:
        """Every blob of the graph, root included, each once."""
        out: dict[Digest, Blob] = {}
        for b in [*self.blobs, *self.manifests, self.root]:
            out.setdefault(b.digest, b)
        return list(out.values())


def push_graph(base_url: str, repo: str, tag: str, graph: SampleGraph) -> Digest:
    """Push a graph with plain uploads (seeding only): blobs, then manifests by digest, the root by tag."""
    for blob in graph.blobs:
        push_blob(base_url, repo, blob.data)
    for manifest in graph.manifests:
        push_manifest(base_url, repo, str(manifest.digest), manifest.data, manifest.media_type)
    push_manifest(base_url, repo, tag, graph.root.data, graph.root.media_type)
    return graph.digest


def _json(doc: object) -> bytes:
    return json.dumps(doc, indent=2).encode()


def image_graph(img: SampleImage) -> SampleGraph:
    """A single-platform sample image as a graph."""
    return SampleGraph(root=img.manifest, manifests=(), blobs=(img.config, *img.layers))


def index_blob(entries: Sequence[Blob], *, docker: bool = False) -> Blob:
    """An index of the given manifests/indexes, each entry's platform and annotations as the blob carries."""
    media = mt.DOCKER_MANIFEST_LIST if docker else mt.OCI_INDEX
    manifests = [b.descriptor.to_dict() for b in entries]
    return Blob(media_type=media, data=_json({"schemaVersion": 2, "mediaType": media, "manifests": manifests}))


def platform_files(plat: Platform) -> list[Entry]:
    """The entries of a sample platform's only layer (what its rootfs must contain)."""
    return [
        Entry(path="bin", kind="dir", mode=0o755),
        Entry(path="bin/sh", data=b"#!/bin/true\n", mode=0o755),
        Entry(path="etc", kind="dir", mode=0o755),
        Entry(path="etc/platform", data=f"{plat}\n".encode()),
        Entry(path="usr", kind="dir", mode=0o755),
        Entry(path="usr/bin", kind="dir", mode=0o755),
        Entry(path="usr/bin/env", kind="symlink", link="../../bin/sh"),
    ]


def platform_image(platform: str, *, docker: bool = False) -> SampleImage:
    plat = Platform.parse(platform)
    return build_image([tar_layer(platform_files(plat))], platform=plat, docker=docker)


def attestation(img: SampleImage) -> tuple[Blob, list[Blob]]:
    """BuildKit's attestation manifest for ``img``: an SPDX SBOM and SLSA provenance as in-toto layers."""
    statements = []
    for predicate, body in ((SPDX_PREDICATE, {"spdxVersion": "SPDX-2.3", "name": "sbom"}),
                            (PROVENANCE_PREDICATE, {"builder": {"id": ""}, "buildType": "buildkit"})):
        statement = {
            "_type": "https://in-toto.io/Statement/v0.1",
            "predicateType": predicate,
            "subject": [{"name": f"pkg:docker/sample@latest?platform={img.platform}",
                         "digest": {"sha256": img.digest.hex}}],
            "predicate": body,
        }
        statements.append(Blob(media_type=mt.IN_TOTO, data=_json(statement),
                               annotations={kinds.PREDICATE_TYPE: predicate}))
    # BuildKit writes the attestation's config like this: unknown platform, diff_ids of its layers.
    config = Blob(media_type=mt.OCI_CONFIG, data=json.dumps({
        "architecture": "unknown", "os": "unknown", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [str(s.digest) for s in statements]},
    }, sort_keys=True, separators=(",", ":")).encode())
    manifest = Blob(
        media_type=mt.OCI_MANIFEST,
        data=_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": config.descriptor.to_dict(),
                    "layers": [s.descriptor.to_dict() for s in statements]}),
        platform=Platform(os="unknown", architecture="unknown"),
        annotations={kinds.REFERENCE_TYPE: kinds.ATTESTATION_MANIFEST, kinds.REFERENCE_DIGEST: str(img.digest)},
    )
    return manifest, [config, *statements]


def buildkit_index() -> SampleGraph:
    """linux/amd64 and linux/arm64, each with its attestation manifest, in one OCI index as BuildKit pushes."""
    images = [platform_image("linux/amd64"), platform_image("linux/arm64")]
    blobs: list[Blob] = []
    atts: list[Blob] = []
    for img in images:
        blobs.extend(img.blobs)
        manifest, leaves = attestation(img)
        atts.append(manifest)
        blobs.extend(leaves)
    manifests = [img.manifest for img in images] + atts
    return SampleGraph(root=index_blob(manifests), manifests=tuple(manifests), blobs=tuple(blobs))


def nested_index() -> SampleGraph:
    """An index whose first entry is an index (linux/amd64 + linux/arm64) beside a linux/s390x image."""
    images = [platform_image("linux/amd64"), platform_image("linux/arm64")]
    inner = index_blob([img.manifest for img in images])
    s390x = platform_image("linux/s390x")
    outer = index_blob([inner, s390x.manifest])
    blobs = [b for img in (*images, s390x) for b in img.blobs]
    return SampleGraph(root=outer, manifests=(*(img.manifest for img in images), inner, s390x.manifest),
                       blobs=tuple(blobs))


def foreign_layer_image(*, oci: bool = False, url: str = FOREIGN_URL) -> SampleGraph:
    """An image whose base layer is foreign (``urls`` elsewhere, the blob also in the registry), as Windows
    base images are served: Docker's foreign layer type, or with ``oci`` OCI's non-distributable one."""
    img = build_image([tar_layer(e) for e in foreign_layer_entries()], docker=not oci,
                      layer_media_types=[mt.OCI_LAYER_NONDIST_GZIP if oci else mt.DOCKER_LAYER_FOREIGN_GZIP,
                                         mt.OCI_LAYER_GZIP if oci else mt.DOCKER_LAYER_GZIP])
    doc = json.loads(img.manifest.data)
    doc["layers"][0]["urls"] = [url]
    manifest = Blob(media_type=img.manifest.media_type, data=_json(doc), platform=img.platform)
    return SampleGraph(root=manifest, manifests=(), blobs=tuple(img.blobs))


def foreign_layer_entries() -> list[list[Entry]]:
    """The layers' entries of ``foreign_layer_image`` (for the expected tree)."""
    return [platform_files(Platform.parse("linux/amd64")),
            [Entry(path="app", kind="dir", mode=0o755), Entry(path="app/run", data=b"run\n", mode=0o755)]]
