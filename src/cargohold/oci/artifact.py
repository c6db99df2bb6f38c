"""OCI 1.1 artifacts and referrers: what is a runnable image, what an artifact is of, and how a manifest
with a ``subject`` is listed among the referrers of that subject.

An artifact is a manifest whose config is not an image config: OCI 1.1 style (``artifactType`` and the
2-byte empty config ``{}``), or older ORAS style (a custom config media type). Registries store and serve
them like images; only unpacking them makes no sense.
"""

from __future__ import annotations

import json

from cargohold.errors import InvalidArgumentError
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import Index, Manifest

EMPTY_JSON = b"{}"
"""The empty config / layer blob of OCI 1.1 (``application/vnd.oci.empty.v1+json``)."""
EMPTY_JSON_DIGEST = Digest.from_bytes(EMPTY_JSON)


def is_image(manifest: Manifest) -> bool:
    """Whether the manifest is a runnable image: its config is an image config (Docker, OCI, or the generic
    type docker <= 1.10 used). Anything else is an artifact."""
    return mt.is_config(manifest.config.media_type)


def artifact_type(manifest: Manifest) -> str:
    """The artifact type as the referrers API reports it: ``artifactType``, else the config's media type."""
    return manifest.artifact_type or manifest.config.media_type


def not_runnable_message(what: str, manifest: Manifest) -> str:
    """The one error text for unpacking (or running) an artifact."""
    return (f"{what}: not a runnable image: an artifact of type {artifact_type(manifest)} "
            "(pull --no-unpack fetches it)")


def referrer_descriptor(desc: Descriptor, manifest: Manifest | Index) -> Descriptor:
    """The entry of ``manifest`` (at ``desc``) in its subject's referrers index: media type, digest, size,
    artifact type (a manifest's ``artifactType``, else its config media type; an index's ``artifactType`` or
    none) and the manifest's annotations (distribution spec 1.1, "Listing Referrers")."""
    if isinstance(manifest, Manifest):
        kind = artifact_type(manifest)
    else:
        # An index's own artifactType, when it has one (Index does not keep it: read the bytes); none else.
        doc = json.loads(manifest.raw) if manifest.raw else {}
        declared = doc.get("artifactType") if isinstance(doc, dict) else None
        kind = declared if isinstance(declared, str) else ""
    return Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size,
                      artifact_type=kind, annotations=dict(manifest.annotations))


def referrers_tag(digest: Digest) -> str:
    """The referrers tag schema's fallback tag of ``digest``: ``<alg>-<hex>`` (truncated to the 128
    characters a tag may have)."""
    return f"{digest.algorithm}-{digest.hex}"[:128]


def referrers_index(entries: list[Descriptor]) -> bytes:
    """An OCI index listing ``entries``: the document a fallback tag points at (compact JSON)."""
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [d.to_dict() for d in entries]}
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_referrers(raw: bytes, where: str) -> list[Descriptor]:
    """The descriptors of a referrers index (from the API or a fallback tag)."""
    doc = Index.parse(raw, "", where)
    if doc.media_type != mt.OCI_INDEX:
        raise InvalidArgumentError(f"{where}: referrers list is {doc.media_type}, not an OCI index")
    return list(doc.manifests)
