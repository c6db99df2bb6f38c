"""Deterministic sample images for the test suite, ``make demo`` and ``make bench``.

Layers are real tarballs compressed with real gzip/zstd; the same inputs always give the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import zstandard

from cargohold.devtools.registry import push_blob, push_manifest
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.platform import Platform

FIXED_MTIME = 1_700_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One tar entry. ``kind``: file, dir, symlink, hardlink, fifo, char, block."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, str | bytes] = field(default_factory=dict)
    mtime: int = FIXED_MTIME


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}


def tar_layer(entries: Iterable[Entry], *, fmt: int = tarfile.PAX_FORMAT, trailing: bytes = b"") -> bytes:
    """A tar of the entries in the given order (names kept verbatim), with fixed mtimes: deterministic bytes.
    ``trailing`` bytes follow the end-of-archive marker (they count in the diffID)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.type = _KINDS[e.kind]
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.uname = info.gname = ""
            info.mtime = e.mtime
            info.linkname = e.link
            info.devmajor, info.devminor = e.devmajor, e.devminor
            if e.xattrs:
                # tarfile takes str values; surrogateescape round-trips binary ones (it marks them BINARY).
                info.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
                    for k, v in e.xattrs.items()
                }
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue() + trailing


def files_layer(files: dict[str, bytes], *, dirs: Sequence[str] = ()) -> bytes:
    """A layer of plain files (parents created as directories, sorted): the common case."""
    entries: list[Entry] = []
    seen: set[str] = set()
    for d in dirs:
        seen.add(d.rstrip("/"))
        entries.append(Entry(path=d.rstrip("/"), kind="dir", mode=0o755))
    for path in sorted(files):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                entries.append(Entry(path=parent, kind="dir", mode=0o755))
        entries.append(Entry(path=path, data=files[path]))
    return tar_layer(entries)


def random_files(seed: int, count: int, *, min_size: int = 64, max_size: int = 8192, prefix: str = "data",
                 per_dir: int = 100) -> dict[str, bytes]:
    """``count`` files of seeded pseudo-random, moderately compressible bytes."""
    rng = random.Random(seed)
    words = [bytes(rng.getrandbits(8) for _ in range(rng.randint(3, 9))) for _ in range(512)]
    out: dict[str, bytes] = {}
    for i in range(count):
        size = rng.randint(min_size, max_size)
        chunks: list[bytes] = []
        total = 0
        while total < size:
            w = words[rng.randrange(len(words))]
            chunks.append(w)
            total += len(w)
        out[f"{prefix}/d{i // per_dir:04d}/f{i:06d}.bin"] = b"".join(chunks)[:size]
    return out


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def zstd_bytes(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Blob:
    media_type: str
    data: bytes
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    @property
    def digest(self) -> Digest:
        return Digest("sha256", hashlib.sha256(self.data).hexdigest())

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(media_type=self.media_type, digest=self.digest, size=len(self.data),
                          annotations=self.annotations, platform=self.platform)


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleImage:
    """A single-platform image: manifest, config and layers, each as bytes."""

    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[Digest, ...]
    uncompressed: tuple[bytes, ...]
    platform: Platform

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]

    @property
    def digest(self) -> Digest:
        return self.manifest.digest


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleIndex:
    index: Blob
    images: tuple[SampleImage, ...]

    @property
    def digest(self) -> Digest:
        return self.index.digest


def build_image(
    layers: Sequence[bytes],
    *,
    compression: str = "gzip",
    level: int | None = None,
    platform: Platform | str = "linux/amd64",
    docker: bool = False,
    config_media_type: str | None = None,
    layer_media_types: Sequence[str] | None = None,
    cmd: Sequence[str] = ("/bin/sh",),
    created: str = "2024-01-01T00:00:00Z",
    annotations: dict[str, str] | None = None,
) -> SampleImage:
    """An image of the given uncompressed layer tars.

    ``compression``: gzip, zstd or none. ``docker``: Docker schema2 media types instead of OCI.
    ``config_media_type``: e.g. ``application/octet-stream`` for a docker <= 1.10 style image.
    """
    plat = Platform.parse(platform) if isinstance(platform, str) else platform
    diff_ids = tuple(Digest.from_bytes(t) for t in layers)
    layer_blobs: list[Blob] = []
    for i, tar in enumerate(layers):
        if compression == "gzip":
            data = gzip_bytes(tar, 6 if level is None else level)
            media = mt.DOCKER_LAYER_GZIP if docker else mt.OCI_LAYER_GZIP
        elif compression == "zstd":
            data = zstd_bytes(tar, 3 if level is None else level)
            media = mt.DOCKER_LAYER_ZSTD if docker else mt.OCI_LAYER_ZSTD
        elif compression == "none":
            data = tar
            media = mt.DOCKER_LAYER if docker else mt.OCI_LAYER
        else:
            raise ValueError(f"unknown compression {compression!r}")
        if layer_media_types is not None:
            media = layer_media_types[i]
        layer_blobs.append(Blob(media_type=media, data=data))
    config_doc = {
        "architecture": plat.architecture,
        "os": plat.os,
        **({"variant": plat.variant} if plat.variant else {}),
        "created": created,
        "config": {"Cmd": list(cmd), "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [str(d) for d in diff_ids]},
        "history": [{"created": created, "created_by": f"layer {i}"} for i in range(len(layers))],
    }
    config = Blob(
        media_type=config_media_type or (mt.DOCKER_CONFIG if docker else mt.OCI_CONFIG),
        data=json.dumps(config_doc, sort_keys=True, separators=(",", ":")).encode(),
    )
    manifest_type = mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST
    manifest_doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor.to_dict(),
        "layers": [b.descriptor.to_dict() for b in layer_blobs],
    }
    if annotations:
        manifest_doc["annotations"] = annotations
    manifest = Blob(media_type=manifest_type,
                    data=json.dumps(manifest_doc, indent=2).encode(), platform=plat)
    return SampleImage(manifest=manifest, config=config, layers=tuple(layer_blobs), diff_ids=diff_ids,
                       uncompressed=tuple(layers), platform=plat)


def build_index(images: Sequence[SampleImage], *, docker: bool = False) -> SampleIndex:
    media = mt.DOCKER_MANIFEST_LIST if docker else mt.OCI_INDEX
    doc = {
        "schemaVersion": 2,
        "mediaType": media,
        "manifests": [
            {**img.manifest.descriptor.to_dict(), "platform": img.platform.to_dict()} for img in images
        ],
    }
    return SampleIndex(index=Blob(media_type=media, data=json.dumps(doc, indent=2).encode()), images=tuple(images))


def push(base_url: str, repo: str, tag: str, image: SampleImage | SampleIndex) -> Digest:
    """Push an image or index with plain monolithic uploads (seeding only; cargohold's push is separate)."""
    images = image.images if isinstance(image, SampleIndex) else (image,)
    for img in images:
        for blob in img.blobs:
            push_blob(base_url, repo, blob.data)
        target = str(img.digest) if isinstance(image, SampleIndex) else tag
        push_manifest(base_url, repo, target, img.manifest.data, img.manifest.media_type)
    if isinstance(image, SampleIndex):
        push_manifest(base_url, repo, tag, image.index.data, image.index.media_type)
        return image.digest
    return image.digest


def small_base_layer() -> bytes:
    """A tiny root filesystem layer: a few dirs, files, a symlink and a hardlink."""
    return tar_layer(
        [
            Entry(path="bin", kind="dir", mode=0o755),
            Entry(path="bin/sh", data=b"#!/bin/true\n", mode=0o755),
            Entry(path="bin/busybox", kind="hardlink", link="bin/sh"),
            Entry(path="etc", kind="dir", mode=0o755),
            Entry(path="etc/os-release", data=b"NAME=cargohold-sample\nVERSION_ID=1\n"),
            Entry(path="etc/hostname", data=b"sample\n"),
            Entry(path="tmp", kind="dir", mode=0o1777),
            Entry(path="usr", kind="dir", mode=0o755),
            Entry(path="usr/bin", kind="dir", mode=0o755),
            Entry(path="usr/bin/env", kind="symlink", link="../../bin/sh"),
        ]
    )
