"""The bench's own instruments: the rate-limited proxy, the PNG writer, the tree compare and the image
generators (``make bench`` is only as honest as these)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from cargohold.devtools import benchchart, benchimages, benchnet, benchtree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to extract owners and setuid bits")
TINY = benchimages.Shape(name="tiny", layers=2, files=40, lo=1024, hi=16 << 10, seed=7)


def _serve(payload: bytes) -> tuple[socket.socket, threading.Thread]:
    """A loopback server that sends ``payload`` to every connection, then closes it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(payload)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return listener, t


def _fetch(port: int, out: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        chunks = []
        while data := s.recv(1 << 16):
            chunks.append(data)
    out.append(b"".join(chunks))


def test_proxy_limits_the_rate_and_delivers_the_bytes_intact() -> None:
    payload = hashlib.sha256(b"seed").digest() * (8_000_000 // 32)
    listener, _ = _serve(payload)
    try:
        with benchnet.RateLimitedProxy(listener.getsockname(), rate=16e6) as proxy:
            got: list[bytes] = []
            t0 = time.monotonic()
            _fetch(proxy.port, got)
            elapsed = time.monotonic() - t0
    finally:
        listener.close()
    assert got == [payload]
    assert elapsed >= 0.45, f"8 MB through a 16 MB/s proxy took {elapsed:.3f}s"


def test_proxy_connections_share_one_bucket() -> None:
    payload = b"x" * 4_000_000
    listener, _ = _serve(payload)
    try:
        with benchnet.RateLimitedProxy(listener.getsockname(), rate=16e6) as proxy:
            got: list[bytes] = []
            threads = [threading.Thread(target=_fetch, args=(proxy.port, got)) for _ in range(2)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
    finally:
        listener.close()
    assert got == [payload, payload]
    assert elapsed >= 0.45, f"2 x 4 MB through one 16 MB/s proxy took {elapsed:.3f}s"


def test_proxy_refuses_a_non_loopback_upstream() -> None:
    with pytest.raises(ValueError, match="10.0.0.1 is not a loopback address"):
        benchnet.RateLimitedProxy(("10.0.0.1", 80), rate=1e6)


def _parse_png(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = [raw[y * (1 + 3 * width):(y + 1) * (1 + 3 * width)] for y in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, b"".join(r[1:] for r in rows)


def test_chart_is_a_valid_png_with_the_bars_drawn(tmp_path: Path) -> None:
    out = tmp_path / "chart.png"
    benchchart.write_chart(out, "make bench", [("pull overlayfs", [("cargohold", 2.5), ("ctr", 6.8)]),
                                               ("second pull", [("cargohold", 0.2)])])
    width, height, pixels = _parse_png(out.read_bytes())
    assert width >= 320 and height == 310
    green, blue = bytes(benchchart.TOOL_COLORS["cargohold"]), bytes(benchchart.TOOL_COLORS["ctr"])
    px = [pixels[i:i + 3] for i in range(0, len(pixels), 3)]
    # ctr's bar is the tallest of its group: 85% of 200 px high, 32 px wide (plus the legend's 10x10 box).
    assert px.count(blue) == 170 * 32 + 100
    assert px.count(green) > 100
    with pytest.raises(ValueError, match="bytes of pixels"):
        benchchart.encode_png(2, 2, b"\x00" * 11)


def test_generators_are_deterministic(tmp_path: Path) -> None:
    a = benchimages.build(TINY, tmp_path / "a")
    b = benchimages.build(TINY, tmp_path / "b")
    assert a.digest == b.digest and [x.digest for x in a.layers] == [x.digest for x in b.layers]
    assert (tmp_path / "a" / "tiny-1.tar.gz").read_bytes() == (tmp_path / "b" / "tiny-1.tar.gz").read_bytes()
    for layer in a.layers:
        assert "sha256:" + hashlib.sha256(layer.path.read_bytes()).hexdigest() == layer.digest
        assert layer.size == layer.path.stat().st_size
        assert "sha256:" + hashlib.sha256(zlib.decompress(layer.path.read_bytes(), 31)).hexdigest() == layer.diff_id
    other = benchimages.build(benchimages.Shape(name="tiny", layers=2, files=40, lo=1024, hi=16 << 10, seed=8),
                              tmp_path / "c")
    assert other.digest != a.digest
    main = benchimages.main_shape()
    assert (main.layers, main.files * main.layers) == (4, 24000)
    assert benchimages.main_shape(2).files == 2 * main.files


def test_listing_views_follow_whiteouts(tmp_path: Path) -> None:
    img = benchimages.build(TINY, tmp_path)
    raw = [benchtree.layer_listing(x.path, "raw") for x in img.layers]
    over = benchtree.layer_listing(img.layers[1].path, "overlay")
    assert raw[1]["extra0/.wh.victim"].kind == "file"
    assert over["extra0/victim"].kind == "whiteout" and "extra0/.wh.victim" not in over
    assert (benchtree.OPAQUE_XATTR, b"y") in over["extra0/opaque"].xattrs
    merged = benchtree.merge(raw)
    assert "extra0/victim" not in merged and "extra0/opaque/hidden" not in merged
    assert merged["extra0/opaque/new"].kind == "file" and "extra1/victim" in merged
    assert not any("/.wh." in p for p in merged)
    assert merged["extra1/hard"] == merged[next(p for p in merged if p.startswith("layer1/") and p.endswith(".txt"))]
    assert merged["extra1/xattr"].xattrs == (("user.bench", b"layer 1"),)
    assert merged["extra1/private"][1:4] == (0o700, 1234, 5678)


@needs_root
@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_tree_compare_catches_mode_byte_link_and_missing_file(tmp_path: Path) -> None:
    img = benchimages.build(TINY, tmp_path / "img")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xzf", str(img.layers[0].path), "-C", str(root)],
                   check=True)
    want = benchtree.layer_listing(img.layers[0].path, "raw")
    assert benchtree.compare(want, benchtree.read_tree(root)) == []

    some = sorted(p for p in want if p.endswith(".txt"))
    os.chmod(root / "extra0/setuid", 0o755)
    with open(root / some[0], "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    os.unlink(root / "extra0/rel")
    os.symlink("elsewhere", root / "extra0/rel")
    os.unlink(root / some[1])
    (root / "extra0/stray").write_bytes(b"")
    problems = benchtree.compare(want, benchtree.read_tree(root))
    assert f"{some[1]}: missing" in problems
    assert "extra0/stray: unexpected file" in problems
    assert "extra0/setuid: mode 4755 != 0755 (expected != found)" in problems
    assert any(p.startswith(f"{some[0]}: sha256 ") for p in problems), problems
    assert any(p.startswith("extra0/rel: link ") and "'elsewhere'" in p for p in problems), problems
    # A hardlink turned into a copy: same bytes, one name per inode.
    os.unlink(root / "extra0/hard")
    shutil.copy2(root / some[0], root / "extra0/hard")
    found = benchtree.compare(want, benchtree.read_tree(root))
    assert any(p.startswith("extra0/hard: ") and "nlink 2 != 1" in p for p in found), found
    os.removexattr(root / "extra0/xattr", "user.bench")
    assert any(p.startswith("extra0/xattr: xattrs ") for p in benchtree.compare(want, benchtree.read_tree(root)))


@needs_root
@pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
def test_a_run_whose_tree_differs_fails_naming_run_tool_layer_and_path(tmp_path: Path) -> None:
    from cargohold.devtools import bench, benchrun

    img = benchimages.build(TINY, tmp_path / "img")
    ref = bench._reference(img)
    dirs = [tmp_path / "raw" / str(n) for n in range(len(img.layers))]
    for layer, d in zip(img.layers, dirs, strict=True):
        d.mkdir(parents=True)
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xzf", str(layer.path), "-C", str(d)], check=True)
    assert benchrun.check_raw("run 1 pull raw-floor", dirs, ref) == f"2 layers, {sum(map(len, ref.raw))} entries"
    os.chown(dirs[1] / "extra1/empty", 1, 1)
    with pytest.raises(benchrun.BenchError) as err:
        benchrun.check_raw("run 1 pull raw-floor", dirs, ref)
    assert str(err.value).startswith(f"run 1 pull raw-floor layer 1: {dirs[1]} differs from the reference:")
    assert "extra1/empty: uid 0 != 1, gid 0 != 1 (expected != found)" in str(err.value)
    # An overlayfs snapshot dir holding no layer of the image is named too.
    snaps = tmp_path / "snapshots"
    (snaps / "7" / "fs").mkdir(parents=True)
    with pytest.raises(benchrun.BenchError, match=r"run 2 pull ctr: snapshot .*/7/fs holds layers \[\], expected"):
        benchrun.check_overlay("run 2 pull ctr", snaps, ref)


def test_rows_give_medians_ratios_targets_and_rss_flatness() -> None:
    from cargohold.devtools import bench
    from cargohold.devtools.benchrun import Run

    def run(scenario: str, tool: str, n: int, seconds: float, rss: float | None = None) -> Run:
        return Run(scenario=scenario, tool=tool, run=n, seconds=seconds, cpu_seconds=0.0, check="ok",
                   rss_sum_mb=rss, rss_max_mb=rss)

    runs = [run("pull overlayfs", "cargohold", i, s) for i, s in enumerate([1.0, 3.0, 2.0, 9.0, 2.0], 1)]
    runs += [run("pull overlayfs", "ctr", i, s) for i, s in enumerate([10.0, 8.0, 12.0, 9.0, 11.0], 1)]
    runs += [run("pull overlayfs", "raw-floor", i, 1.6) for i in range(1, 6)]
    runs += [run("rss main", "cargohold", 1, 3.0, 80.0), run("rss main-x2", "cargohold", 1, 5.0, 110.0)]
    rows = bench.rows(runs)
    by = {(r["scenario"], r["tool"], r["rival"]): r for r in rows}
    assert by[("pull overlayfs", "cargohold", "ctr")]["median_s"] == 2.0
    assert by[("pull overlayfs", "cargohold", "ctr")]["ratio"] == pytest.approx(0.2)
    assert by[("pull overlayfs", "cargohold", "ctr")]["pass"] is True
    assert by[("pull overlayfs", "cargohold", "raw-floor")]["ratio"] == pytest.approx(1.25)
    assert by[("pull overlayfs", "cargohold", "raw-floor")]["pass"] is False
    assert by[("pull overlayfs", "ctr", None)]["runs"] == 5
    assert by[("rss main-x2", "cargohold", None)]["peak_rss_mb"] == 110.0
    assert by[("rss main-x2", "cargohold", None)]["pass"] is True
    flat = by[("rss main-x2 / rss main", "cargohold", "rss main")]
    assert flat["ratio"] == pytest.approx(110 / 80) and flat["pass"] is False
    assert not any(r["scenario"] == "rss main" and r["median_s"] is not None for r in rows)


def test_rss_sampler_sums_the_whole_process_tree(tmp_path: Path) -> None:
    from cargohold.devtools import benchrun

    hold = "import time; b = bytearray(60 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.6)"
    script = f'{sys.executable} -c "{hold}" & {sys.executable} -c "{hold}" & wait'
    t = benchrun.timed(["sh", "-c", script], tmp_path / "log", rss=True)
    assert t.rss_max_mb is not None and t.rss_sum_mb is not None
    assert 60 <= t.rss_max_mb < 100, t
    assert t.rss_sum_mb >= 120, t
