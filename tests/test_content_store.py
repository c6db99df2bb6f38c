"""One conformance suite for content stores, run against ``LocalStore`` and ``NamespacedStore``, plus what is
particular to each: the local store's on-disk layout, the namespaced store's labels and namespaces.

Everything is real: files under tmp_path, a real SQLite DB, real processes holding real ``flock`` locks.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cargohold.content.local import LocalStore
from cargohold.content.namespaced import NamespacedStore
from cargohold.content.store import ContentStore, ReaderAt
from cargohold.errors import (
    AlreadyExistsError,
    DigestMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    LockedError,
    NotFoundError,
    SizeMismatchError,
)
from cargohold.metadata.db import MetadataDB
from cargohold.metadata.leases import LeaseStore, Resource
from cargohold.oci.digest import Digest

KINDS = ["local", "namespaced"]


def open_store(kind: str, root: Path, namespace: str = "default") -> ContentStore:
    local = LocalStore(root)
    if kind == "local":
        return local
    return NamespacedStore(local, MetadataDB(root / "metadata.db"), namespace)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def store(kind: str, root: Path) -> ContentStore:
    return open_store(kind, root)


def d(data: bytes) -> Digest:
    return Digest.from_bytes(data)


def put(
    store: ContentStore, data: bytes, ref: str | None = None, labels: dict[str, str] | None = None
) -> Digest:
    digest = d(data)
    with store.writer(ref or f"put-{digest.hex[:12]}") as w:
        w.write(data)
        return w.commit(len(data), digest, labels)


# -- a child process that holds or commits an ingest ---------------------------------------------------------

CHILD = r"""
import sys
from pathlib import Path
from cargohold.content.local import LocalStore
from cargohold.content.namespaced import NamespacedStore
from cargohold.metadata.db import MetadataDB
from cargohold.oci.digest import Digest

kind, root, ref, mode = sys.argv[1:5]
local = LocalStore(Path(root))
db = None if kind == "local" else MetadataDB(Path(root) / "metadata.db")
store = local if db is None else NamespacedStore(local, db, "default")
if mode == "hold":
    w = store.writer(ref)
    w.write(b"child-part:")
    print("holding", flush=True)
    sys.stdin.readline()
    w.write(b"more")
    w.close()
    print("released", flush=True)
elif mode == "commit":
    data = Path(sys.argv[5]).read_bytes()
    print("ready", flush=True)
    sys.stdin.readline()
    with store.writer(ref) as w:
        for i in range(0, len(data), 4096):
            w.write(data[i:i + 4096])
        w.commit(len(data), Digest.from_bytes(data))
    print("committed", flush=True)
"""


def child(kind: str, root: Path, ref: str, mode: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, str(root), ref, mode, *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def expect_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"child said {line!r}, wanted {want!r}; stderr: {err}")


def tell(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


# -- conformance: every store ----------------------------------------------------------------------------


def test_write_commit_read_back(store: ContentStore) -> None:
    data = os.urandom(300_000)
    digest = d(data)
    with store.writer("blob-1", expected=digest, total=len(data)) as w:
        assert w.ref == "blob-1"
        for i in range(0, len(data), 65536):
            assert w.write(data[i:i + 65536]) == len(data[i:i + 65536])
        assert w.offset == len(data)
        assert w.commit(len(data), digest) == digest
    assert store.exists(digest)
    assert store.read_all(digest) == data
    info = store.info(digest)
    assert (info.digest, info.size) == (digest, len(data))
    assert info.created_at <= info.updated_at
    with store.open(digest) as f:
        assert f.read(10) == data[:10]
        f.seek(len(data) - 5)
        assert f.read() == data[-5:]
    assert [i.digest for i in store.walk()] == [digest]
    assert store.list_statuses() == []


def test_empty_blob(store: ContentStore) -> None:
    digest = put(store, b"")
    assert store.read_all(digest) == b""
    assert store.info(digest).size == 0


def test_read_at_ranges(store: ContentStore) -> None:
    data = bytes(range(256)) * 40
    digest = put(store, data)
    with store.reader_at(digest) as r:
        assert isinstance(r, ReaderAt)
        assert r.size == len(data)
        assert r.read_at(0, 10) == data[:10]
        assert r.read_at(1000, 500) == data[1000:1500]
        assert r.read_at(len(data) - 3, 100) == data[-3:]  # short only at the end
        assert r.read_at(len(data), 10) == b""
        assert r.read_at(len(data) + 50, 10) == b""
        assert r.read_at(5, 0) == b""
        with pytest.raises(InvalidArgumentError, match=digest.hex):
            r.read_at(-1, 4)
    with pytest.raises(FailedPreconditionError, match="closed"):
        r.read_at(0, 1)


def test_wrong_digest_commits_nothing_and_discards_the_ingest(store: ContentStore, root: Path) -> None:
    data = b"the bytes we got"
    claimed = d(b"the bytes we were promised")
    w = store.writer("bad-digest")
    w.write(data)
    with pytest.raises(DigestMismatchError) as exc:
        w.commit(len(data), claimed)
    text = str(exc.value)
    assert str(claimed) in text and str(d(data)) in text and "bad-digest" in text
    assert exc.value.expected == claimed and exc.value.actual == d(data)
    assert not store.exists(claimed) and not store.exists(d(data))
    assert not (root / "content" / "blobs" / "sha256" / claimed.hex).exists()
    with pytest.raises(NotFoundError, match="bad-digest"):
        store.status("bad-digest")
    with pytest.raises(FailedPreconditionError, match="closed"):
        w.write(b"x")
    # The ref is free again and a retry starts clean.
    with store.writer("bad-digest") as again:
        assert again.offset == 0
        again.write(data)
        assert again.commit(len(data), d(data)) == d(data)
    assert store.read_all(d(data)) == data


def test_wrong_size_commits_nothing(store: ContentStore) -> None:
    data = b"0123456789"
    with store.writer("bad-size") as w:
        w.write(data)
        with pytest.raises(SizeMismatchError) as exc:
            w.commit(11, d(data))
    text = str(exc.value)
    assert str(d(data)) in text and "11" in text and "10" in text and "bad-size" in text
    assert not store.exists(d(data))
    assert store.list_statuses() == []
    # size 0 means "unknown": only the digest is checked.
    with store.writer("size-unknown") as w:
        w.write(data)
        assert w.commit(0, d(data)) == d(data)


def test_resume_after_close_verifies_the_whole_blob(store: ContentStore) -> None:
    data = os.urandom(100_000)
    half = len(data) // 2
    digest = d(data)
    with store.writer("resumable", expected=digest, total=len(data)) as w:
        w.write(data[:half])
    st = store.status("resumable")
    assert (st.ref, st.offset, st.total, st.expected) == ("resumable", half, len(data), digest)
    with store.writer("resumable") as w:
        assert w.offset == half
        assert w.status().offset == half and w.status().expected == digest
        w.write(data[half:])
        assert w.commit(len(data), digest) == digest
    assert store.read_all(digest) == data
    with pytest.raises(NotFoundError):
        store.status("resumable")


def test_resumed_partial_that_was_tampered_with_fails_verification(store: ContentStore, root: Path) -> None:
    data = os.urandom(20_000)
    with store.writer("tamper") as w:
        w.write(data[:10_000])
    partial = next(p for p in (root / "content" / "ingest").rglob("data"))
    raw = bytearray(partial.read_bytes())
    raw[100] ^= 0xFF
    partial.write_bytes(bytes(raw))
    with store.writer("tamper") as w:
        assert w.offset == 10_000
        w.write(data[10_000:])
        with pytest.raises(DigestMismatchError, match=d(data).hex):
            w.commit(len(data), d(data))
    assert not store.exists(d(data))


def test_status_list_and_abort(store: ContentStore) -> None:
    a = store.writer("ref-a", total=100, expected=d(b"a" * 100))
    a.write(b"a" * 40)
    a.close()
    b = store.writer("ref-b")
    b.write(b"bb")
    statuses = {s.ref: s for s in store.list_statuses()}
    assert set(statuses) == {"ref-a", "ref-b"}
    assert (statuses["ref-a"].offset, statuses["ref-a"].total, statuses["ref-a"].expected) == (
        40, 100, d(b"a" * 100))
    assert (statuses["ref-b"].offset, statuses["ref-b"].total, statuses["ref-b"].expected) == (2, 0, None)
    assert statuses["ref-a"].started_at <= statuses["ref-a"].updated_at
    with pytest.raises(LockedError, match="ref-b"):
        store.abort("ref-b")  # its writer is still open
    b.close()
    store.abort("ref-a")
    assert [s.ref for s in store.list_statuses()] == ["ref-b"]
    with pytest.raises(NotFoundError, match="ref-a"):
        store.status("ref-a")
    with pytest.raises(NotFoundError, match="ref-a"):
        store.abort("ref-a")
    store.abort("ref-b")
    assert store.list_statuses() == []
    with store.writer("ref-a") as w:
        assert w.offset == 0  # aborted: starts over


def test_truncate(store: ContentStore) -> None:
    with store.writer("trunc") as w:
        w.write(b"hello world")
        w.truncate(5)
        assert w.offset == 5
        w.write(b"!")
        with pytest.raises(InvalidArgumentError, match="trunc"):
            w.truncate(100)
        with pytest.raises(InvalidArgumentError, match="trunc"):
            w.truncate(-1)
        assert w.commit(6, d(b"hello!")) == d(b"hello!")
    with store.writer("restart") as w:
        w.write(b"garbage")
        w.truncate(0)
        assert w.offset == 0
        w.write(b"clean")
        w.close()
    with store.writer("restart") as w:
        assert w.offset == 5
        assert w.commit(5, d(b"clean")) == d(b"clean")
    assert store.read_all(d(b"clean")) == b"clean"


def test_another_process_holding_the_ref(kind: str, root: Path) -> None:
    store = open_store(kind, root)
    proc = child(kind, root, "shared-ref", "hold")
    try:
        expect_line(proc, "holding")
        with pytest.raises(LockedError, match=rf"ref \S*shared-ref locked by pid {proc.pid}"):
            store.writer("shared-ref", wait=False)
        started = time.monotonic()
        with pytest.raises(LockedError, match="shared-ref"):
            store.writer("shared-ref", wait=True, timeout=0.3)
        assert time.monotonic() - started >= 0.25
        # Release the child a little later; the waiting writer then gets the ref and resumes its data.
        threading.Timer(0.3, tell, args=(proc,)).start()
        with store.writer("shared-ref", wait=True, timeout=30) as w:
            assert w.offset == len(b"child-part:more")
            w.write(b"+parent")
            data = b"child-part:more+parent"
            assert w.commit(len(data), d(data)) == d(data)
        expect_line(proc, "released")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert store.read_all(d(b"child-part:more+parent")) == b"child-part:more+parent"


def test_killed_holder_releases_the_ref_and_its_data_resumes(kind: str, root: Path) -> None:
    store = open_store(kind, root)
    proc = child(kind, root, "crashy", "hold")
    try:
        expect_line(proc, "holding")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    with store.writer("crashy", wait=False) as w:
        assert w.offset == len(b"child-part:")
        w.write(b"rest")
        w.commit(0, d(b"child-part:rest"))
    assert store.read_all(d(b"child-part:rest")) == b"child-part:rest"


def test_threads_of_one_process_exclude_each_other(store: ContentStore) -> None:
    first = store.writer("threaded")
    first.write(b"first;")
    errors: list[BaseException] = []

    def try_now() -> None:
        try:
            store.writer("threaded", wait=False)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    t = threading.Thread(target=try_now)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], LockedError)
    assert "threaded" in str(errors[0]) and "this process" in str(errors[0])

    got: list[int] = []

    def wait_for_it() -> None:
        with store.writer("threaded", wait=True, timeout=30) as w:
            got.append(w.offset)
            w.write(b"second")
            w.commit(0, d(b"first;second"))

    t = threading.Thread(target=wait_for_it)
    t.start()
    time.sleep(0.2)
    assert got == []  # still waiting
    first.close()
    t.join(timeout=30)
    assert got == [len(b"first;")]
    assert store.read_all(d(b"first;second")) == b"first;second"


def _forked_try(root: str, queue: Any) -> None:
    try:
        LocalStore(Path(root)).writer("forked", wait=False)
        queue.put("acquired")
    except LockedError as exc:
        queue.put(str(exc))


def test_forked_child_does_not_inherit_the_parents_hold(root: Path) -> None:
    store = LocalStore(root)
    ctx = multiprocessing.get_context("fork")
    with store.writer("forked") as w:
        w.write(b"parent")
        queue = ctx.Queue()
        proc = ctx.Process(target=_forked_try, args=(str(root), queue))
        proc.start()
        answer = queue.get(timeout=30)
        proc.join(timeout=30)
        assert answer == f"ref forked locked by pid {os.getpid()}"
        assert w.offset == 6  # the child's exit did not release or disturb our hold
        with pytest.raises(LockedError):
            store.writer("forked", wait=False)
    with store.writer("forked", wait=False) as w:
        assert w.offset == 6


def test_same_digest_committed_concurrently_under_different_refs(kind: str, root: Path) -> None:
    store = open_store(kind, root)
    data = os.urandom(2_000_000)
    digest = d(data)
    source = root.parent / "blob.bin"
    source.write_bytes(data)
    procs = [child(kind, root, f"proc-{i}", "commit", str(source)) for i in range(2)]
    try:
        for p in procs:
            expect_line(p, "ready")
        barrier = threading.Barrier(3)
        results: list[Any] = []

        def commit_in_thread(i: int) -> None:
            barrier.wait()
            try:
                results.append(put(store, data, ref=f"thread-{i}"))
            except BaseException as exc:  # noqa: BLE001
                results.append(exc)

        threads = [threading.Thread(target=commit_in_thread, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for p in procs:
            tell(p)
        barrier.wait()
        for t in threads:
            t.join(timeout=60)
        for p in procs:
            expect_line(p, "committed")
            assert p.wait(timeout=30) == 0
    finally:
        for p in procs:
            p.kill()
            p.communicate(timeout=10)
    assert results == [digest, digest]
    assert store.read_all(digest) == data
    assert [i.digest for i in store.walk()] == [digest]
    assert store.list_statuses() == []
    assert not any((root / "content" / "ingest").iterdir())


def test_committing_a_present_digest_is_fine(store: ContentStore) -> None:
    digest = put(store, b"twice", ref="one")
    with store.writer("two") as w:
        w.write(b"twice")
        assert w.commit(5, digest) == digest
    assert store.read_all(digest) == b"twice"
    assert store.list_statuses() == []


def test_writer_for_present_expected_digest_already_exists(store: ContentStore) -> None:
    digest = put(store, b"here already")
    with pytest.raises(AlreadyExistsError, match=digest.hex):
        store.writer("again", expected=digest)
    assert store.list_statuses() == []


def test_delete_then_not_found(store: ContentStore) -> None:
    digest = put(store, b"short-lived")
    store.delete(digest)
    assert not store.exists(digest)
    for call in (store.info, store.read_all, store.reader_at, store.open, store.delete):
        with pytest.raises(NotFoundError, match=digest.hex):
            call(digest)
    assert list(store.walk()) == []
    put(store, b"short-lived")  # and it can come back
    assert store.read_all(digest) == b"short-lived"


def test_walk_lists_every_blob(store: ContentStore) -> None:
    digests = {put(store, f"blob {i}".encode()) for i in range(5)}
    assert {i.digest for i in store.walk()} == digests
    assert all(i.size == len(b"blob 0") for i in store.walk())


def test_writer_is_closed_after_commit(store: ContentStore) -> None:
    w = store.writer("once")
    w.write(b"x")
    w.commit(1, d(b"x"))
    for call in (lambda: w.write(b"y"), w.status, lambda: w.truncate(0), lambda: w.commit(1, d(b"x"))):
        with pytest.raises(FailedPreconditionError, match="once"):
            call()
    w.close()  # harmless


# -- LocalStore only ---------------------------------------------------------------------------------------


def test_local_layout_and_read_only_blobs(root: Path) -> None:
    store = LocalStore(root)
    w = store.writer("layout-ref", expected=d(b"abcdef"), total=6)
    w.write(b"abc")
    w.close()
    ingest = root / "content" / "ingest" / hashlib.sha256(b"layout-ref").hexdigest()
    assert sorted(p.name for p in ingest.iterdir()) == ["data", "expected", "lock", "ref", "startedat",
                                                        "total", "updatedat"]
    assert (ingest / "ref").read_text() == "layout-ref"
    assert (ingest / "data").read_bytes() == b"abc"
    assert (ingest / "total").read_text() == "6"
    assert (ingest / "expected").read_text() == str(d(b"abcdef"))
    with store.writer("layout-ref") as w:
        w.write(b"def")
        w.commit(6, d(b"abcdef"))
    blob = root / "content" / "blobs" / "sha256" / d(b"abcdef").hex
    assert blob.read_bytes() == b"abcdef"
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert not ingest.exists()


def test_local_store_keeps_no_labels(root: Path) -> None:
    store = LocalStore(root)
    digest = put(store, b"unlabelled", labels={"ignored": "yes"})
    assert store.info(digest).labels == {}
    with pytest.raises(FailedPreconditionError, match=digest.hex):
        store.update(digest, {"a": "b"})
    assert store.update(digest, {"a": None}).labels == {}
    assert list(store.walk(label_filters={"a": None})) == []
    assert [i.digest for i in store.walk(label_filters={})] == [digest]
    with pytest.raises(NotFoundError, match=d(b"nope").hex):
        store.update(d(b"nope"), {})


def test_local_walk_skips_foreign_files(root: Path) -> None:
    store = LocalStore(root)
    digest = put(store, b"real")
    (root / "content" / "blobs" / "sha256" / "not-a-digest").write_bytes(b"junk")
    (root / "content" / "blobs" / "md5").mkdir()
    assert [i.digest for i in store.walk()] == [digest]


def test_empty_ref_is_invalid(root: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="ref"):
        LocalStore(root).writer("")


# -- NamespacedStore only ------------------------------------------------------------------------------------


@pytest.fixture
def db(root: Path) -> MetadataDB:
    return MetadataDB(root / "metadata.db")


def ns_store(root: Path, db: MetadataDB, namespace: str) -> NamespacedStore:
    return NamespacedStore(LocalStore(root), db, namespace)


def test_labels_on_commit_update_and_walk_filters(root: Path, db: MetadataDB) -> None:
    store = ns_store(root, db, "default")
    a = put(store, b"a", labels={"kind": "layer", "team": "x"})
    b = put(store, b"b", labels={"kind": "config"})
    c = put(store, b"c")
    assert store.info(a).labels == {"kind": "layer", "team": "x"}
    before = store.info(a).updated_at
    info = store.update(a, {"team": None, "extra": "1", "kind": "layer"})
    assert info.labels == {"kind": "layer", "extra": "1"}
    assert info.updated_at >= before and info.created_at == store.info(a).created_at

    def walk(filters: dict[str, str | None] | None) -> set[Digest]:
        return {i.digest for i in store.walk(label_filters=filters)}

    assert walk(None) == {a, b, c}
    assert walk({"kind": "layer"}) == {a}
    assert walk({"kind": None}) == {a, b}
    assert walk({"kind": None, "extra": "1"}) == {a}
    assert walk({"kind": "nope"}) == set()
    with pytest.raises(NotFoundError, match=d(b"zzz").hex):
        store.update(d(b"zzz"), {"a": "b"})
    with pytest.raises(InvalidArgumentError, match="longer than 4096"):
        store.update(a, {"big": "x" * 5000})
    # Committing the same digest again sets the given labels and keeps the others.
    with store.writer("again") as w:
        w.write(b"a")
        w.commit(1, a, {"source": "registry"})
    assert store.info(a).labels == {"kind": "layer", "extra": "1", "source": "registry"}


def test_namespaces_isolate_visibility_and_share_files(root: Path, db: MetadataDB) -> None:
    one = ns_store(root, db, "one")
    two = ns_store(root, db, "two")
    digest = put(one, b"shared bytes", labels={"in": "one"})
    assert one.exists(digest) and not two.exists(digest)
    with pytest.raises(NotFoundError, match=rf"{digest.hex}.*namespace two"):
        two.read_all(digest)
    assert list(two.walk()) == []
    # A writer for a blob already on disk: the row is added and the answer is AlreadyExists (no download).
    with pytest.raises(AlreadyExistsError, match=digest.hex):
        two.writer("fetch", expected=digest)
    assert two.read_all(digest) == b"shared bytes"
    assert two.info(digest).labels == {}  # labels are per namespace
    assert one.info(digest).labels == {"in": "one"}
    assert two.list_statuses() == []
    blob = root / "content" / "blobs" / "sha256" / digest.hex
    one.delete(digest)
    assert not one.exists(digest) and blob.exists() and two.read_all(digest) == b"shared bytes"
    two.delete(digest)
    assert not blob.exists()


def test_ingest_refs_are_per_namespace(root: Path, db: MetadataDB) -> None:
    one = ns_store(root, db, "one")
    two = ns_store(root, db, "two")
    w1 = one.writer("same-ref")
    w1.write(b"111")
    with two.writer("same-ref", wait=False) as w2:  # not locked by namespace one's writer
        assert w2.offset == 0
        w2.write(b"22")
        assert w2.status().ref == "same-ref"
        assert [s.ref for s in one.list_statuses()] == ["same-ref"]
        assert one.status("same-ref").offset == 3 and two.status("same-ref").offset == 2
    w1.close()
    two.abort("same-ref")
    assert one.status("same-ref").offset == 3
    with pytest.raises(NotFoundError):
        two.status("same-ref")
    assert [s.ref for s in LocalStore(root).list_statuses()] == ["one/same-ref"]


def test_row_without_file_is_repaired_by_writing_again(root: Path, db: MetadataDB) -> None:
    store = ns_store(root, db, "default")
    digest = put(store, b"lost file")
    os.chmod(root / "content" / "blobs" / "sha256" / digest.hex, 0o644)
    (root / "content" / "blobs" / "sha256" / digest.hex).unlink()
    assert not store.exists(digest)
    with store.writer("refetch", expected=digest) as w:  # not AlreadyExists: the stale row is dropped
        w.write(b"lost file")
        w.commit(9, digest)
    assert store.read_all(digest) == b"lost file"


def test_lease_holds_what_the_store_writes(root: Path, db: MetadataDB) -> None:
    leases = LeaseStore(db, "default")
    lease = leases.create("pull-1")
    plain = ns_store(root, db, "default")
    other_ns = put(ns_store(root, db, "elsewhere"), b"already on disk")
    store = plain.with_lease(lease.id)
    fetched = put(store, b"fetched under lease", ref="layer-1")
    with pytest.raises(AlreadyExistsError):
        store.writer("layer-2", expected=other_ns)
    put(plain, b"not leased")
    assert leases.resources("pull-1") == [
        *(Resource(kind="content", resource=r) for r in sorted([str(other_ns), str(fetched)])),
        Resource(kind="ingest", resource="layer-1"),
    ]
    with pytest.raises(NotFoundError, match="no-such-lease"):
        plain.with_lease("no-such-lease").writer("x")


def test_both_stores_are_content_stores(root: Path, db: MetadataDB) -> None:
    # Checked statically by mypy (the annotations) and at run time by the protocol's members.
    stores: list[ContentStore] = [LocalStore(root), ns_store(root, db, "x")]
    for s in stores:
        for name in ("reader_at", "open", "read_all", "info", "update", "walk", "delete", "exists", "writer",
                     "status", "list_statuses", "abort"):
            assert callable(getattr(s, name)), name
