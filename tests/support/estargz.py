"""eStargz layers for the remote-snapshotter tests, written from the format's description (stargz-snapshotter's
``estargz`` package, 0.12): a gzip stream of many members that decompresses to an ordinary tar.

* Tar headers and file data go into gzip members; each chunk of a regular file starts a new member, so a
  reader can inflate any chunk alone from its compressed ``offset``.
* The table of contents (TOC), ``stargz.index.json``, lists every entry with those offsets and digests; it is
  the last tar entry, alone in its own member, followed by the end-of-archive blocks.
* A 51-byte footer, an empty gzip member whose header's extra field (subfield "SG") holds
  ``"%016x" % toc_offset + "STARGZ"``, lets a reader find the TOC from the blob's end.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from cargohold.devtools import samples
from cargohold.oci import mediatypes as mt
from cargohold.oci.digest import Digest

TOC_NAME = "stargz.index.json"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
CHUNK_SIZE = 4 << 20  # estargz's default chunk size


def _footer(toc_offset: int) -> bytes:
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff"  # deflate, FEXTRA, mtime 0, OS unknown
    empty_stored_block = b"\x01\x00\x00\xff\xff"  # what a no-compression deflater writes for no input
    footer = header + struct.pack("<H", len(extra)) + extra + empty_stored_block + struct.pack("<II", 0, 0)
    assert len(footer) == 51
    return footer


class _Builder:
    def __init__(self) -> None:
        self.blob = bytearray()  # compressed members written so far
        self.pending = bytearray()  # uncompressed bytes of the member being filled
        self.raw = bytearray()  # the whole uncompressed tar stream (for the diffID)
        self.entries: list[dict[str, object]] = []

    def write(self, data: bytes) -> None:
        self.pending += data
        self.raw += data

    def close_member(self) -> None:
        if self.pending:
            self.blob += gzip.compress(bytes(self.pending), mtime=0)
            self.pending.clear()

    def add(self, info: tarfile.TarInfo, data: bytes = b"") -> None:
        entry: dict[str, object] = {
            "name": info.name,
            "type": {tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "reg", tarfile.SYMTYPE: "symlink"}[info.type],
            "modtime": datetime.fromtimestamp(info.mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "mode": info.mode,
        }
        if info.linkname:
            entry["linkName"] = info.linkname
        self.write(info.tobuf(tarfile.PAX_FORMAT))
        if info.type != tarfile.REGTYPE or not data:
            self.entries.append(entry)
            return
        entry["size"] = len(data)
        entry["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
        for start in range(0, len(data), CHUNK_SIZE):
            chunk = data[start:start + CHUNK_SIZE]
            self.close_member()  # every chunk begins a member of its own
            if len(chunk) == CHUNK_SIZE:
                entry["chunkSize"] = len(chunk)
            entry.update(offset=len(self.blob), chunkOffset=start,
                         chunkDigest="sha256:" + hashlib.sha256(chunk).hexdigest())
            self.write(chunk)
            self.entries.append(entry)
            entry = {"name": info.name, "type": "chunk"}
        self.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))

    def finish(self) -> tuple[bytes, bytes, str]:
        """(blob, uncompressed tar, TOC digest)."""
        self.close_member()
        toc_offset = len(self.blob)
        toc = json.dumps({"version": 1, "entries": self.entries}, indent="\t").encode()
        info = tarfile.TarInfo(TOC_NAME)
        info.size = len(toc)
        tail = info.tobuf(tarfile.PAX_FORMAT) + toc + b"\0" * (-len(toc) % tarfile.BLOCKSIZE)
        tail += b"\0" * (2 * tarfile.BLOCKSIZE)  # end of archive
        self.raw += tail
        self.blob += gzip.compress(tail, mtime=0) + _footer(toc_offset)
        return bytes(self.blob), bytes(self.raw), "sha256:" + hashlib.sha256(toc).hexdigest()


def estargz_layer(files: Mapping[str, bytes]) -> tuple[bytes, bytes, str]:
    """The eStargz form of ``samples.files_layer(files)`` (the same entries, parent directories made), after a
    no-prefetch landmark. Returns (blob, uncompressed tar, TOC digest)."""
    b = _Builder()
    landmark = tarfile.TarInfo(NO_PREFETCH_LANDMARK)
    landmark.size, landmark.mode, landmark.mtime = 1, 0o644, samples.FIXED_MTIME
    b.add(landmark, b"\x0f")
    with tarfile.open(fileobj=io.BytesIO(samples.files_layer(dict(files)))) as plain:
        for member in plain:
            data = plain.extractfile(member) if member.isfile() else None
            b.add(member, data.read() if data is not None else b"")
    return b.finish()


def estargz_image(files: Mapping[str, bytes], *, extra_layers: Sequence[bytes] = ()
                  ) -> tuple[samples.SampleImage, bytes]:
    """An OCI image whose first layer is eStargz (annotated as stargz's tools do) and whose other layers are
    ordinary gzip tars of ``extra_layers``. Returns the image and the eStargz layer's uncompressed tar."""
    blob, tar, toc_digest = estargz_layer(files)
    plain = samples.build_image([tar, *extra_layers])  # config (diffIDs) and the ordinary layers
    lazy = samples.Blob(media_type=mt.OCI_LAYER_GZIP, data=blob, annotations={
        TOC_DIGEST_ANNOTATION: toc_digest, UNCOMPRESSED_SIZE_ANNOTATION: str(len(tar))})
    layers = (lazy, *plain.layers[1:])
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": plain.config.descriptor.to_dict(),
        "layers": [layer.descriptor.to_dict() for layer in layers],
    }
    manifest = samples.Blob(media_type=mt.OCI_MANIFEST, data=json.dumps(manifest_doc, indent=2).encode(),
                            platform=plain.platform)
    image = samples.SampleImage(manifest=manifest, config=plain.config, layers=layers, diff_ids=plain.diff_ids,
                                uncompressed=plain.uncompressed, platform=plain.platform)
    assert Digest.from_bytes(gzip.decompress(blob)) == image.diff_ids[0]  # a plain gzip reader sees the tar
    return image, tar


__all__ = ["estargz_image", "estargz_layer"]
