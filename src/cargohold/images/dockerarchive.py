"""Docker schema2 manifests for ``docker save`` archives (``manifest.json`` + ``<id>/layer.tar`` + configs).

Such archives carry no manifests: one is built per ``manifest.json`` entry from its config and layer files,
and an OCI index lists them, one descriptor per ``RepoTags`` name (normalised: ``alpine:latest`` is
``docker.io/library/alpine:latest``), as containerd's importer does. Each layer file is verified against the
config's diffID; a layer tar a stored compressed blob already holds (``containerd.io/uncompressed``) is
replaced by that blob.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

from cargohold.content.store import ContentStore
from cargohold.diff.compression import Compression, decompress_stream
from cargohold.errors import DigestMismatchError, InvalidArgumentError
from cargohold.images.archive import ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, DOCKER_MANIFEST_FILE, oci_ref_name
from cargohold.images.archive_import import Contents, Entry, blob_compression, put_blob
from cargohold.metadata.labels import UNCOMPRESSED
from cargohold.oci import mediatypes as mt
from cargohold.oci.config import ImageConfig
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest, Verifier
from cargohold.oci.reference import Reference

_HEX_NAME = re.compile(r"^(?:blobs/sha256/)?([a-f0-9]{64})(?:\.json|\.tar)?$")
_LAYER_TYPES = {Compression.GZIP: mt.DOCKER_LAYER_GZIP, Compression.ZSTD: mt.DOCKER_LAYER_ZSTD}


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _entry_bytes(store: ContentStore, entry: Entry) -> bytes:
    if entry.data is not None:
        return entry.data
    if entry.reused is not None:
        raise InvalidArgumentError(f"archive entry {entry.name}: a layer tar, not a config")
    assert entry.digest is not None
    return store.read_all(entry.digest)


def _named_digest(name: str) -> Digest | None:
    """The digest a file name claims (``<hex>.json``, ``blobs/sha256/<hex>``), if any."""
    m = _HEX_NAME.match(posixpath.basename(name) if not name.startswith("blobs/") else name)
    return Digest("sha256", m.group(1)) if m else None


def _layer(store: ContentStore, contents: Contents, path: str, diff_id: Digest, where: str,
           verified: dict[Digest, Digest]) -> Descriptor:
    """The descriptor of the layer file at ``path``, checked against the config's ``diff_id``: a tar by its
    digest, a compressed blob by its uncompressed bytes (once per blob: ``verified``)."""
    entry = contents.lookup(path)
    if entry.digest is None:
        assert entry.data is not None
        entry.digest = put_blob(store, entry.data)
    digest = entry.digest
    kind = Compression.NONE if entry.reused is not None else blob_compression(store, digest)  # reused: a tar
    if kind is Compression.NONE:
        if digest != diff_id:
            raise DigestMismatchError(diff_id, digest, what=f"archive entry {path}: layer tar ({where} diff_id)")
        if entry.reused is not None:
            return entry.reused
        return Descriptor(media_type=mt.DOCKER_LAYER, digest=digest, size=entry.size)
    if verified.get(digest) != diff_id:
        verifier = Verifier(diff_id)
        try:
            with store.open(digest) as raw, decompress_stream(raw) as plain:
                while chunk := plain.read(1 << 20):
                    verifier.update(chunk)
        except InvalidArgumentError as exc:  # a corrupt stream
            raise InvalidArgumentError(f"archive entry {path} ({digest}): {exc}") from None
        if not verifier.verified():
            raise DigestMismatchError(diff_id, verifier.digest(),
                                      what=f"archive entry {path} ({digest}): uncompressed layer ({where} diff_id)")
        store.update(digest, {UNCOMPRESSED: str(diff_id)})
        verified[digest] = diff_id
    return Descriptor(media_type=_LAYER_TYPES[kind], digest=digest, size=entry.size)


def _manifest_entries(contents: Contents) -> list[dict[str, Any]]:
    doc = contents.json(DOCKER_MANIFEST_FILE)
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise InvalidArgumentError(f"archive entry {DOCKER_MANIFEST_FILE}: not a list of image entries")
    return doc


def build_docker_index(store: ContentStore, contents: Contents) -> bytes:
    """Build and store a Docker manifest per ``manifest.json`` entry (its config stored too); returns the raw
    OCI index listing them, one descriptor per tag."""
    index_entries: list[dict[str, Any]] = []
    verified: dict[Digest, Digest] = {}  # compressed layer -> the diffID its bytes were checked against
    for i, item in enumerate(_manifest_entries(contents)):
        where = f"{DOCKER_MANIFEST_FILE} entry {i}"
        config_path = item.get("Config")
        layer_paths = item.get("Layers") or []
        tags = item.get("RepoTags") or []
        if (not isinstance(config_path, str) or not isinstance(layer_paths, list) or not isinstance(tags, list)
                or not all(isinstance(p, str) for p in layer_paths)):
            raise InvalidArgumentError(f"archive {where}: want Config (string), Layers (strings) and RepoTags")
        config_raw = _entry_bytes(store, contents.lookup(config_path))
        config_digest = Digest.from_bytes(config_raw)
        claimed = _named_digest(config_path)
        if claimed is not None and claimed != config_digest:
            raise DigestMismatchError(claimed, config_digest, what=f"archive entry {config_path}: config")
        config = ImageConfig.parse(config_raw, where=f"archive entry {config_path}")
        if len(config.diff_ids) != len(layer_paths):
            raise InvalidArgumentError(
                f"archive {where}: {len(layer_paths)} layers but config {config_digest} lists "
                f"{len(config.diff_ids)} diff_ids")
        put_blob(store, config_raw)
        config_desc = Descriptor(media_type=mt.DOCKER_CONFIG, digest=config_digest, size=len(config_raw))
        layers = [_layer(store, contents, p, config.diff_ids[n], f"layer {n} of config {config_digest}", verified)
                  for n, p in enumerate(layer_paths)]
        manifest_raw = _compact({
            "schemaVersion": 2,
            "mediaType": mt.DOCKER_MANIFEST,
            "config": config_desc.to_dict(),
            "layers": [layer.to_dict() for layer in layers],
        })
        manifest_digest = put_blob(store, manifest_raw)
        base = {"mediaType": mt.DOCKER_MANIFEST, "digest": str(manifest_digest), "size": len(manifest_raw)}
        platform = config.platform.to_dict()
        if not tags:
            index_entries.append({**base, "platform": platform})
        for tag in tags:
            try:
                name = str(Reference.parse(str(tag)))
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"archive {where}: RepoTags {tag!r}: {exc}") from None
            index_entries.append({**base, "annotations": {ANNOTATION_IMAGE_NAME: name,
                                                          ANNOTATION_REF_NAME: oci_ref_name(name)},
                                  "platform": platform})
    if not index_entries:
        raise InvalidArgumentError(f"archive entry {DOCKER_MANIFEST_FILE}: lists no images")
    return _compact({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": index_entries})
