"""diff.worker: layer applies in real worker processes, following real blob files while a thread writes them."""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.treeutil import expected_tree, inode_groups, read_tree

import test_rootless
from cargohold.devtools.samples import Entry, gzip_bytes, random_files, tar_layer, zstd_bytes
from cargohold.diff.apply import ApplyResult, apply_layer
from cargohold.diff.worker import ApplyPool, ApplyRequest, Feed
from cargohold.errors import (
    CancelledError,
    CargoholdError,
    DigestMismatchError,
    FeedFailedError,
    LimitExceededError,
    NeedsParentsError,
    NoSpaceError,
    NotFoundError,
    UnsafePathError,
    is_no_space,
)
from cargohold.oci.digest import Digest

ROOT = os.geteuid() == 0
SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture
def pool() -> Iterator[ApplyPool]:
    p = ApplyPool(2)
    yield p
    p.close()


def sha(data: bytes) -> Digest:
    return Digest.from_bytes(data)


def blob_fd(tmp_path: Path, blob: bytes, name: str = "blob") -> int:
    path = tmp_path / name
    path.write_bytes(blob)
    return os.open(path, os.O_RDONLY)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie awaiting its reaper counts as gone, but not while some of its threads
    still exit (the group leader shows Z before the process can be reaped)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] != "Z":
                    return True
        except FileNotFoundError:
            continue
    return False


def children() -> list[int]:
    """Our live child processes."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.append(int(name))
    return out


def xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            names = os.listxattr(full, follow_symlinks=False)
            if names:
                out[os.path.relpath(full, root)] = {
                    n: os.getxattr(full, n, follow_symlinks=False) for n in sorted(names)}
    return out


BASE = [
    Entry(path="etc", kind="dir", mode=0o755),
    Entry(path="etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", mode=0o644),
    Entry(path="etc/shadow", data=b"root:*:1::::::\n", mode=0o640, uid=0, gid=42),
    Entry(path="srv", kind="dir", mode=0o750, uid=1000, gid=1000),
    Entry(path="srv/app", data=b"#!/bin/sh\necho hi\n", mode=0o4755, uid=1000, gid=1000),
    Entry(path="srv/data.bin", data=bytes(range(256)) * 300, xattrs={"user.origin": "sample"}),
    Entry(path="srv/link", kind="hardlink", link="srv/app"),
    Entry(path="bin", kind="dir", mode=0o755),
    Entry(path="bin/sh", kind="symlink", link="/srv/app", mode=0o777),
    Entry(path="run", kind="dir", mode=0o1777),
    Entry(path="run/fifo", kind="fifo", mode=0o600),
    Entry(path="old", kind="dir", mode=0o755),
    Entry(path="old/a", data=b"a"),
    Entry(path="old/b", data=b"b"),
    Entry(path="opq", kind="dir", mode=0o755),
    Entry(path="opq/gone", data=b"gone"),
]
TOP = [
    Entry(path="old", kind="dir", mode=0o755),
    Entry(path="old/.wh.a", data=b""),
    Entry(path="opq", kind="dir", mode=0o700),
    Entry(path="opq/.wh..wh..opq", data=b""),
    Entry(path="opq/new", data=b"new", uid=7, gid=8),
    Entry(path="etc", kind="dir", mode=0o755),
    Entry(path="etc/passwd", data=b"root:x:0:0::/root:/bin/bash\n"),
    Entry(path="etc/hosts", kind="hardlink", link="etc/passwd"),
]


def test_in_process_and_worker_applies_give_identical_trees_and_results(tmp_path: Path, pool: ApplyPool) -> None:
    layers = [(tar_layer(BASE), gzip_bytes), (tar_layer(TOP), zstd_bytes)]
    local = ApplyPool(0)
    results: dict[str, list[ApplyResult]] = {}
    for name, p in (("inline", local), ("workers", pool)):
        root = fresh(tmp_path / name / "root")  # the same path length: identical error and result text
        results[name] = []
        for tar, compress in layers:
            blob = compress(tar)
            request = ApplyRequest(root=str(root), overlay=False, expected_digest=sha(blob),
                                   expected_diff_id=sha(tar))
            results[name].append(p.apply(request, blob_fd(tmp_path / name, blob)))
    inline, workers = tmp_path / "inline" / "root", tmp_path / "workers" / "root"
    assert results["workers"] == results["inline"]
    assert [r.diff_id for r in results["workers"]] == [sha(t) for t, _ in layers]
    assert read_tree(workers) == read_tree(inline)
    if ROOT:  # owners are applied only by root; the model says what they must be
        assert read_tree(workers) == expected_tree([BASE, TOP])
    assert inode_groups(workers) == inode_groups(inline) == [{"etc/hosts", "etc/passwd"}, {"srv/app", "srv/link"}]
    assert xattrs(workers) == xattrs(inline)
    assert xattrs(workers).get("srv/data.bin") == {"user.origin": b"sample"}


def test_overlay_applies_match_too(tmp_path: Path, pool: ApplyPool) -> None:
    if not ROOT:
        pytest.skip("overlay whiteouts are char devices: mknod needs root")
    tar = tar_layer(TOP)
    blob = gzip_bytes(tar)
    trees = []
    for name, p in (("inline", ApplyPool(0)), ("workers", pool)):
        root = fresh(tmp_path / name / "upper")
        result = p.apply(ApplyRequest(root=str(root), overlay=True, expected_diff_id=sha(tar)),
                         blob_fd(tmp_path / name, blob))
        assert result.digest is None  # not asked for: the compressed bytes were not hashed
        trees.append((read_tree(root), xattrs(root)))
    assert trees[0] == trees[1]
    assert trees[1][0]["old/a"][0] == "char" and trees[1][1]["opq"] == {"trusted.overlay.opaque": b"y"}


def _writer(path: Path, blob: bytes, feed: Feed, *, chunk: int, pause: float,
            stop_at: int | None = None, fail: str = "", hold_at: int | None = None) -> threading.Thread:
    """A thread writing ``blob`` into ``path`` in chunks (as a download would), then ``feed.end``. ``stop_at``:
    stop there and ``feed.fail(fail)``; ``hold_at``: rest a while there (the reader meets the file's end)."""

    def run() -> None:
        with open(path, "ab") as out:
            pos = 0
            limit = len(blob) if stop_at is None else stop_at
            while pos < limit:
                step = min(chunk, limit - pos)
                if hold_at is not None and pos < hold_at < pos + step:
                    step = hold_at - pos
                out.write(blob[pos:pos + step])
                out.flush()
                pos += step
                time.sleep(0.2 if pos == hold_at else pause)
        if stop_at is None:
            feed.end(len(blob))
        else:
            feed.fail(fail)

    return threading.Thread(target=run, name="test-writer")


@pytest.mark.parametrize("processes", [0, 2])
def test_apply_follows_a_blob_file_while_it_is_written(tmp_path: Path, processes: int) -> None:
    files = random_files(14, 300, max_size=6000)
    tar = tar_layer([Entry(path="data", kind="dir", mode=0o755)]
                    + [Entry(path=p, kind="dir", mode=0o755) for p in sorted({k.rpartition("/")[0] for k in files})]
                    + [Entry(path=k, data=v) for k, v in sorted(files.items())], trailing=b"after the end\0")
    member = gzip_bytes(tar)
    blob = member + b"\0" * 3000  # NUL padding after the member: part of the blob, written after a pause
    path = tmp_path / "ingest"
    path.write_bytes(b"")
    feed = Feed()
    root = fresh(tmp_path / "root")
    p = ApplyPool(processes)
    try:
        fd = os.open(path, os.O_RDONLY)  # opened before the first byte is written
        writer = _writer(path, blob, feed, chunk=8192, pause=0.002, hold_at=len(member))
        writer.start()
        result = p.apply(ApplyRequest(root=str(root), overlay=False, expected_digest=sha(blob),
                                      expected_diff_id=sha(tar)), fd, feed=feed)
        writer.join()
    finally:
        p.close()
    assert (result.digest, result.diff_id) == (sha(blob), sha(tar))
    assert (result.size_compressed, result.size_uncompressed) == (len(blob), len(tar))
    got = read_tree(root)
    assert {k: v for k, v in got.items() if v[0] == "file"} == {
        k: v for k, v in expected_tree([[Entry(path=k, data=v) for k, v in files.items()]]).items()}


def test_apply_reads_only_the_size_the_feed_ends_with(tmp_path: Path, pool: ApplyPool) -> None:
    tar = tar_layer([Entry(path="f", data=b"x" * 5000)])
    blob = gzip_bytes(tar)
    path = tmp_path / "ingest"
    path.write_bytes(blob + b"junk that is not the blob's")  # e.g. a writer's preallocated or stale tail
    feed = Feed()
    feed.end(len(blob))
    result = pool.apply(ApplyRequest(root=str(fresh(tmp_path / "root")), overlay=False, expected_digest=sha(blob)),
                        os.open(path, os.O_RDONLY), feed=feed)
    assert (result.digest, result.size_compressed, result.diff_id) == (sha(blob), len(blob), sha(tar))


@pytest.mark.parametrize("processes", [0, 2])
def test_feed_failure_stops_the_apply(tmp_path: Path, processes: int) -> None:
    tar = tar_layer([Entry(path=k, data=v) for k, v in sorted(random_files(3, 200).items())])
    blob = gzip_bytes(tar)
    path = tmp_path / "ingest"
    path.write_bytes(b"")
    feed = Feed()
    p = ApplyPool(processes)
    try:
        writer = _writer(path, blob, feed, chunk=4096, pause=0.002, stop_at=len(blob) // 2,
                         fail="registry 127.0.0.1:5000 closed the connection at 40%")
        writer.start()
        with pytest.raises(FeedFailedError, match="registry 127.0.0.1:5000 closed the connection at 40%"):
            p.apply(ApplyRequest(root=str(fresh(tmp_path / "root")), overlay=False), os.open(path, os.O_RDONLY),
                    feed=feed)
        writer.join()
        # The worker answered with the error and serves the next apply.
        good = gzip_bytes(tar_layer([Entry(path="ok", data=b"ok")]))
        assert p.apply(ApplyRequest(root=str(fresh(tmp_path / "root2")), overlay=False),
                       blob_fd(tmp_path, good)).entries == 1
    finally:
        p.close()


def test_a_feed_ending_short_of_the_file_is_an_error(tmp_path: Path, pool: ApplyPool) -> None:
    blob = gzip_bytes(tar_layer([Entry(path="f", data=b"x" * 5000)]))
    path = tmp_path / "ingest"
    path.write_bytes(blob[:100])
    feed = Feed()
    feed.end(len(blob))  # claims more than the file holds
    with pytest.raises(CargoholdError, match=f"blob file ends at 100 bytes, its writer announced {len(blob)}"):
        pool.apply(ApplyRequest(root=str(fresh(tmp_path / "root")), overlay=False), os.open(path, os.O_RDONLY),
                   feed=feed)


def _both(tmp_path: Path, pool: ApplyPool, blob: bytes, **kw: object) -> tuple[BaseException, BaseException]:
    """The error of one apply inline, then in a worker, into the same (emptied) root."""
    out = []
    root = tmp_path / "root"
    for p in (ApplyPool(0), pool):
        fresh(root)
        with pytest.raises(BaseException) as info:
            p.apply(ApplyRequest(root=str(root), **kw), blob_fd(tmp_path, blob))  # type: ignore[arg-type]
        out.append(info.value)
    return out[0], out[1]


def _same(inline: BaseException, worker: BaseException, kind: type[BaseException], text: str) -> None:
    assert type(worker) is type(inline) is kind
    assert str(worker) == str(inline) and text in str(worker)
    assert getattr(worker, "__notes__", None) == getattr(inline, "__notes__", None)


def test_errors_cross_the_process_boundary_with_their_kind_and_message(tmp_path: Path, pool: ApplyPool) -> None:
    tar = tar_layer([Entry(path="f", data=b"x" * 5000)])
    wrong = sha(b"something else")
    inline, worker = _both(tmp_path, pool, gzip_bytes(tar), overlay=False, expected_diff_id=wrong)
    _same(inline, worker, DigestMismatchError, f"expected {wrong}, got {sha(tar)}")
    assert isinstance(worker, DigestMismatchError) and (worker.expected, worker.actual) == (wrong, sha(tar))

    escape = gzip_bytes(tar_layer([Entry(path="../escape", data=b"out")]))
    _same(*_both(tmp_path, pool, escape, overlay=False), UnsafePathError, "../escape")
    assert not (tmp_path / "escape").exists()

    orphan = gzip_bytes(tar_layer([Entry(path="usr/lib/libc.so", data=b"elf")]))
    _same(*_both(tmp_path, pool, orphan, overlay=True, isolated=True), NeedsParentsError, "usr/lib")

    big = gzip_bytes(tar_layer([Entry(path="big", data=b"\0" * 200_000)]))
    _same(*_both(tmp_path, pool, big, overlay=False, max_unpacked_size=50_000), LimitExceededError, "50000")


def test_os_errors_keep_errno_strerror_and_filename(tmp_path: Path, pool: ApplyPool) -> None:
    long_name = gzip_bytes(tar_layer([Entry(path="d/" + "n" * 300, data=b"x")]))
    inline, worker = _both(tmp_path, pool, long_name, overlay=False)
    assert type(worker) is type(inline) and isinstance(worker, OSError) and isinstance(inline, OSError)
    assert (worker.errno, worker.strerror, worker.filename) == (inline.errno, inline.strerror, inline.filename)
    assert worker.errno == errno.ENAMETOOLONG and str(worker) == str(inline)
    assert worker.__notes__ == inline.__notes__  # which tar entry, under which root


def test_worker_warnings_are_logged_by_the_parent(tmp_path: Path, pool: ApplyPool,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    blob = gzip_bytes(tar_layer([Entry(path="f", data=b"x", xattrs={"trusted.evil": "1"})]))
    with caplog.at_level(logging.WARNING):
        pool.apply(ApplyRequest(root=str(fresh(tmp_path / "root")), overlay=False), blob_fd(tmp_path, blob))
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("cargohold.diff.attrs", logging.WARNING,
         "tar entry 'f': xattr trusted.evil ignored (trusted.* is never taken from a layer)")]


def _stalled(tmp_path: Path, name: str) -> tuple[int, Feed, bytes]:
    """An fd on a blob file whose first half is written and whose writer then stalls (the feed never ends)."""
    tar = tar_layer([Entry(path=k, data=v) for k, v in sorted(random_files(5, 400, min_size=4000).items())])
    blob = gzip_bytes(tar, level=1)
    path = tmp_path / name
    path.write_bytes(blob[: len(blob) // 2])
    return os.open(path, os.O_RDONLY), Feed(), blob


def test_raising_on_progress_kills_the_worker_and_the_pool_goes_on(tmp_path: Path, pool: ApplyPool) -> None:
    fd, feed, _blob = _stalled(tmp_path, "stalled")
    cancel = threading.Event()
    seen: list[tuple[int, int]] = []
    cancelled_at: list[float] = []
    pids: list[int] = []

    def progress(c: int, u: int) -> None:
        seen.append((c, u))
        if not pids:
            pids.extend(pool.pids())
        if cancel.is_set():
            raise CancelledError("pull cancelled")

    def cancel_soon() -> None:
        while not seen:
            time.sleep(0.01)
        time.sleep(0.1)
        cancelled_at.append(time.monotonic())
        cancel.set()

    threading.Thread(target=cancel_soon).start()
    with pytest.raises(CancelledError, match="pull cancelled"):
        pool.apply(ApplyRequest(root=str(fresh(tmp_path / "root")), overlay=False), fd, feed=feed,
                   on_progress=progress)
    assert time.monotonic() - cancelled_at[0] < 2.0
    assert len(pids) == 1 and not alive(pids[0]) and pool.pids() == [] and children() == []
    blob = gzip_bytes(tar_layer([Entry(path="after", data=b"ok")]))
    after = pool.apply(ApplyRequest(root=str(fresh(tmp_path / "r2")), overlay=False), blob_fd(tmp_path, blob))
    assert after.entries == 1


def test_a_worker_killed_mid_apply_fails_that_apply_only(tmp_path: Path, pool: ApplyPool) -> None:
    fd, feed, _blob = _stalled(tmp_path, "stalled")
    root = fresh(tmp_path / "root")
    pids: list[int] = []

    def progress(c: int, u: int) -> None:
        if not pids:
            pids.extend(pool.pids())
            os.kill(pids[0], signal.SIGKILL)

    died = rf"layer apply into {root}: worker process {{pid}} died \(killed by SIGKILL\)"
    with pytest.raises(CargoholdError) as info:
        pool.apply(ApplyRequest(root=str(root), overlay=False), fd, feed=feed, on_progress=progress)
    assert re.fullmatch(died.format(pid=pids[0]), str(info.value))
    assert not alive(pids[0]) and pids[0] not in pool.pids()
    blob = gzip_bytes(tar_layer([Entry(path="after", data=b"ok")]))
    after = pool.apply(ApplyRequest(root=str(fresh(tmp_path / "r2")), overlay=False), blob_fd(tmp_path, blob))
    assert after.entries == 1


def test_two_applies_run_at_once_on_two_workers(tmp_path: Path, pool: ApplyPool) -> None:
    jobs = [_stalled(tmp_path, f"blob{i}") for i in range(2)]
    progressed = [threading.Event(), threading.Event()]
    results: list[ApplyResult | BaseException | None] = [None, None]

    def run(i: int) -> None:
        fd, feed, _blob = jobs[i]
        try:
            results[i] = pool.apply(ApplyRequest(root=str(fresh(tmp_path / f"root{i}")), overlay=False), fd,
                                    feed=feed, on_progress=lambda c, u: c and progressed[i].set())
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    # Both read their first halves while neither can finish: they run side by side, on two processes.
    assert all(e.wait(10) for e in progressed)
    assert len(pool.pids()) == 2
    for i, (_fd, feed, blob) in enumerate(jobs):
        with open(tmp_path / f"blob{i}", "ab") as out:
            out.write(blob[len(blob) // 2:])
        feed.end(len(blob))
    for t in threads:
        t.join()
    assert [r.size_compressed if isinstance(r, ApplyResult) else r for r in results] == [len(b) for _, _, b in jobs]


def test_close_leaves_no_child_process(tmp_path: Path) -> None:
    p = ApplyPool(2)
    p.prestart()
    blob = gzip_bytes(tar_layer([Entry(path="f", data=b"x")]))
    p.apply(ApplyRequest(root=str(fresh(tmp_path / "root")), overlay=False), blob_fd(tmp_path, blob))
    deadline = time.monotonic() + 10
    while len(p.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = p.pids()
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    p.close()
    p.close()
    assert not any(alive(pid) for pid in pids) and children() == []
    with pytest.raises(CargoholdError, match="closed"):
        p.apply(ApplyRequest(root=str(tmp_path / "root"), overlay=False), blob_fd(tmp_path, blob))


KILLED_PARENT = textwrap.dedent("""
    import os, subprocess, sys
    from cargohold.diff.worker import ApplyPool, ApplyRequest, Feed

    pool = ApplyPool(1)
    holder = []

    def progress(c, u):
        if c and not holder:  # the worker is applying
            # Another process keeps the worker's socket open: our death gives the worker no EOF, only
            # PR_SET_PDEATHSIG can end it.
            (worker,) = pool._all
            holder.append(subprocess.Popen(["sleep", "60"], pass_fds=[worker.sock.fileno()]))
            print(worker.pid, holder[0].pid, flush=True)  # the test kills us now, mid-apply

    pool.apply(ApplyRequest(root=sys.argv[2], overlay=False), os.open(sys.argv[1], os.O_RDONLY), feed=Feed(),
               on_progress=progress)
""")


def test_kill_9_of_the_parent_leaves_no_worker(tmp_path: Path) -> None:
    fd, _feed, _blob = _stalled(tmp_path, "stalled")
    os.close(fd)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    parent = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(tmp_path / "stalled"),
                               str(fresh(tmp_path / "root"))], stdout=subprocess.PIPE, env=env, text=True)
    assert parent.stdout is not None
    worker, holder = map(int, parent.stdout.readline().split())
    try:
        assert alive(worker)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(worker)
    finally:
        os.kill(holder, signal.SIGKILL)


def _counts() -> tuple[int, int, int]:
    """(fds, OS threads, child processes), once every joined thread has also left the kernel."""
    deadline = time.monotonic() + 2
    while len(os.listdir("/proc/self/task")) > threading.active_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")), len(children())


def test_fds_threads_and_processes_stay_flat_over_many_applies(tmp_path: Path, pool: ApplyPool) -> None:
    tar = tar_layer([Entry(path="d", kind="dir", mode=0o755), Entry(path="d/f", data=b"hello" * 100)])
    blob = gzip_bytes(tar)
    (tmp_path / "blob").write_bytes(blob)

    def one(i: int) -> None:
        root = fresh(tmp_path / f"root{i % 3}")
        fd = os.open(tmp_path / "blob", os.O_RDONLY)
        request = ApplyRequest(root=str(root), overlay=False,
                               expected_diff_id=sha(tar) if i % 10 else sha(b"wrong"))
        feed: Feed | None = None
        if i % 3 == 0:
            feed = Feed()
            feed.end(len(blob))
        if i % 10:
            assert pool.apply(request, fd, feed=feed).diff_id == sha(tar)
        else:
            with pytest.raises(DigestMismatchError):
                pool.apply(request, fd, feed=feed)

    def three_at_once(i: int) -> None:  # on two workers: one waits for the first to be free
        threads = [threading.Thread(target=one, args=(i + k,)) for k in (1, 2)]
        for t in threads:
            t.start()
        one(i)
        for t in threads:
            t.join()

    for i in range(0, 30, 3):
        three_at_once(i)
    before = _counts()
    for i in range(0, 210, 3):
        three_at_once(i)
    assert _counts() == before
    assert before[2] == 2


def test_workers_stay_small(tmp_path: Path, pool: ApplyPool) -> None:
    blob = gzip_bytes(tar_layer([Entry(path=k, data=v) for k, v in sorted(random_files(9, 300).items())]))
    pool.apply(ApplyRequest(root=str(fresh(tmp_path / "root")), overlay=False), blob_fd(tmp_path, blob))
    (pid,) = pool.pids()
    with open(f"/proc/{pid}/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    assert cmdline[1:3] == [b"-m", b"cargohold.diff.worker"]
    assert hwm < 48 * 1024, f"worker peak RSS {hwm} kB"
    mods = subprocess.run([sys.executable, "-c", "import sys, cargohold.diff.worker; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=SRC)).stdout.split()
    assert not {"click", "rich", "urllib3", "sqlite3", "grpc", "multiprocessing"} & set(mods)


def test_apply_layer_without_expected_digest_does_not_hash_the_blob(tmp_path: Path) -> None:
    tar = tar_layer([Entry(path="f", data=b"x")])
    blob = gzip_bytes(tar)
    with open(tmp_path / "b", "wb") as out:
        out.write(blob)
    with open(tmp_path / "b", "rb") as src:
        result = apply_layer(fresh(tmp_path / "root"), src, expected_diff_id=sha(tar))
    assert (result.digest, result.diff_id, result.size_compressed) == (None, sha(tar), len(blob))



# The rootless tests' world-readable copy of the code and a home for the unprivileged user.
world_readable_code = test_rootless.world_readable_code
user_home = test_rootless.user_home

AS_USER = textwrap.dedent("""
    import logging, os, sys
    logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
    from cargohold.diff.worker import ApplyPool, ApplyRequest

    pool = ApplyPool(1)
    result = pool.apply(ApplyRequest(root=sys.argv[2], overlay=False), os.open(sys.argv[1], os.O_RDONLY))
    (pid,) = pool.pids()
    with open(f"/proc/{pid}/status") as f:
        uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
    print(result.entries, uid, flush=True)
    pool.close()
""")


def test_workers_run_as_the_calling_user(world_readable_code: Path, user_home: Path) -> None:
    blob = gzip_bytes(tar_layer([Entry(path="srv", kind="dir", mode=0o755, uid=1000, gid=1000),
                                 Entry(path="srv/app", data=b"app", mode=0o640, uid=1000, gid=1000)]))
    (user_home / "blob").write_bytes(blob)
    os.chmod(user_home / "blob", 0o644)
    root = user_home / "root"
    root.mkdir()
    os.chown(root, test_rootless.UID, test_rootless.GID)
    env = {"HOME": str(user_home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PYTHONPATH": f"{world_readable_code / 'src'}:{world_readable_code / 'site'}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    drop = (["setpriv", f"--reuid={test_rootless.UID}", f"--regid={test_rootless.GID}", "--clear-groups"]
            if ROOT else [])
    proc = subprocess.run([*drop, test_rootless.SYSTEM_PYTHON, "-c", AS_USER, str(user_home / "blob"), str(root)],
                          env=env, cwd=user_home, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", str(test_rootless.UID)]
    assert "cargohold.diff.attrs WARNING not root: tar owners not applied" in proc.stderr
    st = (root / "srv" / "app").stat()
    assert ((root / "srv" / "app").read_bytes(), st.st_uid, st.st_mode & 0o777) == (b"app", test_rootless.UID, 0o640)


def test_an_idle_worker_that_died_is_replaced(tmp_path: Path) -> None:
    p = ApplyPool(1)
    try:
        blob = gzip_bytes(tar_layer([Entry(path="f", data=b"x")]))
        p.apply(ApplyRequest(root=str(fresh(tmp_path / "r1")), overlay=False), blob_fd(tmp_path, blob))
        (first,) = p.pids()
        os.kill(first, signal.SIGKILL)
        while alive(first):
            time.sleep(0.01)
        again = p.apply(ApplyRequest(root=str(fresh(tmp_path / "r2")), overlay=False), blob_fd(tmp_path, blob))
        assert again.entries == 1
        (second,) = p.pids()
        assert second != first and children() == [second]
    finally:
        p.close()


def test_a_pool_dropped_without_close_leaves_no_thread_or_worker(tmp_path: Path) -> None:
    p = ApplyPool(1)
    blob = gzip_bytes(tar_layer([Entry(path="f", data=b"x")]))
    p.apply(ApplyRequest(root=str(fresh(tmp_path / "root")), overlay=False), blob_fd(tmp_path, blob))
    (pid,) = p.pids()
    del p
    gc.collect()
    deadline = time.monotonic() + 5
    while (alive(pid) or any(t.name == "apply-pool-spawner" for t in threading.enumerate())) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(pid)
    assert not any(t.name == "apply-pool-spawner" for t in threading.enumerate())


def test_missing_root_and_full_disk_errors_cross_too(tmp_path: Path, pool: ApplyPool) -> None:
    blob = gzip_bytes(tar_layer([Entry(path="big", data=bytes(range(256)) * 4096)]))  # 1 MiB
    missing = str(tmp_path / "missing")
    errs = []
    for p in (ApplyPool(0), pool):
        with pytest.raises(NotFoundError) as info:
            p.apply(ApplyRequest(root=missing, overlay=False), blob_fd(tmp_path, blob))
        errs.append(str(info.value))
    assert errs[0] == errs[1] == f"apply target {missing}: not a directory"
    if not ROOT:
        return
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        errs = []
        for p in (ApplyPool(0), pool):
            fresh(small / "root")
            with pytest.raises(NoSpaceError) as info:
                p.apply(ApplyRequest(root=str(small / "root"), overlay=False), blob_fd(tmp_path, blob))
            errs.append(str(info.value))
        assert errs[0] == errs[1] and f"into {small / 'root'}: No space left on device" in errs[1]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_other_exceptions_become_cargohold_errors_naming_their_type() -> None:
    from cargohold.diff.worker import _decode_error, _encode_error

    exc = _decode_error(_encode_error(ValueError("bad value")), "layer apply into /r")
    assert type(exc) is CargoholdError and str(exc) == "layer apply into /r: builtins.ValueError: bad value"
    os_exc = _decode_error(_encode_error(FileNotFoundError(errno.ENOENT, "No such file", "/r/x")), "w")
    assert type(os_exc) is FileNotFoundError and not is_no_space(os_exc)
    full = _decode_error(_encode_error(OSError(errno.ENOSPC, "No space left on device", "/r/y")), "w")
    assert isinstance(full, OSError) and is_no_space(full) and (full.errno, full.filename) == (errno.ENOSPC, "/r/y")
