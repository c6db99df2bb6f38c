"""The benchmark's images: deterministic, written to disk once per bench run, pushed to a loopback registry.

* ``main``: like issue 14's image: 4 gzip layers of text-like files (sizes log-uniform in 1-100 KiB), about
  24k files and 547 MB of tar compressing about 4x at scale 1; ``scale`` multiplies the files per layer.
* ``many``: 40 small layers.
* ``huge``: one layer of about ``huge_mb`` MiB of files (larger files, 4 KiB-4 MiB).

Every layer also holds a few entries that make the tree checks mean something: directories with odd modes and
owners (0750 uid 1000, 1777, 0700), a setuid file, a file with a ``user.`` xattr, relative and absolute
symlinks, a hardlink, an empty file; every layer after the first whites out a file and makes a directory
opaque in the layer below. Layers are streamed to files (tar and gzip), never held whole in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import urllib3

from cargohold.devtools.registry import push_manifest
from cargohold.devtools.samples import FIXED_MTIME, Entry
from cargohold.oci import mediatypes as mt
from cargohold.oci.platform import host_platform

KIB, MIB = 1 << 10, 1 << 20
_ALPHABET = b" etaoinshrdlucmfwypvbgkqjxz\n_ETAOINSHRDL.,0123456789/-=:;(){}<>"
_TEXT_TABLE = bytes(_ALPHABET[min(len(_ALPHABET) - 1, int((b / 256) ** 1.8 * len(_ALPHABET)))]
                    for b in range(256))
_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE}
_http = urllib3.PoolManager(maxsize=4, retries=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """What to generate: ``layers`` layers of ``files`` files each, sizes log-uniform in [lo, hi]."""

    name: str
    layers: int
    files: int
    lo: int
    hi: int
    seed: int


def main_shape(scale: int = 1, *, quick: bool = False, seed: int = 1) -> Shape:
    files = 150 if quick else 6000
    return Shape(name="main" if scale == 1 else f"main-x{scale}", layers=4, files=files * scale, lo=KIB,
                 hi=100 * KIB, seed=seed)


def many_shape(*, quick: bool = False, seed: int = 1) -> Shape:
    return Shape(name="many-layer", layers=40 if not quick else 12, files=150 if not quick else 10, lo=KIB,
                 hi=32 * KIB, seed=seed + 100)


def huge_shape(huge_mb: int, *, seed: int = 1) -> Shape:
    # Mean of log-uniform 4 KiB-4 MiB is (hi - lo) / ln(hi / lo) ~ 607 KiB.
    mean = (4 * MIB - 4 * KIB) / math.log(1024)
    return Shape(name="huge", layers=1, files=max(1, int(huge_mb * MIB / mean)), lo=4 * KIB, hi=4 * MIB,
                 seed=seed + 200)


class _Pool:
    """Seeded byte pools; file contents are slices of them repeated to size (fast for GiBs)."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        raw = rng.randbytes(4 * MIB)
        self.raw = raw
        self.text = raw.translate(_TEXT_TABLE)

    def data(self, rng: random.Random, size: int) -> bytes:
        kind = rng.random()
        if kind < 0.84:
            # text-like, repeating within gzip's 32 KiB window: ~4x as source trees and logs give
            src, unique = self.text, max(128, min(size, int(rng.uniform(3.0, 12.0) * KIB)))
        elif kind < 0.95:
            src, unique = self.raw, max(128, size // 4)
        else:
            src, unique = self.raw, size
        unique = min(unique, len(src) - 1)
        off = rng.randrange(len(src) - unique)
        chunk = src[off:off + unique]
        return (chunk * (size // unique + 1))[:size] if unique < size else chunk[:size]


def layer_entries(shape: Shape, n: int, pool: _Pool) -> Iterator[Entry]:
    """The entries of layer ``n`` in tar order (parents first)."""
    rng = random.Random(shape.seed * 1000 + n)
    lo, hi = math.log(shape.lo), math.log(shape.hi)
    top = f"layer{n}"
    yield Entry(path=top, kind="dir", mode=0o755)
    first = ""
    made: set[str] = set()
    for i in range(shape.files):
        d1, d2 = f"{top}/{i // 2000:03d}", f"{top}/{i // 2000:03d}/{i // 50 % 40:02d}"
        for d in (d1, d2):
            if d not in made:
                made.add(d)
                yield Entry(path=d, kind="dir", mode=0o755)
        path = f"{d2}/f{i:06d}.txt"
        first = first or path
        yield Entry(path=path, data=pool.data(rng, int(math.exp(rng.uniform(lo, hi)))))
    ex = f"extra{n}"
    yield Entry(path=ex, kind="dir", mode=0o750, uid=1000, gid=1000)
    yield Entry(path=f"{ex}/sticky", kind="dir", mode=0o1777)
    yield Entry(path=f"{ex}/private", kind="dir", mode=0o700, uid=1234, gid=5678)
    yield Entry(path=f"{ex}/private/secret", data=f"secret {n}\n".encode(), mode=0o600, uid=1234, gid=5678)
    yield Entry(path=f"{ex}/setuid", data=b"#!/bin/sh\necho hi\n", mode=0o4755)
    yield Entry(path=f"{ex}/xattr", data=b"tagged\n", xattrs={"user.bench": f"layer {n}"})
    yield Entry(path=f"{ex}/empty", data=b"", mode=0o640)
    yield Entry(path=f"{ex}/rel", kind="symlink", link=f"../{first}")
    yield Entry(path=f"{ex}/abs", kind="symlink", link=f"/{ex}/setuid")
    yield Entry(path=f"{ex}/hard", kind="hardlink", link=first)
    yield Entry(path=f"{ex}/victim", data=f"whited out by layer {n + 1}\n".encode())
    yield Entry(path=f"{ex}/opaque", kind="dir", mode=0o755)
    yield Entry(path=f"{ex}/opaque/hidden", data=f"hidden by layer {n + 1}\n".encode())
    if n > 0:
        below = f"extra{n - 1}"
        yield Entry(path=below, kind="dir", mode=0o750, uid=1000, gid=1000)
        yield Entry(path=f"{below}/.wh.victim", data=b"")
        yield Entry(path=f"{below}/opaque", kind="dir", mode=0o755)
        yield Entry(path=f"{below}/opaque/.wh..wh..opq", data=b"")
        yield Entry(path=f"{below}/opaque/new", data=f"from layer {n}\n".encode())


class _HashingGzip:
    """A write-only stream: sha256 of what is written (the diffID), gzip-compressed into a file (hashed too)."""

    def __init__(self, out: BinaryIO, level: int) -> None:
        self.out = out
        self.diff = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.tar_size = self.gz_size = 0
        self.z = zlib.compressobj(level, zlib.DEFLATED, 31)  # gzip header with mtime 0: deterministic

    def write(self, data: bytes) -> int:
        self.diff.update(data)
        self.tar_size += len(data)
        self._emit(self.z.compress(data))
        return len(data)

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob.update(data)
            self.gz_size += len(data)
            self.out.write(data)

    def close(self) -> None:
        self._emit(self.z.flush())


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    path: Path  # the gzip blob on disk
    digest: str
    size: int
    diff_id: str
    tar_size: int
    files: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchImage:
    shape: Shape
    layers: tuple[Layer, ...]
    config: bytes
    manifest: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def config_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar_size for layer in self.layers)

    @property
    def gz_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def files(self) -> int:
        return sum(layer.files for layer in self.layers)

    def blob_digests(self) -> dict[str, int]:
        """Every blob of the image (manifest, config, layers) -> size."""
        out = {self.digest: len(self.manifest), self.config_digest: len(self.config)}
        out.update({layer.digest: layer.size for layer in self.layers})
        return out

    def describe(self) -> str:
        return (f"{self.shape.name}: {len(self.layers)} layers, {self.files} files, tar "
                f"{self.tar_bytes / 1e6:.0f} MB, gzip {self.gz_bytes / 1e6:.0f} MB "
                f"({self.tar_bytes / max(1, self.gz_bytes):.2f}x)")


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.path)
    info.type = _TYPES[e.kind]
    info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, FIXED_MTIME
    info.uname = info.gname = ""
    info.linkname = e.link
    if e.xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items() if isinstance(v, str)}
    if e.kind == "file":
        info.size = len(e.data)
    return info


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out = self.data[self.pos:end]
        self.pos += len(out)
        return out


def write_layer(shape: Shape, n: int, pool: _Pool, dest: Path, *, level: int = 6) -> Layer:
    """Layer ``n`` of ``shape`` as ``dest`` (gzip); returns its digests and sizes."""
    files = 0
    with open(dest, "wb") as out:
        sink = _HashingGzip(out, level)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for e in layer_entries(shape, n, pool):
                files += e.kind == "file"
                tar.addfile(_tarinfo(e), _Reader(e.data) if e.kind == "file" else None)
        sink.close()
    return Layer(path=dest, digest="sha256:" + sink.blob.hexdigest(), size=sink.gz_size,
                 diff_id="sha256:" + sink.diff.hexdigest(), tar_size=sink.tar_size, files=files)


def build(shape: Shape, workdir: Path) -> BenchImage:
    """Write every layer of ``shape`` under ``workdir``; config and manifest (OCI, host platform) in memory."""
    workdir.mkdir(parents=True, exist_ok=True)
    pool = _Pool(shape.seed)
    layers = tuple(write_layer(shape, n, pool, workdir / f"{shape.name}-{n}.tar.gz") for n in range(shape.layers))
    plat = host_platform()
    config = json.dumps({
        "architecture": plat.architecture, "os": plat.os, **({"variant": plat.variant} if plat.variant else {}),
        "created": "2024-01-01T00:00:00Z", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }, sort_keys=True, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
    }, indent=2).encode()
    return BenchImage(shape=shape, layers=layers, config=config, manifest=manifest)


def _upload(base_url: str, repo: str, digest: str, size: int, body: BinaryIO | bytes) -> None:
    start = _http.request("POST", f"{base_url}/v2/{repo}/blobs/uploads/")
    if start.status != 202:
        raise RuntimeError(f"starting an upload to {base_url}/{repo}: HTTP {start.status}")
    location = start.headers["Location"]
    if location.startswith("/"):
        location = base_url + location
    sep = "&" if "?" in location else "?"
    put = _http.request("PUT", f"{location}{sep}digest={digest}", body=body,
                        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    if put.status != 201:
        raise RuntimeError(f"uploading {digest} to {base_url}/{repo}: HTTP {put.status}: {put.data[:200]!r}")


def push(image: BenchImage, base_url: str, repo: str, tag: str) -> None:
    """Monolithic uploads of every blob (layers streamed from their files), then the manifest under ``tag``."""
    base_url = base_url.rstrip("/")
    for layer in image.layers:
        with open(layer.path, "rb") as f:
            _upload(base_url, repo, layer.digest, layer.size, f)
    _upload(base_url, repo, image.config_digest, len(image.config), image.config)
    push_manifest(base_url, repo, tag, image.manifest, mt.OCI_MANIFEST)
