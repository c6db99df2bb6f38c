"""Unpack one manifest's layers into a snapshotter.

For each layer, keyed by its chainID:

* The snapshot exists: still make sure this image's compressed blob is in the content store, fetching it when
  missing (containerd skipped that, leaving images that could not be exported or pushed) — unless the
  snapshotter is remote/lazy, which fetches on demand by design and must not be force-fed.
* A remote snapshotter gets a chance to provide the layer lazily: ``prepare`` with the target labels answers
  AlreadyExists when it did.
* Otherwise fetch the blob (3 at a time), apply it, commit the snapshot under the chainID.

Layers are fetched and applied as they arrive. On a snapshotter that can rebase (overlayfs), each layer is
applied into its own upper directory in parallel and committed onto its parent in order; elsewhere layers apply
in order. Two unpacks of the same chainID (threads or processes) serialise on a file lock: one does the work,
the other finds the snapshot and reuses it.

Garbage collection: ``hold`` (the caller's lease) gets every snapshot name before the unpacker looks at it or
prepares it, its own ``extract-…`` keys included, so a concurrent gc either keeps it or had removed it before
the look. A parent that vanishes anyway (removed by hand between the look and the prepare) makes the unpack
start over (a few times) instead of failing: the layers still there are found again, the missing rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cargohold import stages
from cargohold.content.store import ContentStore
from cargohold.diff.worker import ApplyPool, ApplyRequest, Feed, shared_pool
from cargohold.errors import (
    AlreadyExistsError,
    CargoholdError,
    FailedPreconditionError,
    FeedFailedError,
    LimitExceededError,
    NeedsParentsError,
    NoSpaceError,
    NotFoundError,
    is_no_space,
    no_space,
)
from cargohold.events import Event, EventSink, discard
from cargohold.images.image import ResolvedManifest
from cargohold.metadata.gc import UNPACK_KEY_PREFIX
from cargohold.metadata.labels import LABEL_GC_REF_SNAPSHOT, LABEL_LAZY, SNAPSHOT_REF, UNCOMPRESSED
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.snapshots.base import Kind, Snapshotter
from cargohold.snapshots.mount import mount_all, unmount
from cargohold.unpack.labels import inherited_labels

log = logging.getLogger(__name__)

class LayerTap(Protocol):
    """Follows a blob while it is downloaded (``remotes.fetch.BlobTap``)."""

    def opened(self, reader: Callable[[], int]) -> None: ...

    def committed(self, size: int) -> None: ...

    def failed(self, error: BaseException) -> None: ...


class FetchFn(Protocol):
    """Ensure a blob is in the content store; True when it had to be fetched. ``tap`` follows the download
    while its bytes are written (it hears nothing when the blob was present)."""

    def __call__(self, desc: Descriptor, /, *, tap: LayerTap | None = None) -> bool: ...
# Extra labels for layer i's snapshot (e.g. the CRI target labels).
LayerLabelsFn = Callable[[int], Mapping[str, str]]


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerOutcome:
    index: int
    chain_id: Digest
    digest: Digest
    status: str  # unpacked, exists, remote
    fetched: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpackResult:
    chain_id: Digest
    snapshotter: str
    layers: tuple[LayerOutcome, ...]

    @property
    def unpacked(self) -> int:
        return sum(1 for layer in self.layers if layer.status == "unpacked")

    @property
    def fetched(self) -> tuple[Digest, ...]:
        return tuple(layer.digest for layer in self.layers if layer.fetched)


class _Aborted(Exception):
    """Another layer failed; this one stops waiting."""


class _ParentVanished(Exception):
    """A parent snapshot found committed was gone when the layer was prepared on it."""

    def __init__(self, error: NotFoundError) -> None:
        super().__init__(str(error))
        self.error = error


ATTEMPTS = 3
"""Unpacks of one manifest when parents vanish under it."""


class _Stream:
    """One layer's download, followed by its apply: the bytes are written (and hashed) once by the content
    writer, and the apply reads them from the ingest file as they land — from the page cache, not the disk.

    The download runs on its own pool, so it never waits for an apply (nor for the parent layers' applies):
    the ingest file is the buffer, memory stays flat whatever the layer size. Each apply attempt gets its own
    fd (a fresh open of the same file) and ``Feed``; the blob's digest is verified by the writer at commit,
    before the layer's snapshot may be committed.
    """

    def __init__(self, fetch: FetchFn, layer: Descriptor, executor: Executor) -> None:
        self._lock = threading.Lock()
        self._master: int | None = None  # an fd on the ingest data, from when the ingest opens
        self._size: int | None = None
        self._error: BaseException | None = None
        self._feeds: list[Feed] = []
        self._opened = threading.Event()
        self.future: Future[bool] = executor.submit(fetch, layer, tap=self)

    # -- LayerTap (download thread) --------------------------------------------------------------------------

    def opened(self, reader: Callable[[], int]) -> None:
        fd = reader()
        with self._lock:
            self._master = fd
        self._opened.set()

    def committed(self, size: int) -> None:
        with self._lock:
            self._size = size
            feeds = list(self._feeds)
        for feed in feeds:
            feed.end(size)

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
            feeds = list(self._feeds)
        for feed in feeds:
            feed.fail(f"download failed: {error}")

    # -- the layer task ---------------------------------------------------------------------------------------

    def source(self) -> tuple[int, Feed | None] | None:
        """An fd on the blob's bytes and the feed that tells when they are complete; None when this download
        wrote nothing (the blob was in the store already: read it there). Raises the download's error."""
        while not self._opened.wait(0.05):
            if self.future.done():
                break
        with self._lock:
            if self._master is None:
                self.future.result()  # raises when the download failed before its ingest opened
                return None
            fd = os.open(f"/proc/self/fd/{self._master}", os.O_RDONLY | os.O_CLOEXEC)
            if self._size is not None:
                return fd, None
            if self._error is not None:
                os.close(fd)
                self.future.result()
                raise self._error
            feed = Feed()
            self._feeds.append(feed)
            return fd, feed

    def result(self) -> bool:
        """Wait for the download; True when it fetched the blob. Raises its error (DigestMismatchError...)."""
        return self.future.result()

    def close(self) -> None:
        """Wait for the download (the caller's lease must outlive it) and drop the fd."""
        if not self.future.cancel():
            self.future.exception()
        with self._lock:
            fd, self._master = self._master, None
        if fd is not None:
            os.close(fd)


class Unpacker:
    """Unpacks manifests into one snapshotter, fetching layer blobs through ``fetch`` when they are missing.

    Without ``fetch`` (an offline unpack of an imported image) a missing blob is an error naming it.
    """

    def __init__(
        self,
        *,
        content: ContentStore,
        snapshotter: Snapshotter,
        locks_dir: Path,
        fetch: FetchFn | None = None,
        concurrency: int = 3,
        on_event: EventSink | None = None,
        hold: Callable[[str], None] | None = None,
        executor: Executor | None = None,
        max_layer_size: int | None = None,
        max_unpacked_size: int | None = None,
        applier: ApplyPool | None = None,
        download_executor: Executor | None = None,
    ) -> None:
        self.content = content
        # Where layers are applied: worker processes (the process-wide pool unless given), so overlapping
        # applies use every core instead of sharing one interpreter lock.
        self.applier = applier if applier is not None else shared_pool()
        # Where layer downloads run: never the layer tasks' pool, so a download never waits for an apply.
        self.download_executor = download_executor
        # Node limits (None: none): a layer blob larger than max_layer_size is refused before it is fetched;
        # one inflating past max_unpacked_size is stopped mid-apply and its snapshot discarded.
        self.max_layer_size = max_layer_size
        self.max_unpacked_size = max_unpacked_size
        # The owner's pool for layer tasks; without one each unpack makes (and shuts down) its own.
        self.executor = executor
        # Called with each snapshot name this unpack relies on (e.g. to add it to a GC lease) before use.
        self.hold = hold
        self.snapshotter = snapshotter
        self.locks_dir = locks_dir
        self.fetch = fetch
        self.concurrency = max(1, concurrency)
        self.on_event = on_event or discard
        self.remote = bool(getattr(snapshotter, "remote", False))
        self.rebase = "rebase" in getattr(snapshotter, "capabilities", frozenset())
        self.locks_dir.mkdir(parents=True, exist_ok=True)

    def unpack(self, resolved: ResolvedManifest, *, layer_labels: LayerLabelsFn | None = None) -> UnpackResult:
        for attempt in range(ATTEMPTS):
            try:
                return self._unpack(resolved, layer_labels)
            except _ParentVanished as exc:
                if attempt == ATTEMPTS - 1:
                    raise exc.error from None
                log.info("unpack of %s: %s; starting over", resolved.descriptor.digest, exc)
        raise AssertionError("unreachable")

    def _unpack(self, resolved: ResolvedManifest, layer_labels: LayerLabelsFn | None) -> UnpackResult:
        layers = resolved.manifest.layers
        chains = resolved.chain_ids
        if not layers:
            raise FailedPreconditionError(f"manifest {resolved.descriptor.digest}: no layers to unpack")
        committed = [threading.Event() for _ in layers]
        failed = threading.Event()
        outcomes: list[LayerOutcome | None] = [None] * len(layers)

        def run(i: int) -> None:
            try:
                outcomes[i] = self._layer(resolved, i, chains, committed, failed,
                                          dict(layer_labels(i)) if layer_labels else {}, streams.get(i))
                committed[i].set()
            except OSError as exc:
                failed.set()
                if is_no_space(exc):  # prepare, apply or commit: the snapshot was discarded on the way out
                    where = exc.filename or f"snapshotter {self.snapshotter.name}"
                    raise no_space(exc, f"unpacking layer {layers[i].digest}", where) from exc
                raise
            except BaseException:
                failed.set()
                raise

        # Tasks start in layer order and only wait on earlier layers, so the earliest unfinished layer always
        # has a worker: no deadlock whatever the pool size.
        # On a shared FIFO pool the same holds: a task waits only on tasks submitted before it.
        streams: dict[int, _Stream] = {}
        with contextlib.ExitStack() as stack:
            pool = self.executor if self.executor is not None else stack.enter_context(
                ThreadPoolExecutor(max_workers=min(self.concurrency, len(layers)), thread_name_prefix="unpack"))
            stack.callback(_close_all, streams)
            self._start_downloads(layers, chains, streams, stack)
            futures = [pool.submit(run, i) for i in range(len(layers))]
            errors = []
            for fut in futures:
                exc = fut.exception()
                if exc is not None and not isinstance(exc, _Aborted):
                    errors.append(exc)
        if errors:
            raise errors[0]
        top = chains[-1]
        self._label_config(resolved, top)
        done = tuple(o for o in outcomes if o is not None)
        return UnpackResult(chain_id=top, snapshotter=self.snapshotter.name, layers=done)

    def _start_downloads(self, layers: Sequence[Descriptor], chains: list[Digest], streams: dict[int, _Stream],
                         stack: contextlib.ExitStack) -> None:
        """Start downloading, in layer order, every layer that will be applied; the layer tasks follow them.

        Only with a fetch function and a local snapshotter (a remote one is asked first whether it provides
        the layer lazily). A layer over max_layer_size is left to its task, which refuses it."""
        if self.fetch is None or self.remote:
            return
        todo = [i for i, layer in enumerate(layers)
                if not (self.max_layer_size is not None and layer.size > self.max_layer_size)
                and not self._snapshot_exists(str(chains[i]))]
        if not todo:
            return
        pool = self.download_executor if self.download_executor is not None else stack.enter_context(
            ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)), thread_name_prefix="download"))
        for i in todo:
            streams[i] = _Stream(self.fetch, layers[i], pool)

    # -- one layer -------------------------------------------------------------------------------------------

    def _layer(self, resolved: ResolvedManifest, i: int, chains: list[Digest], committed: list[threading.Event],
               failed: threading.Event, extra_labels: dict[str, str], stream: _Stream | None) -> LayerOutcome:
        layer = resolved.manifest.layers[i]
        chain = chains[i]
        parent = str(chains[i - 1]) if i else ""
        item = str(layer.digest)
        if self.hold is not None:
            self.hold(str(chain))
        if self.max_layer_size is not None and layer.size > self.max_layer_size:
            raise LimitExceededError(
                f"layer {layer.digest}: {layer.size} bytes is more than max_layer_size ({self.max_layer_size} "
                "bytes); not fetched")
        if self._snapshot_exists(str(chain)):
            fetched = self._ensure_content(layer)
            self.on_event(Event(action="apply", status="exists", item=item, media_type=layer.media_type,
                                message=f"snapshot {chain.short} exists"))
            return LayerOutcome(index=i, chain_id=chain, digest=layer.digest, status="exists", fetched=fetched)
        with self._chain_lock(chain):
            if self._snapshot_exists(str(chain)):  # another unpack made it meanwhile
                fetched = stream.result() if stream is not None else self._ensure_content(layer)
                return LayerOutcome(index=i, chain_id=chain, digest=layer.digest, status="exists",
                                    fetched=fetched)
            labels = {SNAPSHOT_REF: str(chain), **inherited_labels(layer.annotations), **extra_labels}
            key = f"{UNPACK_KEY_PREFIX}{time.time_ns()}-{os.getpid()}-{chain.hex[:12]}"
            if self.hold is not None:
                self.hold(key)  # gc removes it once this process (and its lease) is gone
            if self.remote:
                _wait(committed, i - 1, failed)
                try:
                    mounts = self._prepare(key, parent, labels)
                except AlreadyExistsError:
                    # The remote snapshotter provides this layer lazily: nothing to fetch or apply.
                    self.on_event(Event(action="apply", status="skipped", item=item, media_type=layer.media_type,
                                        message="remote snapshotter has it"))
                    return LayerOutcome(index=i, chain_id=chain, digest=layer.digest, status="remote",
                                        fetched=False)
                try:
                    fetched = self._ensure_content(layer, force=True)
                    self._apply_mounted(mounts, layer, resolved.diff_ids[i])
                    self._commit(str(chain), key, labels)
                except BaseException:
                    self._discard(key)
                    raise
                return LayerOutcome(index=i, chain_id=chain, digest=layer.digest, status="unpacked",
                                    fetched=fetched)

            diff_id = resolved.diff_ids[i]
            fetched = self._ensure_content(layer) if stream is None else False
            if self.rebase and parent and self._apply_alone(key, parent, layer, diff_id, labels,
                                                            lambda: _wait(committed, i - 1, failed), stream):
                self._commit(str(chain), key, labels, parent=parent)
            else:
                try:
                    _wait(committed, i - 1, failed)
                    mounts = self._prepare(key, parent, labels)
                    self._apply_mounted(mounts, layer, diff_id, stream)
                    self._commit(str(chain), key, labels)
                except BaseException:
                    self._discard(key)
                    raise
            if stream is not None:
                fetched = stream.result()
        return LayerOutcome(index=i, chain_id=chain, digest=layer.digest, status="unpacked", fetched=fetched)

    def _apply_alone(self, key: str, parent: str, layer: Descriptor, diff_id: Digest, labels: dict[str, str],
                     wait_parent: Callable[[], None], stream: _Stream | None) -> bool:
        """Apply a layer into an empty upper dir while its parents are still being applied (rebase at commit).

        Returns False, having discarded the attempt, when the layer needs its parents to apply right (an
        entry under a directory it does not create, a hardlink into a parent layer): the caller then applies
        it onto its mounted parents, as containerd always does. On success the parent has been waited for.
        """
        try:
            with stages.timed("prepare"):
                self.snapshotter.prepare(key, "", labels)
            upper = self.snapshotter.upper_dir(key)  # type: ignore[attr-defined]
            self._apply_into(upper, layer, diff_id, overlay=True, isolated=True, stream=stream)
            wait_parent()
        except NeedsParentsError as exc:
            log.debug("layer %s applies onto its parents: %s", layer.digest, exc)
            self._discard(key)
            return False
        except BaseException:
            self._discard(key)
            raise
        return True

    def _prepare(self, key: str, parent: str, labels: dict[str, str]) -> list:  # type: ignore[type-arg]
        try:
            with stages.timed("prepare"):
                return self.snapshotter.prepare(key, parent, labels)
        except NotFoundError as exc:
            if parent and not self._snapshot_exists(parent):
                raise _ParentVanished(exc) from exc
            raise

    def _snapshot_exists(self, name: str) -> bool:
        try:
            info = self.snapshotter.stat(name)
        except NotFoundError:
            return False
        return info.kind == Kind.COMMITTED

    def _ensure_content(self, layer: Descriptor, *, force: bool = False) -> bool:
        """Make sure the compressed blob is stored. Remote snapshotters are not force-fed unless ``force``."""
        if self.remote and not force:
            return False
        if self.fetch is not None:
            return self.fetch(layer)  # present blobs are not fetched again, only labelled with their source
        if self.content.exists(layer.digest):
            return False
        if self.fetch is None:
            raise FailedPreconditionError(
                f"layer {layer.digest} ({layer.media_type}): blob not in the content store and no registry "
                "to fetch it from"
            )
        return self.fetch(layer)

    def _apply_into(self, root: Path, layer: Descriptor, diff_id: Digest, *, overlay: bool,
                    isolated: bool = False, stream: _Stream | None = None) -> None:
        """Apply ``layer`` under ``root`` from its download as it arrives (``stream``) or from the store.

        Returns once the layer is applied, its diffID verified and — when streamed — its blob committed with
        the right digest: only then may the snapshot be committed."""
        item = str(layer.digest)
        self.on_event(Event(action="apply", status="running", item=item, media_type=layer.media_type,
                            total=layer.size))

        def progress(compressed: int, _uncompressed: int) -> None:
            # The uncompressed size is unknown until the end: the compressed bytes read against the blob's
            # size tell how far the layer got. Also where a cancelled unpack stops mid-layer (the sink raises
            # CancelledError).
            self.on_event(Event(action="apply", status="running", item=item, media_type=layer.media_type,
                                current=min(compressed, layer.size), total=layer.size))

        source = stream.source() if stream is not None else None
        if source is None:  # in the store already (verified when it was committed: not hashed again)
            fd, feed = self._blob_fd(layer), None
        else:
            fd, feed = source
        request = ApplyRequest(root=str(root), overlay=overlay, isolated=isolated, expected_diff_id=diff_id,
                               max_unpacked_size=self.max_unpacked_size, layer=layer.digest)
        try:
            applied = self.applier.apply(request, fd, feed=feed, on_progress=progress)
        except NeedsParentsError:
            raise  # applied again onto the parents, from the same download
        except (FeedFailedError, CargoholdError, OSError) as exc:
            if stream is not None and not (isinstance(exc, NoSpaceError) or is_no_space(exc)):
                # A blob that is not what its digest says (a corrupt gzip, a wrong diffID) or a failed
                # download: the download's own error names the cause.
                try:
                    stream.result()
                except Exception as download_error:
                    raise download_error from exc
            raise
        for stage, seconds in applied.stages.items():
            stages.record(stage, seconds, nbytes=applied.size_uncompressed if stage == "extract" else 0)
        if stream is not None:
            stream.result()  # the blob's digest is verified (and the blob committed) before the snapshot
        self.content.update(layer.digest, {UNCOMPRESSED: str(diff_id)})
        self.on_event(Event(action="apply", status="done", item=item, media_type=layer.media_type,
                            current=layer.size, total=layer.size))

    def _blob_fd(self, layer: Descriptor) -> int:
        with self.content.open(layer.digest) as f:
            return os.dup(f.fileno())

    def _apply_mounted(self, mounts: list, layer: Descriptor, diff_id: Digest,  # type: ignore[type-arg]
                       stream: _Stream | None = None) -> None:
        if len(mounts) == 1 and mounts[0].type == "bind":
            # A bind mount of one directory: apply straight into it, no mount needed.
            self._apply_into(Path(mounts[0].source), layer, diff_id, overlay=False, stream=stream)
            return
        with tempfile.TemporaryDirectory(prefix="cargohold-apply-") as tmp:
            target = Path(tmp)
            mount_all(mounts, target)
            try:
                self._apply_into(target, layer, diff_id, overlay=False, stream=stream)
            finally:
                unmount(target)

    def _commit(self, name: str, key: str, labels: dict[str, str], *, parent: str | None = None) -> None:
        """Commit ``key`` as ``name`` (onto ``parent`` when rebasing); on failure the active key is removed."""
        try:
            with stages.timed("commit"):
                if parent is None:
                    self.snapshotter.commit(name, key, labels)
                else:
                    self.snapshotter.commit(name, key, labels, parent=parent)  # type: ignore[call-arg]
        except AlreadyExistsError:
            # Someone committed the same chainID meanwhile (outside our lock, e.g. another tool): reuse theirs.
            self._discard(key)
        except NotFoundError as exc:
            self._discard(key)
            if parent and not self._snapshot_exists(parent):
                raise _ParentVanished(exc) from exc
            raise
        except OSError as exc:
            self._discard(key)
            if is_no_space(exc):
                raise no_space(exc, f"committing snapshot {name}", self.snapshotter.name) from exc
            raise
        except BaseException:
            self._discard(key)
            raise

    def _discard(self, key: str) -> None:
        with contextlib.suppress(CargoholdError, OSError):
            self.snapshotter.remove(key)

    @contextlib.contextmanager
    def _chain_lock(self, chain: Digest) -> Iterator[None]:
        path = self.locks_dir / f"{self.snapshotter.name}-{chain.hex}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # gc removed this (then unlocked) file after we opened it: lock the one the path names now.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _label_config(self, resolved: ResolvedManifest, top: Digest) -> None:
        config = resolved.manifest.config.digest
        labels: dict[str, str | None] = {f"{LABEL_GC_REF_SNAPSHOT}.{self.snapshotter.name}": str(top)}
        # Lazy: a remote snapshotter holds layers whose blobs are not here; whoever needs those blobs later
        # (export, push, copy) fetches them from the image's source rather than failing. Once every blob is
        # here (a later unpack fetched them) the image is no longer lazy.
        if self.remote:
            lazy = any(not self.content.exists(layer.digest) for layer in resolved.manifest.layers)
            labels[f"{LABEL_LAZY}.{self.snapshotter.name}"] = "true" if lazy else None
        with contextlib.suppress(NotFoundError):
            self.content.update(config, labels)


def remove_stale_locks(locks_dir: Path) -> list[str]:
    """Delete the chain lock files nobody holds (left by unpacks that ended or died); returns their names.

    Each is unlinked while we hold its flock, and lockers check after locking that the path still names
    the file they locked, so a locker never works under a lock file that is gone."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(locks_dir))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.endswith(".lock"):
            continue
        try:
            fd = os.open(entry.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # an unpack is working on this chain
            with contextlib.suppress(FileNotFoundError):
                if os.stat(entry.path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(entry.path)
                    removed.append(entry.name)
        finally:
            os.close(fd)
    return sorted(removed)


def _close_all(streams: dict[int, _Stream]) -> None:
    for stream in streams.values():
        stream.close()


def _wait(committed: list[threading.Event], index: int, failed: threading.Event) -> None:
    if index < 0:
        return
    while not committed[index].wait(0.05):
        if failed.is_set():
            raise _Aborted()
