"""Layer applies in worker processes, following blob files while they are written.

Applying a layer is mostly per-entry Python work (tar headers, path checks, system calls); two applies in
one process share one GIL. An ``ApplyPool`` runs each apply in a worker process (``python -m
cargohold.diff.worker``, started with ``subprocess``: no fork of a threaded parent, no multiprocessing
resource tracker) so overlapping applies use every core. The blob's fd is passed over a Unix socket
(``SCM_RIGHTS``): the file may be renamed (committed) meanwhile, the fd keeps reading it.

With a ``Feed`` the blob file is still being written (a download streaming into the content store's ingest
file): the apply reads up to the file's current end and waits there (polls from 2 ms backing off to 32
ms, woken at once by ``Feed.end``/``Feed.fail``), so one pass both stores and applies a layer and the writer
hashes the compressed bytes once; the apply hashes them again only when an ``expected_digest`` is given.

Messages are pickles, each prefixed with its length (only our own processes are on either side).
Worker -> parent: ``progress``, ``log`` (records re-emitted by the parent's ``logging``), ``result`` or
``error`` (rebuilt as the same ``cargohold.errors`` kind or OSError). Parent -> worker: ``apply`` (with the
fd), ``end``/``fail`` of the apply's feed. A worker exits when its socket reaches EOF and is SIGKILLed by the
kernel when the thread that started it ends (PR_SET_PDEATHSIG): the pool starts workers from one thread
of its own that lives as long as the pool, since a short-lived calling thread would take them with it.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from cargohold import errors
from cargohold.diff.apply import ApplyResult, ProgressFn, apply_layer
from cargohold.errors import CargoholdError, FeedFailedError, InvalidArgumentError, UnavailableError
from cargohold.oci.digest import Digest

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# Seconds between looks at the end of a growing file: 2 ms while bytes flow, doubling to 32 ms while the writer
# stalls (a 2 ms poll costs ~10% of a core; a flowing download is met again within a poll or two). The feed's
# end or failure wakes the reader at once.
_POLL = 0.002
_POLL_MAX = 0.032
_QUIET_TICK = 0.2  # on_progress is called at least this often (a cancellation check) while the worker is silent
_HEADER = struct.Struct("!I")
_MAX_TEXT = 16 << 10  # log and error text sent over the socket is cut to this many characters
_PR_SET_PDEATHSIG = 1


class Feed:
    """The writer's side of a blob file an apply follows while it is written. Thread-safe; never blocks.

    ``end(size)``: the file is complete and verified, exactly ``size`` bytes. ``fail(reason)``: it will not be
    completed as is; the apply raises FeedFailedError naming ``reason``. The first call wins. The file must only
    grow by appends: a writer that truncates or rewrites what it wrote (a restarted download) fails the feed
    and starts a new apply. Several applies may follow one feed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._size: int | None = None
        self._reason: str | None = None
        self._watches: list[Callable[[], None]] = []

    def end(self, size: int) -> None:
        self._settle(size, None)

    def fail(self, reason: str) -> None:
        self._settle(None, reason)

    def _settle(self, size: int | None, reason: str | None) -> None:
        with self._cond:
            if self._size is None and self._reason is None:
                self._size, self._reason = size, reason
            self._cond.notify_all()
            watches = list(self._watches)
        for watch in watches:
            watch()

    def state(self) -> tuple[int | None, str | None]:
        """(size given to ``end``, reason given to ``fail``); both None while the file is being written."""
        with self._cond:
            return self._size, self._reason

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds, returning early when the feed ends or fails."""
        with self._cond:
            if self._size is None and self._reason is None:
                self._cond.wait(timeout)

    def _watch(self, watch: Callable[[], None]) -> None:
        """Call ``watch`` (outside the lock) when the feed settles, and now if it has. It may run twice."""
        with self._cond:
            self._watches.append(watch)
            settled = self._size is not None or self._reason is not None
        if settled:
            watch()

    def _unwatch(self, watch: Callable[[], None]) -> None:
        with self._cond:
            self._watches.remove(watch)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyRequest:
    """One layer apply: where and how, as ``diff.apply.apply_layer`` takes it."""

    root: str
    overlay: bool
    isolated: bool = False
    expected_diff_id: Digest | None = None
    expected_digest: Digest | None = None  # the compressed bytes are hashed again only when given
    max_unpacked_size: int | None = None
    write_threads: int | None = None
    layer: Digest | None = None  # names the blob in messages (it is not hashed unless expected_digest)


class _FollowReader:
    """Reads a blob from ``fd`` at its own offset (pread): to EOF without a feed; with one, up to the size its
    ``end`` gives, waiting at the file's current end until more bytes arrive."""

    def __init__(self, fd: int, feed: Feed | None, what: str) -> None:
        self._fd = fd
        self._feed = feed
        self._what = what
        self._pos = 0
        self._poll = _POLL

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            size = _CHUNK
        feed = self._feed
        while True:
            want = size
            end: int | None = None
            if feed is not None:
                end, reason = feed.state()
                if reason is not None:
                    raise FeedFailedError(f"{self._what}: the blob being written will not be completed: {reason}")
                if end is not None:
                    want = min(size, end - self._pos)
                    if want <= 0:
                        return b""
            data = os.pread(self._fd, want, self._pos)
            if data:
                self._pos += len(data)
                self._poll = _POLL
                return data
            if feed is None:
                return b""
            if end is not None:  # ended before this read, and still short: the file lost bytes
                raise InvalidArgumentError(
                    f"{self._what}: blob file ends at {self._pos} bytes, its writer announced {end}")
            feed.wait(self._poll)
            self._poll = min(self._poll * 2, _POLL_MAX)


def _apply_here(request: ApplyRequest, fd: int, feed: Feed | None, on_progress: ProgressFn | None) -> ApplyResult:
    return apply_layer(
        request.root, _FollowReader(fd, feed, f"layer apply into {request.root}"),
        expected_digest=request.expected_digest, expected_diff_id=request.expected_diff_id,
        overlay=request.overlay, on_progress=on_progress, write_threads=request.write_threads,
        isolated=request.isolated, max_unpacked_size=request.max_unpacked_size, layer=request.layer)


# ---------------------------------------------------------------------------------------------- messages


class _Closed(Exception):
    """The other side closed the socket."""


def _send(sock: socket.socket, lock: threading.Lock, msg: object, fds: tuple[int, ...] = ()) -> None:
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    data = _HEADER.pack(len(payload)) + payload
    with lock:
        if fds:  # the fds ride on the header's first bytes; the receiver reads each header with recvmsg
            sent = socket.send_fds(sock, [data], list(fds))
            if sent < len(data):
                sock.sendall(data[sent:])
        else:
            sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise _Closed
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    """One message and the fds that came with it."""
    head = b""
    fds: list[int] = []
    while len(head) < _HEADER.size:
        data, more, _flags, _addr = socket.recv_fds(sock, _HEADER.size - len(head), 4)
        if not data:
            for fd in more:
                os.close(fd)
            raise _Closed
        head += data
        fds += more
    (length,) = _HEADER.unpack(head)
    return pickle.loads(_recv_exact(sock, length)), fds


def _encode_error(exc: BaseException) -> tuple[Any, ...]:
    notes = [str(n)[:_MAX_TEXT] for n in getattr(exc, "__notes__", ())]
    kind = type(exc)
    if isinstance(exc, CargoholdError) and getattr(errors, kind.__name__, None) is kind:
        state = {k: v for k, v in vars(exc).items() if k != "__notes__"}
        return ("kind", kind.__name__, exc.args, state, notes)
    if isinstance(exc, OSError):
        return ("os", exc.errno, exc.strerror, exc.filename, exc.filename2, exc.args, notes)
    return ("other", f"{kind.__module__}.{kind.__qualname__}", str(exc)[:_MAX_TEXT], notes)


def _decode_error(enc: tuple[Any, ...], where: str) -> BaseException:
    exc: BaseException
    if enc[0] == "kind":
        _tag, name, args, state, notes = enc
        cls = getattr(errors, name)
        exc = cls.__new__(cls)  # not __init__: some kinds build their message from other arguments
        exc.args = args
        vars(exc).update(state)
    elif enc[0] == "os":
        _tag, errno_, strerror, filename, filename2, args, notes = enc
        # OSError(errno, ...) picks the subclass (FileNotFoundError, ...) as the original had it.
        exc = OSError(errno_, strerror, filename, None, filename2) if errno_ is not None else OSError(*args)
    else:
        _tag, typename, text, notes = enc
        exc = CargoholdError(f"{where}: {typename}: {text}")
    for note in notes:
        exc.add_note(note)
    return exc


# ---------------------------------------------------------------------------------------------- worker side


class _Forward(logging.Handler):
    """Sends the worker's log records to the parent, which re-emits them."""

    def __init__(self, sock: socket.socket, lock: threading.Lock) -> None:
        super().__init__()
        self._sock = sock
        self._lock = lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _send(self._sock, self._lock, ("log", record.name, record.levelno, record.getMessage()[:_MAX_TEXT]))
        except Exception:  # the parent is gone or the text is unprintable: nothing to tell
            pass


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when our parent (thread) ends: a killed cargohold leaves no worker writing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # only in the worker: the parent never pays for it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _worker_main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the group; the parent decides
    sock_fd, parent = int(argv[1]), int(argv[2])
    _die_with_parent()
    if os.getppid() != parent:  # our parent died while we started, before prctl: we were reparented
        os._exit(0)
    sock = socket.socket(fileno=sock_fd)
    lock = threading.Lock()
    root_logger = logging.getLogger()
    root_logger.handlers[:] = [_Forward(sock, lock)]
    jobs: queue.Queue[tuple[int, ApplyRequest, bool, int]] = queue.Queue()
    feeds: dict[int, Feed] = {}

    def listen() -> None:
        # Runs for the worker's life: feed news must arrive while the main thread applies.
        try:
            while True:
                msg, fds = _recv(sock)
                op = msg[0]
                if op == "apply":
                    _op, seq, request, following, level = msg
                    feeds.clear()
                    if following:
                        feeds[seq] = Feed()
                    root_logger.setLevel(level)
                    jobs.put((seq, request, following, fds[0]))
                    for fd in fds[1:]:
                        os.close(fd)
                    continue
                for fd in fds:
                    os.close(fd)
                feed = feeds.get(msg[1])  # news of an earlier apply's feed is dropped
                if feed is not None:
                    if op == "end":
                        feed.end(msg[2])
                    elif op == "fail":
                        feed.fail(msg[2])
        except BaseException:  # noqa: BLE001 - EOF (the parent closed us or died) or garbage: stop at once
            pass
        os._exit(0)

    threading.Thread(target=listen, name="worker-listen", daemon=True).start()
    while True:
        seq, request, following, fd = jobs.get()
        feed = feeds.get(seq) if following else None

        def progress(c: int, u: int) -> None:
            _send(sock, lock, ("progress", c, u))

        try:
            try:
                result = _apply_here(request, fd, feed, progress)
            finally:
                os.close(fd)
            reply: tuple[Any, ...] = ("result", result)
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent
            reply = ("error", _encode_error(exc))
        try:
            _send(sock, lock, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            enc = reply[1] if reply[0] == "error" else ()
            text = str(enc[2] if enc and enc[0] == "kind" and enc[2] else exc)
            _send(sock, lock, ("error", ("other", str(enc[1]) if enc else "result", text[:_MAX_TEXT], [])))
        feeds.pop(seq, None)


# ---------------------------------------------------------------------------------------------- parent side


class _Worker:
    __slots__ = ("proc", "sock", "lock", "pid")

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.lock = threading.Lock()
        self.pid = proc.pid

    def send(self, msg: object, fds: tuple[int, ...] = ()) -> None:
        _send(self.sock, self.lock, msg, fds)

    def recv(self, timeout: float) -> Any:
        """The next message, or None when none arrived within ``timeout`` seconds."""
        # poll, not select: a long-running server's fds may be numbered past FD_SETSIZE.
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return None
        msg, fds = _recv(self.sock)
        for fd in fds:
            os.close(fd)
        return msg

    def kill(self) -> int:
        """SIGKILL, reap, close; the exit status."""
        try:
            self.proc.kill()
        except OSError:
            pass
        status = self.proc.wait()
        self.sock.close()
        return status

    def stop(self) -> None:
        """Let it exit on EOF; kill it if it does not promptly."""
        self.sock.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _spawn_loop(spawns: queue.SimpleQueue[Future[_Worker] | None]) -> None:
    """A pool's spawner thread. Every worker is started from it: PR_SET_PDEATHSIG fires when the *thread*
    that started a child ends, so a caller's short-lived thread must not be the one. It holds no reference
    to the pool: a pool dropped without close() is collected, and its finalizer ends this thread."""
    while True:
        fut = spawns.get()
        if fut is None:
            return
        try:
            fut.set_result(_start_process())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            fut.set_exception(exc)


def _start_process() -> _Worker:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ)
        # The worker imports the same cargohold as we do, also when we found it through a sys.path entry
        # added at run time (a source checkout); an installed one (site-packages) it finds by itself, and
        # putting site-packages ahead of the standard library would be wrong.
        top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if not os.path.basename(top).endswith("-packages"):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cargohold.diff.worker", str(theirs.fileno()), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), env=env)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return _Worker(proc, ours)


_POOLS: weakref.WeakSet[ApplyPool] = weakref.WeakSet()


@atexit.register
def close_pools() -> None:
    """Stop every pool's workers and wait for them (at exit; also called by the CLI, which ends the process
    itself before the interpreter's own exit handlers would)."""
    for pool in list(_POOLS):
        pool.close()


class ApplyPool:
    """Worker processes applying layers; ``apply`` may be called from several threads at once."""

    def __init__(self, processes: int | None = None) -> None:
        """processes None: os.cpu_count() (at least 2); 0: apply on the calling thread, no processes (tests,
        fallback). Worker processes start lazily (or by prestart()) and are reused for later applies."""
        if processes is not None and processes < 0:
            raise InvalidArgumentError(f"apply pool: processes must be >= 0, not {processes}")
        self.processes = max(2, os.cpu_count() or 2) if processes is None else processes
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._live = 0  # started or starting
        self._closed = False
        self._seq = 0
        self._spawns: queue.SimpleQueue[Future[_Worker] | None] | None = None
        self._spawner: threading.Thread | None = None
        _POOLS.add(self)

    # --- processes

    def _start(self) -> Future[_Worker]:
        fut: Future[_Worker] = Future()
        with self._cond:
            if self._spawns is None:
                self._spawns = queue.SimpleQueue()
                self._spawner = threading.Thread(target=_spawn_loop, args=(self._spawns,),
                                                 name="apply-pool-spawner", daemon=True)
                self._spawner.start()
                weakref.finalize(self, self._spawns.put, None)
            self._spawns.put(fut)
        return fut

    def _started(self, fut: Future[_Worker], *, idle: bool) -> _Worker | None:
        """Account for a finished start: add the worker (to the idle list when ``idle``) or forget the slot."""
        exc = fut.exception()
        with self._cond:
            if exc is not None:
                self._live -= 1
                self._cond.notify_all()
                return None
            worker = fut.result()
            if self._closed:
                self._live -= 1
            else:
                self._all.add(worker)
                if idle:
                    self._idle.append(worker)
                self._cond.notify_all()
                return worker
        worker.stop()
        return None

    def prestart(self) -> None:
        """Start the processes now, in the background (no waiting)."""
        with self._cond:
            if self._closed or self.processes == 0:
                return
            n = self.processes - self._live
            self._live += n
        for _ in range(n):
            self._start().add_done_callback(lambda f: self._started(f, idle=True))

    def _acquire(self) -> _Worker:
        while True:
            worker = self._pick()
            if worker.proc.poll() is None:
                return worker
            self._discard(worker)  # died while idle (OOM killer, kill): replaced, not handed an apply to fail

    def _pick(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise UnavailableError("layer apply pool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._live < self.processes:
                    self._live += 1
                    break
                self._cond.wait()
        fut = self._start()
        fut.exception()  # wait
        worker = self._started(fut, idle=False)
        if worker is None:
            exc = fut.exception()
            if exc is not None:
                raise CargoholdError(f"cannot start a layer apply worker ({sys.executable}): {exc}") from exc
            raise UnavailableError("layer apply pool is closed")
        return worker

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if self._closed or worker not in self._all:
                closed = True
            else:
                closed = False
                self._idle.append(worker)
                self._cond.notify_all()
        if closed:
            worker.stop()

    def _discard(self, worker: _Worker) -> int:
        status = worker.kill()
        with self._cond:
            if worker in self._all:
                self._all.discard(worker)
                self._live -= 1
            self._cond.notify_all()
        return status

    # --- applies

    def apply(self, request: ApplyRequest, fd: int, *, feed: Feed | None = None,
              on_progress: ProgressFn | None = None) -> ApplyResult:
        """Apply the blob readable from ``fd`` (ownership passes to the pool: it is closed in any case).

        feed None: ``fd`` holds the whole blob from offset 0; it is read to EOF. With a feed the file grows:
        at its current end the apply waits until more bytes arrive, ``feed.end(size)`` (then it reads exactly
        ``size`` bytes) or ``feed.fail()`` (FeedFailedError). Blocks the calling thread until done.
        ``on_progress(compressed_read, uncompressed_read)`` is called on the calling thread about every MiB
        (and, with workers, every 0.2 s while there is no news, so a cancellation is seen); if it raises, the
        apply stops at once (the worker is killed and later replaced) and that exception propagates.
        Errors from the apply arrive as the same ``cargohold.errors`` kind (or OSError) with the same message.
        """
        request = replace(request, root=os.path.abspath(request.root))  # the worker's cwd may differ
        if self.processes == 0:
            try:
                return _apply_here(request, fd, feed, on_progress)
            finally:
                os.close(fd)
        try:
            worker = self._acquire()
        except BaseException:
            os.close(fd)
            raise
        where = f"layer apply into {request.root}"
        with self._cond:
            self._seq += 1
            seq = self._seq
        settled = False  # the worker answered and stays usable
        watching: Feed | None = None

        def tell() -> None:
            if watching is not None:
                self._tell(worker, seq, watching)

        try:
            try:
                worker.send(("apply", seq, request, feed is not None,
                             logging.getLogger("cargohold").getEffectiveLevel()), (fd,))
            except OSError as exc:
                status = self._discard(worker)
                raise CargoholdError(f"{where}: worker process {worker.pid} died ({_status(status)})") from exc
            finally:
                os.close(fd)
            if feed is not None:
                watching = feed
                feed._watch(tell)
            done = (0, 0)
            while True:
                try:
                    msg = worker.recv(_QUIET_TICK)
                except (_Closed, OSError, ValueError) as exc:  # ValueError: close() took the socket
                    status = self._discard(worker)
                    raise CargoholdError(
                        f"{where}: worker process {worker.pid} died ({_status(status)})") from exc
                if msg is None:
                    if on_progress is not None:
                        on_progress(*done)
                    continue
                op = msg[0]
                if op == "progress":
                    done = (msg[1], msg[2])
                    if on_progress is not None:
                        on_progress(*done)
                elif op == "log":
                    logging.getLogger(msg[1]).log(msg[2], msg[3])  # no args: the text is never %-formatted
                elif op == "result":
                    settled = True
                    result: ApplyResult = msg[1]
                    return result
                elif op == "error":
                    settled = True
                    raise _decode_error(msg[1], where)
        finally:
            if watching is not None:
                watching._unwatch(tell)
            if settled:
                self._release(worker)
            elif worker.proc.returncode is None:
                self._discard(worker)  # interrupted mid-apply: the worker may be writing still

    def _tell(self, worker: _Worker, seq: int, feed: Feed) -> None:
        size, reason = feed.state()
        try:
            if reason is not None:
                worker.send(("fail", seq, reason))
            elif size is not None:
                worker.send(("end", seq, size))
        except OSError:  # the worker died; its apply reports that
            pass

    def close(self) -> None:
        """Stop the processes (idempotent); also done at interpreter exit. Applies running meanwhile fail."""
        with self._cond:
            self._closed = True
            idle = list(self._idle)
            busy = [w for w in self._all if w not in idle]
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._live -= len(workers)
            spawns, self._spawns = self._spawns, None
            spawner, self._spawner = self._spawner, None
            self._cond.notify_all()
        for worker in busy:  # its apply thread sees EOF, reaps it and raises
            try:
                worker.proc.kill()
            except OSError:
                pass
        for worker in idle:
            worker.stop()
        if spawns is not None:
            spawns.put(None)
        if spawner is not None and spawner is not threading.current_thread():
            spawner.join()

    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and diagnostics)."""
        with self._cond:
            return sorted(w.pid for w in self._all)


def _status(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


if __name__ == "__main__":
    # Run as ``python -m``: work with the importable module's classes, so pickled requests match them.
    from cargohold.diff import worker as _module

    _module._worker_main(sys.argv)


_shared: ApplyPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ApplyPool:
    """The process-wide pool (``os.cpu_count()`` workers, started on first use, stopped at exit) that
    unpacks use unless given one: worker processes are a resource of the process, like its threads."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ApplyPool()
        return _shared
