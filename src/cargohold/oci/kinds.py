"""What an index entry is: a runnable image, an attestation, an artifact, a nested index, schema 1, or
something unknown. The one place that knows; walks, selection, export, push and listings ask it.

Following containerd and BuildKit: an index entry is a runnable image only when it is an image manifest
that is not an attestation (BuildKit marks those with ``vnd.docker.reference.type``) and whose platform is
not ``unknown/unknown``; everything else is carried as content when the whole graph is wanted and is never
selected for a platform nor unpacked.
"""

from __future__ import annotations

import enum

from cargohold.errors import UnsupportedMediaTypeError
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor

REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"
ATTESTATION_MANIFEST = "attestation-manifest"
PREDICATE_TYPE = "in-toto.io/predicate-type"


class Kind(enum.Enum):
    IMAGE = "image"
    ATTESTATION = "attestation"
    ARTIFACT = "artifact"
    INDEX = "index"
    SCHEMA1 = "schema1"
    UNKNOWN = "unknown"


def is_attestation(desc: Descriptor) -> bool:
    """A BuildKit attestation manifest (by its reference-type annotation)."""
    return mt.is_manifest(desc.media_type) and desc.annotations.get(REFERENCE_TYPE) == ATTESTATION_MANIFEST


def classify(desc: Descriptor) -> Kind:
    """The kind of an index entry, from its descriptor alone (no content is read)."""
    if mt.is_index(desc.media_type):
        return Kind.INDEX
    if desc.media_type in mt.SCHEMA1_TYPES:
        return Kind.SCHEMA1
    if not mt.is_manifest(desc.media_type):
        return Kind.UNKNOWN
    if is_attestation(desc):
        return Kind.ATTESTATION
    if desc.artifact_type or (desc.platform is not None and desc.platform.os == "unknown"
                              and desc.platform.architecture == "unknown"):
        # An OCI artifact (signature, SBOM) or another unknown/unknown manifest: content, not a runnable image.
        return Kind.ARTIFACT
    return Kind.IMAGE


def is_runnable(desc: Descriptor) -> bool:
    """An image manifest a platform can select and an unpacker can apply."""
    return classify(desc) is Kind.IMAGE


def attests(desc: Descriptor) -> str:
    """The digest an attestation manifest is about ('' when the annotation is missing)."""
    return desc.annotations.get(REFERENCE_DIGEST, "")


def is_manifest_like(media_type: str) -> bool:
    """A manifest or an index: content that has children."""
    return mt.is_manifest(media_type) or mt.is_index(media_type)


def schema1_error(what: str) -> UnsupportedMediaTypeError:
    """The one error for a Docker schema 1 manifest wherever it is met (resolve, index entry, parse)."""
    return UnsupportedMediaTypeError(
        f"{what}: Docker image manifest schema 1 is not supported, convert it to schema 2 or OCI "
        "(push the image again with a current docker or buildkit)"
    )
