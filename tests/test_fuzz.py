"""Property tests (hypothesis) over everything that parses untrusted bytes: manifests, indexes, image configs,
references, digests, platforms, tar headers (PAX records, base-256 numbers) and layer paths (``..``, absolute
names, symlink and hardlink chains).

The properties: only cargohold's error kinds escape (never ValueError, KeyError, UnicodeError, RecursionError,
...), and applying a layer never writes outside its root (a sentinel sibling directory stays untouched).
The default profile is short and runs in ``make test``; ``make fuzz`` runs the same with HYPOTHESIS_PROFILE=fuzz.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cargohold.diff.apply import apply_layer
from cargohold.diff.paths import clean_name
from cargohold.diff.tarstream import TarReader
from cargohold.errors import CargoholdError
from cargohold.oci import mediatypes as mt
from cargohold.oci.config import ImageConfig
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import Index, Manifest, parse_manifest_or_index
from cargohold.oci.platform import Platform
from cargohold.oci.reference import Reference

settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def only_cargohold_errors(fn: Callable[[], object]) -> None:
    """Run ``fn``; a cargohold error is an acceptable answer to bad input, anything else fails the test."""
    try:
        fn()
    except CargoholdError:
        pass


# --- JSON documents ---------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(
    max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=12), inner, max_size=5), max_leaves=20)
DIGEST = "sha256:" + "a" * 64
digests = st.sampled_from([DIGEST, "sha256:" + "A" * 64, "sha256:abc", "md5:x", "", "sha512:" + "b" * 128]) | \
    st.text(max_size=80)
descriptors = st.fixed_dictionaries(
    {"mediaType": st.sampled_from([mt.OCI_MANIFEST, mt.OCI_INDEX, mt.OCI_CONFIG, mt.OCI_LAYER_GZIP, ""])
     | json_values, "digest": digests, "size": st.integers(-5, 2**64) | json_values},
    optional={"annotations": json_values, "platform": json_values, "urls": json_values})
manifests = st.fixed_dictionaries(
    {"schemaVersion": st.sampled_from([2, 1, 3]) | json_values},
    optional={"mediaType": st.sampled_from([mt.OCI_MANIFEST, mt.DOCKER_MANIFEST, mt.OCI_INDEX]) | json_values,
              "config": descriptors | json_values, "layers": st.lists(descriptors, max_size=4) | json_values,
              "manifests": st.lists(descriptors, max_size=4) | json_values, "subject": descriptors | json_values,
              "annotations": json_values, "artifactType": json_values})
configs = st.fixed_dictionaries(
    {"architecture": st.sampled_from(["amd64", "arm", "arm64"]) | json_values,
     "os": st.sampled_from(["linux", "windows"]) | json_values},
    optional={"rootfs": st.fixed_dictionaries({"type": st.sampled_from(["layers"]) | json_values,
                                               "diff_ids": st.lists(digests, max_size=3) | json_values})
              | json_values, "history": json_values, "config": json_values, "variant": json_values,
              "os.version": json_values, "os.features": json_values, "created": json_values})


def as_bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


documents = st.one_of(manifests.map(as_bytes), configs.map(as_bytes), json_values.map(as_bytes), st.binary(
    max_size=300), st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n))


MEDIA_TYPES = ["", mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST,
               mt.DOCKER_MANIFEST_SCHEMA1, mt.OCTET_STREAM, "text/plain"]


@given(documents, st.sampled_from(MEDIA_TYPES))
def test_manifest_and_index_parsing_raise_only_cargohold_errors(raw: bytes, media_type: str) -> None:
    only_cargohold_errors(lambda: Manifest.parse(raw, media_type))
    only_cargohold_errors(lambda: Index.parse(raw, media_type))
    only_cargohold_errors(lambda: parse_manifest_or_index(raw, media_type))


@given(documents)
def test_config_parsing_raises_only_cargohold_errors(raw: bytes) -> None:
    only_cargohold_errors(lambda: ImageConfig.parse(raw))


names = st.text(max_size=80) | st.from_regex(
    r"\A([a-zA-Z0-9.:\-]{1,20}/)?[a-z0-9._/\-]{0,40}(:[\w.\-]{0,20})?(@[a-z0-9]{0,8}:[0-9a-fA-F]{0,70})?\Z")


@given(names)
def test_reference_digest_and_platform_parsing_raise_only_cargohold_errors(text: str) -> None:
    only_cargohold_errors(lambda: Reference.parse(text))
    only_cargohold_errors(lambda: Digest.parse(text))
    only_cargohold_errors(lambda: Platform.parse(text))


@given(st.text(alphabet="./ab\0\\", max_size=30) | st.text(max_size=30))
def test_clean_name_is_root_relative_or_refused(name: str) -> None:
    try:
        cleaned = clean_name(name)
    except CargoholdError:
        return
    assert not cleaned.startswith("/")
    assert ".." not in cleaned.split("/")


# --- tar headers ------------------------------------------------------------------------------------------

PATH_PARTS = ["..", ".", "a", "b", "outside", "", "l", "x" * 120]
path_names = st.lists(st.sampled_from(PATH_PARTS), min_size=1, max_size=5).map("/".join) | st.sampled_from(
    ["/", "/a", "/tmp", "../outside/owned", "l/owned", "a/../../outside"]) | st.text(max_size=20)


def octal(width: int) -> st.SearchStrategy[bytes]:
    """A numeric field: octal text, GNU base-256 (positive or negative), or junk."""
    def base256(value: int) -> bytes:
        raw = value.to_bytes(width - 1, "big", signed=False)
        return b"\x80" + raw

    return st.one_of(
        st.integers(0, 8 ** (width - 1) - 1).map(lambda v: (b"%0*o\0" % (width - 1, v))),
        st.integers(0, 256 ** (width - 1) - 1).map(base256),
        st.binary(min_size=width - 1, max_size=width - 1).map(lambda b: b"\xff" + b),
        st.binary(min_size=width, max_size=width),
    )


@st.composite
def header(draw: st.DrawFn, name: bytes | None = None, kind: bytes | None = None, size: int | None = None) -> bytes:
    block = bytearray(512)
    raw_name = name if name is not None else draw(path_names).encode("utf-8", "surrogatepass")[:100]
    block[0:len(raw_name[:100])] = raw_name[:100]
    block[100:108] = draw(st.sampled_from([b"0000755\0", b"0000644\0"]) | octal(8))
    block[108:116] = draw(st.just(b"0000000\0") | octal(8))
    block[116:124] = draw(st.just(b"0000000\0") | octal(8))
    block[124:136] = b"%011o\0" % size if size is not None else draw(
        st.integers(0, 64).map(lambda v: b"%011o\0" % v) | octal(12))
    block[136:148] = draw(st.just(b"00000000000\0") | octal(12))
    block[156:157] = kind if kind is not None else draw(st.sampled_from(list(b"0125678LKgxS\0"))).to_bytes(1)
    link = draw(path_names).encode("utf-8", "surrogatepass")[:100]
    block[157:157 + len(link)] = link
    block[257:265] = draw(st.sampled_from([b"ustar\x0000", b"ustar  \0", b"\0" * 8]))
    block[329:337] = draw(st.just(b"0000000\0") | octal(8))
    block[337:345] = draw(st.just(b"0000000\0") | octal(8))
    block[148:156] = b" " * 8
    checksum = sum(block)
    block[148:156] = draw(st.just(b"%06o\0 " % checksum) | octal(8))
    return bytes(block)


PAX_KEYS = ["path", "linkpath", "size", "mtime", "atime", "uid", "gid", "uname", "SCHILY.xattr.user.x",
            "SCHILY.xattr.security.capability", "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name",
            "GNU.sparse.realsize", "GNU.sparse.size", "GNU.sparse.offset", "GNU.sparse.numbytes",
            "GNU.sparse.map", "LIBARCHIVE.xattr.user.y", "hdrcharset"]
pax_values = st.sampled_from([b"0", b"-1", b"1.5", b"99999999999999999999999", b"a", b"../outside/p", b"/abs",
                              b"0,1,2", b"1.0"]) | st.binary(max_size=20)


@st.composite
def pax_record(draw: st.DrawFn) -> bytes:
    key = draw(st.sampled_from(PAX_KEYS) | st.text(max_size=10)).encode("utf-8", "surrogatepass")
    body = b" " + key + b"=" + draw(pax_values) + b"\n"
    length = len(body) + len(str(len(body)))
    length += len(str(length)) - len(str(len(body)))
    if draw(st.booleans()):  # a wrong length now and then
        length = draw(st.integers(-3, length + 5))
    return str(length).encode() + body


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


@st.composite
def tar_member(draw: st.DrawFn) -> bytes:
    out = b""
    if draw(st.booleans()):
        pax = b"".join(draw(st.lists(pax_record(), min_size=1, max_size=4)))
        out += draw(header(name=b"PaxHeaders/x", kind=draw(st.sampled_from([b"x", b"g"])), size=len(pax)))
        out += padded(pax)
    data = draw(st.binary(max_size=40))
    out += draw(header(size=len(data)) | header())
    out += padded(data)
    return out


tar_streams = st.lists(tar_member(), min_size=1, max_size=4).map(lambda ms: b"".join(ms) + b"\0" * 1024)
mutated = st.tuples(tar_streams, st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=6)).map(
    lambda t: bytes(_mutate(t[0], t[1])))


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for where, value in edits:
        if out:
            out[where % len(out)] = value
    return out


@given(tar_streams | mutated | st.binary(max_size=1100))
def test_tar_reader_raises_only_cargohold_errors(data: bytes) -> None:
    def read_all() -> None:
        reader = TarReader(io.BytesIO(data))
        for entry in reader.entries():
            if entry.kind == "file":
                for _ in reader.chunks():
                    pass

    only_cargohold_errors(read_all)


def tree_of(path: Path) -> dict[str, tuple[int, bytes | str]]:
    out: dict[str, tuple[int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            content: bytes | str = os.readlink(p) if os.path.islink(p) else (
                p.read_bytes() if p.is_file() else "")
            out[str(p.relative_to(path))] = (st_.st_mode, content)
    return out


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(tar_streams | mutated, st.booleans())
def test_apply_layer_raises_only_cargohold_errors_and_never_writes_outside_the_root(data: bytes,
                                                                                   overlay: bool) -> None:
    base = Path(tempfile.mkdtemp(prefix="cargohold-fuzz-"))
    try:
        root = base / "root"
        outside = base / "outside"
        root.mkdir()
        outside.mkdir()
        (outside / "sentinel").write_text("untouched")
        (root / "l").symlink_to("../outside")  # a symlink leading out, as a parent layer may have left
        before = tree_of(outside)
        only_cargohold_errors(lambda: apply_layer(root, io.BytesIO(data), overlay=overlay, write_threads=0))
        assert sorted(os.listdir(base)) == ["outside", "root"]
        assert tree_of(outside) == before
    finally:
        shutil.rmtree(base)


def test_negative_base256_gid_is_refused_naming_the_entry(tmp_path: Path) -> None:
    """Found by fuzzing: a base-256 gid of -1 reached chown as OverflowError."""
    block = bytearray(512)
    block[0:1] = b"a"
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"\xff" * 8  # base-256 -1
    block[124:136] = b"00000000000\0"
    block[136:148] = b"00000000000\0"
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    (tmp_path / "root").mkdir()
    try:
        apply_layer(tmp_path / "root", io.BytesIO(bytes(block) + b"\0" * 1024), write_threads=0)
    except CargoholdError as exc:
        assert str(exc) == "tar entry 'a': gid -1 out of range"
    else:
        raise AssertionError("a negative gid was accepted")
