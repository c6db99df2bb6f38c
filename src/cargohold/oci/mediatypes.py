"""Every media type a registry still serves, grouped by what it is."""

from __future__ import annotations

# Docker schema2
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"  # uncompressed, rare but served
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
# Docker schema1: recognised only to refuse clearly.
DOCKER_MANIFEST_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# OCI
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

# docker <= 1.10 pushed configs with this generic type.
OCTET_STREAM = "application/octet-stream"

# in-toto attestations and other artifacts that live in indexes beside images
IN_TOTO = "application/vnd.in-toto+json"

MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
SCHEMA1_TYPES = frozenset({DOCKER_MANIFEST_SCHEMA1, DOCKER_MANIFEST_SCHEMA1_SIGNED})
CONFIG_TYPES = frozenset({DOCKER_CONFIG, OCI_CONFIG, OCTET_STREAM})
LAYER_TYPES = frozenset(
    {
        DOCKER_LAYER_GZIP,
        DOCKER_LAYER_FOREIGN_GZIP,
        DOCKER_LAYER,
        DOCKER_LAYER_ZSTD,
        OCI_LAYER,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_NONDIST,
        OCI_LAYER_NONDIST_GZIP,
        OCI_LAYER_NONDIST_ZSTD,
    }
)
NON_DISTRIBUTABLE = frozenset(
    {DOCKER_LAYER_FOREIGN_GZIP, OCI_LAYER_NONDIST, OCI_LAYER_NONDIST_GZIP, OCI_LAYER_NONDIST_ZSTD}
)

# Accept header for manifest requests, most specific first.
MANIFEST_ACCEPT = ", ".join(
    [OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, "*/*;q=0.8"]
)


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFEST_TYPES


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def is_layer(media_type: str) -> bool:
    return media_type in LAYER_TYPES


def is_config(media_type: str) -> bool:
    return media_type in CONFIG_TYPES



def looks_like_manifest_type(media_type: str) -> bool:
    """A media type cargohold does not know but that names a manifest or index (``...manifest...+json``):
    such a document lives on a registry's manifests endpoint, so fetching it as a blob can only fail."""
    if is_manifest(media_type) or is_index(media_type) or media_type in SCHEMA1_TYPES:
        return False
    lowered = media_type.lower()
    return ("manifest" in lowered or ".index." in lowered or "image.index" in lowered) and "layer" not in lowered
