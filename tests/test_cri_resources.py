"""A long-running ``cargohold serve cri`` keeps a flat count of threads, file descriptors and database
connections: worker pools and SQLite connections have owners, so 2,000 CRI calls leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import grpc

from cargohold.cri.proto import api_pb2 as pb
from cargohold.cri.proto import api_pb2_grpc as pb_grpc
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from support.cli import cargohold_cmd, wait_for_socket

CALLS = 2000
SLACK = 3  # grpc may keep a stray worker or channel fd around; anything that grows per call is far above this


def _counts(pid: int) -> tuple[int, int, int]:
    """The process's threads, open fds, and fds open on the metadata database (db, -wal, -shm)."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = 0
    db = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        fds += 1
        db += "metadata.db" in target
    return threads, fds, db


def test_serve_cri_stays_flat(registry: RegistryProcess, tmp_path: Path) -> None:
    refs = []
    for i in range(2):
        img = samples.build_image([samples.files_layer({f"etc/file{i}": f"image {i}\n".encode()}),
                                   samples.files_layer({"etc/motd": b"hello\n"})])
        samples.push(registry.url, f"flat/app{i}", "v1", img)
        refs.append(f"{registry.host}/flat/app{i}:v1")
    root = tmp_path / "root"
    sock = Path(f"/tmp/cri-flat-{os.getpid()}.sock")
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}
    proc = subprocess.Popen(cargohold_cmd(root, "serve", "cri", "--socket", str(sock)), stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        wait_for_socket(proc, sock)
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            images = pb_grpc.ImageServiceStub(channel)

            def round_of_calls(i: int) -> int:
                """Five calls: pull (present), status, list, then remove and pull again (every third round)
                or status and list again."""
                spec = pb.ImageSpec(image=refs[i % 2])
                image_ref = images.PullImage(pb.PullImageRequest(image=spec), timeout=60).image_ref
                assert images.ImageStatus(pb.ImageStatusRequest(image=spec), timeout=30).image.id == image_ref
                assert image_ref in {i.id for i in images.ListImages(pb.ListImagesRequest(), timeout=30).images}
                if i % 3 == 0:
                    images.RemoveImage(pb.RemoveImageRequest(image=spec), timeout=30)
                    assert not images.ImageStatus(pb.ImageStatusRequest(image=spec), timeout=30).HasField("image")
                    assert images.PullImage(pb.PullImageRequest(image=spec), timeout=60).image_ref == image_ref
                else:
                    assert images.ImageStatus(pb.ImageStatusRequest(image=spec), timeout=30).image.id == image_ref
                    assert len(images.ListImages(pb.ListImagesRequest(), timeout=30).images) == 2
                return 5 + (i % 3 == 0)

            for i in range(30):  # warm up: pools, connections and caches reach their working size
                round_of_calls(i)
            before = _counts(proc.pid)
            calls = 0
            i = 0
            while calls < CALLS:
                calls += round_of_calls(i)
                i += 1
            after = _counts(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert before[2] > 0, "the server has the metadata database open"
    for what, b, a in zip(("threads", "file descriptors", "metadata.db connections"), before, after, strict=True):
        assert abs(a - b) <= SLACK, f"{what}: {b} before {CALLS} calls, {a} after"
