"""Progress that tells the truth: apply events advance while a layer extracts, plain (non-terminal) lines
with short digests, binary units and elapsed times, a periodic line for long transfers, and `--quiet`."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

from cargohold.cli.progress import ProgressRenderer
from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from cargohold.events import Event
from cargohold.oci import mediatypes as mt
from support.cli import cli

DIGEST = "sha256:" + "0123456789abcdef" * 4


def _big_layer_image() -> samples.SampleImage:
    # 6 MiB of incompressible bytes: the compressed blob is as big, and apply reads it in 1 MiB steps.
    data = random.Random(7).randbytes(6 << 20)
    return samples.build_image([samples.files_layer({"big.bin": data})])


def test_apply_progress_advances_while_a_layer_extracts(registry: RegistryProcess, tmp_path: Path) -> None:
    img = _big_layer_image()
    samples.push(registry.url, "demo/big", "v1", img)
    events: list[Event] = []
    client = Client(tmp_path / "root", on_event=events.append, default_snapshotter="native")
    try:
        client.pull(f"{registry.host}/demo/big:v1")
    finally:
        client.close()
    layer = img.layers[0]
    applying = [e for e in events if e.action == "apply" and e.item == str(layer.digest)]
    running = [e.current for e in applying if e.status == "running" and e.current]
    assert all(e.total == len(layer.data) for e in applying)
    assert len(running) >= 3, applying
    assert running == sorted(running)
    assert 0 < running[0] < len(layer.data)
    assert applying[-1].status == "done" and applying[-1].current == len(layer.data)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_have_short_digests_binary_units_and_elapsed_times() -> None:
    out, clock = io.StringIO(), _Clock()
    render = ProgressRenderer(stream=out, clock=clock)
    total = 50 << 20
    render(Event(action="fetch", status="running", item=DIGEST, media_type=mt.OCI_LAYER_GZIP, total=total))
    clock.now += 4
    render(Event(action="fetch", status="running", item=DIGEST, media_type=mt.OCI_LAYER_GZIP,
                 current=5 << 20, total=total))  # under 10 s since the last line: nothing
    clock.now += 7
    render(Event(action="fetch", status="running", item=DIGEST, media_type=mt.OCI_LAYER_GZIP,
                 current=20 << 20, total=total))  # a long transfer: a periodic line
    clock.now += 1.5
    render(Event(action="fetch", status="done", item=DIGEST, media_type=mt.OCI_LAYER_GZIP, current=total,
                 total=total))
    render(Event(action="host", status="running", item="registry http://127.0.0.1:1/v2"))  # --debug's business
    assert out.getvalue().splitlines() == [
        "[   0.0s] fetch running layer sha256:0123456789ab",
        "[  11.0s] fetch running layer sha256:0123456789ab 20.0 MiB of 50.0 MiB (40%)",
        "[  12.5s] fetch done layer sha256:0123456789ab 50.0 MiB",
    ]


def test_quiet_renderer_prints_nothing() -> None:
    out = io.StringIO()
    ProgressRenderer(stream=out, quiet=True)(Event(action="fetch", status="done", item=DIGEST, total=1))
    assert out.getvalue() == ""


def test_pull_output_plain_quiet_and_json(registry: RegistryProcess, tmp_path: Path) -> None:
    img = samples.build_image([samples.small_base_layer()])
    samples.push(registry.url, "demo/one", "v1", img)
    ref = f"{registry.host}/demo/one:v1"

    proc = cli(tmp_path / "a", "pull", "--snapshotter", "native", ref)
    short = str(img.layers[0].digest)[:19]
    assert re.search(rf"^\[ *\d+\.\ds\] fetch done layer {short} \d+ B$", proc.stderr, re.M), proc.stderr
    assert re.search(rf"^\[ *\d+\.\ds\] apply done layer {short} ", proc.stderr, re.M), proc.stderr
    assert "(1 layer applied, 0 reused)" in proc.stdout

    quiet = cli(tmp_path / "b", "--quiet", "pull", "--snapshotter", "native", ref)
    assert quiet.stderr == ""
    first, second = quiet.stdout.splitlines()
    assert first == f"{ref}: {img.digest} (3 fetched, {_human(img)}; 0 already present)"
    assert second.startswith("unpacked into native: sha256:")
    assert second.endswith(" (1 layer applied, 0 reused)")

    as_json = cli(tmp_path / "c", "pull", "--snapshotter", "native", "-o", "json", ref)
    assert as_json.stderr == ""
    assert as_json.stdout.startswith("{")


def _human(img: samples.SampleImage) -> str:
    n = len(img.manifest.data) + len(img.config.data) + sum(len(b.data) for b in img.layers)
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"
