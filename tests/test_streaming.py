"""The pull pipeline: downloads never wait for applies, and an apply follows its layer's download as it is
written (one pass: the blob is written and hashed once, never read back from the store)."""

from __future__ import annotations

import json
import random
import threading
from contextlib import closing
from pathlib import Path

import pytest

from cargohold.client import Client
from cargohold.devtools import samples
from cargohold.devtools.benchnet import RateLimitedProxy
from cargohold.diff.worker import ApplyPool
from cargohold.events import Event
from support.cli import cli
from treeutil import expected_tree, read_tree

ENTRIES = [[samples.Entry(path=f"l{n}", kind="dir", mode=0o755),
            samples.Entry(path=f"l{n}/d0000", kind="dir", mode=0o755),
            *(samples.Entry(path=p, data=d) for p, d in sorted(samples.random_files(20 + n, 30, prefix=f"l{n}")
                                                                 .items()))]
           for n in range(5)]
LAYERS = [samples.tar_layer(entries) for entries in ENTRIES]


@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_downloads_never_wait_for_applies(registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          snapshotter: str) -> None:
    """Every apply is held until every layer is downloaded: with downloads queued behind applies (as before:
    fetch, then apply, in the same layer task) this pull could never finish."""
    img = samples.build_image(LAYERS)
    samples.push(registry.url, "stream/five", "v1", img)
    layer_digests = {str(b.digest) for b in img.layers}
    fetched: set[str] = set()
    all_fetched = threading.Event()
    lock = threading.Lock()

    def on_event(event: Event) -> None:
        if event.action == "fetch" and event.status == "done" and event.item in layer_digests:
            with lock:
                fetched.add(event.item)
                if fetched == layer_digests:
                    all_fetched.set()

    real = ApplyPool.apply
    held: list[bool] = []

    def held_apply(self: ApplyPool, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        # The applier waits here while downloads go on; more layer tasks than layers' downloads are never
        # needed for the downloads to finish.
        held.append(all_fetched.is_set())
        assert all_fetched.wait(60), f"downloads waited for applies: {len(fetched)} of 5 layers fetched"
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ApplyPool, "apply", held_apply)
    root = tmp_path / "root"
    with closing(Client(root, on_event=on_event, max_concurrent_downloads=2)) as client:
        result = client.pull(f"{registry.host}/stream/five:v1", snapshotter=snapshotter)
        assert result.unpack is not None and result.unpack.unpacked == 5
        assert False in held  # some apply really was waiting on downloads
        flat = tmp_path / "flat"
        client.rootfs(f"{registry.host}/stream/five:v1", flat)
    assert read_tree(flat) == expected_tree(ENTRIES)
    check = json.loads(cli(root, "images", "check", "--output", "json").stdout)
    assert [c["status"] for c in check] == ["complete"]


def test_a_layer_is_applied_while_it_downloads(registry, tmp_path: Path) -> None:
    """Through a slow link (a rate-limited proxy in front of the registry) the layer's apply reports progress
    before its download is done: one pass, the apply following the bytes the content writer stores."""
    rng = random.Random(5)
    files = {f"data/f{i:03d}.bin": rng.randbytes(48 << 10) for i in range(120)}  # ~5.6 MiB, incompressible
    img = samples.build_image([samples.files_layer(files)])
    samples.push(registry.url, "stream/slow", "v1", img)
    layer = str(img.layers[0].digest)
    events: list[Event] = []
    with RateLimitedProxy(("127.0.0.1", int(registry.host.rsplit(":", 1)[1])), rate=2.5e6) as proxy:
        ref = f"127.0.0.1:{proxy.port}/stream/slow:v1"
        with closing(Client(tmp_path / "root", on_event=events.append)) as client:
            client.pull(ref)
            flat = tmp_path / "flat"
            client.rootfs(ref, flat)
    fetch_done = next(n for n, e in enumerate(events)
                      if e.action == "fetch" and e.status == "done" and e.item == layer)
    applying = [n for n, e in enumerate(events) if e.action == "apply" and e.status == "running"
                and e.item == layer and (e.current or 0) > 0]
    assert applying and applying[0] < fetch_done, "the apply waited for the whole download"
    assert {p: (flat / p).read_bytes() for p in files} == files
