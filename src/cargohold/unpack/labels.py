"""The label values the unpacker writes, within containerd's limits (names: ``metadata.labels``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cargohold.metadata.content import MAX_LABEL_SIZE
from cargohold.metadata.labels import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    INHERITED_PREFIX,
)
from cargohold.oci.descriptor import Descriptor


def image_layers_label(layers: Sequence[Descriptor], key: str = CRI_IMAGE_LAYERS) -> str:
    """Comma-joined digests of ``layers``, stopping before the label would pass containerd's size limit."""
    value = ""
    for layer in layers:
        candidate = f"{value},{layer.digest}" if value else str(layer.digest)
        if len(key) + len(candidate) > MAX_LABEL_SIZE:
            break
        value = candidate
    return value


def cri_layer_labels(image_ref: str, manifest_digest: str, layers: Sequence[Descriptor], index: int
                     ) -> dict[str, str]:
    """The per-layer target labels remote snapshotters use to find a layer lazily."""
    return {
        CRI_IMAGE_REF: image_ref,
        CRI_MANIFEST_DIGEST: manifest_digest,
        CRI_LAYER_DIGEST: str(layers[index].digest),
        CRI_IMAGE_LAYERS: image_layers_label(layers[index:]),
    }


def inherited_labels(annotations: Mapping[str, str]) -> dict[str, str]:
    """The annotations of a layer descriptor that its snapshot inherits as labels."""
    return {k: v for k, v in annotations.items() if k.startswith(INHERITED_PREFIX)}
