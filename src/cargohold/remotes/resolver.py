"""Resolve image references to descriptors and fetch content, over every host configured for a registry.

>>> resolver = Resolver()
>>> name, desc = resolver.resolve("127.0.0.1:5000/app:v1")  # doctest: +SKIP
>>> with resolver.fetcher(name).fetch(desc) as stream:  # doctest: +SKIP
...     data = b"".join(stream)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from urllib3.exceptions import HTTPError, ReadTimeoutError

from cargohold.errors import (
    CargoholdError,
    DigestMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    SizeMismatchError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from cargohold.events import Event, EventSink, discard
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.reference import Reference
from cargohold.remotes.auth import Authorizer, CredentialStore, pull_scope
from cargohold.remotes.errors import registry_error
from cargohold.remotes.hosts import RegistryHost, registry_hosts
from cargohold.remotes.http import (
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_STALL_TIMEOUT,
    DEFAULT_USER_AGENT,
    Response,
    RetryPolicy,
    Transport,
    discard_response,
    is_retryable_status,
)

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 << 20
CHUNK_SIZE = 1 << 20
_GENERIC_TYPES = frozenset({"", "application/json", "text/plain", "application/octet-stream"})
#: A host that refused connections or answered 5xx is skipped for this long (the rest of an operation; a
#: long-lived process such as the CRI server tries it again afterwards).
DEAD_HOST_SECONDS = 300.0


def _is_manifest_type(media_type: str) -> bool:
    return mt.is_manifest(media_type) or mt.is_index(media_type) or media_type in mt.SCHEMA1_TYPES


def _schema1_error(what: str) -> UnsupportedMediaTypeError:
    return kinds.schema1_error(what)


def _too_large(what: str, size: int, limit: int) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{what}: manifest is {size} bytes, larger than the {limit // (1 << 20)} MiB limit"
    )


class Resolver:
    """Talks to registries for one client: hosts from ``hosts_dir``, credentials, retries, token cache.

    Thread-safe; share one per pull (or per process).
    """

    def __init__(
        self,
        *,
        hosts_dir: Path | None = None,
        credentials: CredentialStore | None = None,
        plain_http: bool = False,
        user_agent: str = DEFAULT_USER_AGENT,
        retries: RetryPolicy | int | None = None,
        on_event: EventSink | None = None,
        transport: Transport | None = None,
        max_manifest_size: int = MAX_MANIFEST_SIZE,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
    ) -> None:
        self.hosts_dir = Path(hosts_dir) if hosts_dir is not None else None
        self.plain_http = plain_http
        self.on_event: EventSink = on_event or discard
        if isinstance(retries, int):
            retries = RetryPolicy(attempts=retries)
        self.transport = transport or Transport(
            user_agent=user_agent, retries=retries, on_event=self.on_event, read_timeout=stall_timeout
        )
        self.authorizer = Authorizer(self.transport, credentials)
        self.max_manifest_size = max_manifest_size
        self.stall_timeout = float(self.transport.timeout.read_timeout or stall_timeout)
        self.fetch_timeout = fetch_timeout
        self._dead: dict[str, float] = {}  # host -> when it was found dead (monotonic)
        self._dead_lock = threading.Lock()

    # -- dead hosts ------------------------------------------------------------------------------------------

    def live_hosts(self, hosts: list[RegistryHost]) -> list[RegistryHost]:
        """``hosts`` without those found dead lately; all of them when every one is dead (try anyway)."""
        now = time.monotonic()
        with self._dead_lock:
            live = [h for h in hosts if now - self._dead.get(h.describe(), -DEAD_HOST_SECONDS) >= DEAD_HOST_SECONDS]
        return live or hosts

    def mark_dead(self, host: RegistryHost, reason: str) -> None:
        """Skip ``host`` for the rest of the operation; said once (a host event), not on every request."""
        key = host.describe()
        now = time.monotonic()
        with self._dead_lock:
            first = now - self._dead.get(key, -DEAD_HOST_SECONDS) >= DEAD_HOST_SECONDS
            self._dead[key] = now
        if first:
            log.info("%s: %s; skipping it for the rest of this operation", key, reason)
            self.emit_host_event("error", host, f"{reason}; skipping it for the rest of this operation")

    def attempts_for(self, hosts: list[RegistryHost], i: int) -> int | None:
        """Tries of the request to ``hosts[i]``: None (the retry policy's) for the last host, else 1."""
        # A host followed by another is tried once: the next host is its retry, not a backoff.
        return 1 if i < len(hosts) - 1 else None

    def hosts(self, namespace: str) -> list[RegistryHost]:
        """The hosts for a registry, mirrors first (re-read each time: edits need no restart)."""
        return registry_hosts(namespace, hosts_dir=self.hosts_dir, plain_http=self.plain_http)

    def request(
        self,
        host: RegistryHost,
        method: str,
        suffix: str,
        *,
        repository: str,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        actions: tuple[str, ...] = ("pull",),
        attempts: int | None = None,
    ) -> Response:
        """One authorized request to ``<host path>/<suffix>``; 401 challenges are answered here."""
        url = host.url(suffix)
        base = dict(headers or {})

        def do(auth: Mapping[str, str]) -> Response:
            return self.transport.request(method, url, host=host, headers={**base, **auth}, stream=stream,
                                          attempts=attempts)

        return self.authorizer.send(host, [pull_scope(repository, *actions)], do, repository=repository)

    def emit_host_event(self, status: str, host: RegistryHost, message: str) -> None:
        self.on_event(Event(action="host", status=status, item=host.describe(), message=message))

    # -- resolve ---------------------------------------------------------------------------------------------

    def resolve(self, ref: Reference | str) -> tuple[str, Descriptor]:
        """The manifest or index descriptor a reference points at, from the first host that knows it.

        Hosts with the ``resolve`` capability are asked in order; the last error is raised when none
        answers (NotFoundError naming the ref and the registry's code, UnauthorizedError, ...).
        """
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        hosts = [h for h in self.hosts(reference.domain) if h.can("resolve")]
        if not hosts:
            raise FailedPreconditionError(
                f"{reference}: no host for {reference.domain} has the resolve capability"
            )
        last: CargoholdError | None = None
        hosts = self.live_hosts(hosts)
        for i, host in enumerate(hosts):
            log.info("resolving %s on %s", reference, host.describe())
            self.emit_host_event("running", host, f"resolve {reference}")
            try:
                desc = self._resolve_on(host, reference, self.attempts_for(hosts, i))
            except UnsupportedMediaTypeError:
                raise
            except CargoholdError as exc:
                log.info("resolving %s on %s failed: %s", reference, host.describe(), exc)
                self.emit_host_event("error", host, str(exc))
                if _host_is_dead(exc) and i < len(hosts) - 1:
                    self.mark_dead(host, str(exc))
                last = exc
                continue
            self.emit_host_event("done", host, f"{reference} -> {desc.digest}")
            return str(reference), desc
        assert last is not None
        raise last

    def _resolve_on(self, host: RegistryHost, ref: Reference, attempts: int | None = None) -> Descriptor:
        what = str(ref)
        suffix = f"{ref.path}/manifests/{ref.object}"
        headers = {"Accept": mt.MANIFEST_ACCEPT}
        resp = self.request(host, "HEAD", suffix, repository=ref.path, headers=headers, attempts=attempts)
        discard_response(resp)
        if resp.status == 200:
            desc = self._from_head(resp, ref, what)
            if desc is not None:
                return desc
        # A refused HEAD (405 and the like), missing headers, or a 404 whose error code only a GET's body
        # carries: ask with GET.
        resp = self.request(host, "GET", suffix, repository=ref.path, headers=headers, stream=True,
                            attempts=attempts)
        try:
            if resp.status != 200:
                raise registry_error(host.host, resp.status, resp.data, what=what, repository=ref.path)
            raw = self._read_capped(resp, what)
        finally:
            discard_response(resp)
        media_type = _media_type(resp.headers.get("Content-Type"))
        media_type = _sniff_media_type(raw, media_type, what)
        algorithm = ref.digest.algorithm if ref.digest is not None else "sha256"
        actual = Digest.from_bytes(raw, algorithm)
        if ref.digest is not None and actual != ref.digest:
            raise DigestMismatchError(ref.digest, actual, what=f"manifest {what} from {host.host}")
        return Descriptor(media_type=media_type, digest=actual, size=len(raw))

    def _from_head(self, resp: Response, ref: Reference, what: str) -> Descriptor | None:
        media_type = _media_type(resp.headers.get("Content-Type"))
        if media_type in mt.SCHEMA1_TYPES:
            raise _schema1_error(what)
        length = resp.headers.get("Content-Length")
        header_digest = resp.headers.get("Docker-Content-Digest")
        if media_type in _GENERIC_TYPES or length is None or not length.isdigit():
            return None
        size = int(length)
        if size > self.max_manifest_size:
            raise _too_large(what, size, self.max_manifest_size)
        if ref.digest is not None:
            return Descriptor(media_type=media_type, digest=ref.digest, size=size)
        if not header_digest:
            return None
        try:
            digest = Digest.parse(header_digest)
        except InvalidArgumentError:
            return None
        return Descriptor(media_type=media_type, digest=digest, size=size)

    def _read_capped(self, resp: Response, what: str) -> bytes:
        limit = self.max_manifest_size
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(what, int(length), limit)
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in _chunks(resp):
                total += len(chunk)
                if total > limit:
                    raise _too_large(what, total, limit)
                chunks.append(chunk)
        except HTTPError as exc:
            raise UnavailableError(f"{what}: connection lost reading the manifest: {exc}") from exc
        return b"".join(chunks)

    # -- fetch -----------------------------------------------------------------------------------------------

    def fetcher(self, ref: Reference | str) -> Fetcher:
        """A fetcher for the blobs and manifests of ``ref``'s repository."""
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        hosts = [h for h in self.hosts(reference.domain) if h.can("pull")]
        if not hosts:
            raise FailedPreconditionError(
                f"{reference}: no host for {reference.domain} has the pull capability"
            )
        return Fetcher(self, reference, hosts)

    def close(self) -> None:
        self.transport.close()


class Fetcher:
    """Fetches content of one repository, trying each pull-capable host in order."""

    def __init__(self, resolver: Resolver, ref: Reference, hosts: list[RegistryHost]) -> None:
        self.resolver = resolver
        self.ref = ref
        self.hosts = hosts
        self.fetch_timeout = resolver.fetch_timeout

    def fetch(self, desc: Descriptor, *, offset: int = 0) -> BlobStream:
        """Open ``desc``'s bytes from ``offset`` on; iterate the result for chunks, then close it.

        Manifests and indexes come from ``/manifests/<digest>``, everything else from ``/blobs/<digest>``.
        ``offset`` > 0 sends ``Range: bytes=offset-``; a server that ignores it is handled by skipping.
        A host that fails (not found, unauthorized, unreachable) makes way for the next; the last error
        is raised.
        """
        what = f"{self.ref.name}@{desc.digest}"
        if offset < 0 or (offset > desc.size and desc.size > 0):
            raise InvalidArgumentError(f"{what}: offset {offset} outside the blob's {desc.size} bytes")
        manifest = _is_manifest_type(desc.media_type)
        if manifest and desc.size > self.resolver.max_manifest_size:
            raise _too_large(what, desc.size, self.resolver.max_manifest_size)
        if desc.media_type in mt.SCHEMA1_TYPES:
            raise _schema1_error(what)
        if not manifest and mt.looks_like_manifest_type(desc.media_type):
            # An unknown manifest type fetched from /blobs/ would only be reported as BLOB_UNKNOWN.
            raise UnsupportedMediaTypeError(f"{what}: unsupported manifest media type {desc.media_type!r}")
        kind = "manifests" if manifest else "blobs"
        headers: dict[str, str] = {}
        if manifest:
            headers["Accept"] = ", ".join(dict.fromkeys([desc.media_type, mt.MANIFEST_ACCEPT]))
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        last: CargoholdError | None = None
        hosts = self.resolver.live_hosts(self.hosts)
        for i, host in enumerate(hosts):
            log.debug("fetching %s from %s (offset %d)", what, host.describe(), offset)
            try:
                resp = self.resolver.request(
                    host,
                    "GET",
                    f"{self.ref.path}/{kind}/{desc.digest}",
                    repository=self.ref.path,
                    headers=headers,
                    stream=True,
                    attempts=self.resolver.attempts_for(hosts, i),
                )
            except CargoholdError as exc:
                last = exc
                self.resolver.emit_host_event("error", host, f"fetch {desc.digest}: {exc}")
                if _host_is_dead(exc) and i < len(hosts) - 1:
                    self.resolver.mark_dead(host, str(exc))
                continue
            if resp.status in (200, 206):
                try:
                    _check_total_size(resp, desc, offset, host)
                    return BlobStream(resp, host=host, what=what, offset=offset, partial=resp.status == 206,
                                      on_event=self.resolver.on_event, stall_timeout=self.resolver.stall_timeout)
                except BaseException:
                    discard_response(resp)
                    raise
            if resp.status == 416 and offset > 0:
                # Range past the end: the blob is shorter than its descriptor says (the partial reached its end).
                # The body is not read: some registries announce the blob's length for this short error.
                discard_response(resp)
                total = _content_range_total(resp.headers.get("Content-Range"))
                raise SizeMismatchError(desc.digest, desc.size, total if total is not None else offset)
            body = resp.data
            discard_response(resp)
            last = registry_error(host.host, resp.status, body, what=what, repository=self.ref.path)
            log.info("fetching %s from %s failed: %s", what, host.describe(), last)
            self.resolver.emit_host_event("error", host, f"fetch {desc.digest}: {last}")
            if is_retryable_status(resp.status) and i < len(hosts) - 1:
                self.resolver.mark_dead(host, str(last))
        assert last is not None
        raise last


class BlobStream:
    """The bytes of one blob from ``offset`` on, as an iterator of chunks. Close it (or use ``with``).

    A connection lost mid-body raises UnavailableError naming the host, digest and position, so the
    caller can reopen at its offset.
    """

    def __init__(self, resp: Response, *, host: RegistryHost, what: str, offset: int, partial: bool,
                 on_event: EventSink | None = None, stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> None:
        self._resp = resp
        self._on_event: EventSink = on_event or discard
        self._stall_timeout = stall_timeout
        self.stalled = False
        self.host = host
        self.what = what
        self.offset = offset
        self.position = offset
        self._skip = 0
        self._done = False
        if offset > 0 and partial:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                raise UnavailableError(
                    f"{host.host}: {what}: asked for bytes from {offset}, got Content-Range "
                    f"{resp.headers.get('Content-Range')!r}"
                )
        elif offset > 0:
            self._skip = offset  # the server ignored Range and sends everything

    def __iter__(self) -> Iterator[bytes]:
        resp = self._resp
        try:
            for chunk in _chunks(resp):
                if self._skip:
                    if len(chunk) <= self._skip:
                        self._skip -= len(chunk)
                        continue
                    chunk = chunk[self._skip :]
                    self._skip = 0
                self.position += len(chunk)
                yield chunk
        except ReadTimeoutError as exc:
            # Say why nothing moves; the caller reconnects at the offset reached (or gives up, fetch_timeout).
            self.stalled = True
            message = f"no data for {self._stall_timeout:g} s from {self.host.host}"
            log.info("%s: %s at byte %d", self.what, message, self.position)
            self._on_event(Event(action="fetch", status="info", item=self.what, message=message))
            raise UnavailableError(f"{self.host.host}: {self.what}: {message} at byte {self.position}") from exc
        except HTTPError as exc:
            raise UnavailableError(
                f"{self.host.host}: connection lost fetching {self.what} at byte {self.position}: {exc}"
            ) from exc
        if self._skip:
            raise UnavailableError(f"{self.host.host}: {self.what}: body ended before byte {self.offset}")
        self._done = True

    def close(self) -> None:
        """Give the connection back when the body was read to the end, else close it (not drain it)."""
        resp = self._resp
        if self._done:
            resp.release_conn()
            return
        try:
            resp.close()
        finally:
            resp.release_conn()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _chunks(resp: Response) -> Iterator[bytes]:
    """The body as it arrives. ``read1`` hands over every byte received before a connection drops, so a
    resume starts exactly where the data stopped (``stream()`` would lose the last partial read)."""
    while True:
        chunk = resp.read1(CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


def _host_is_dead(exc: CargoholdError) -> bool:
    """Unreachable (refused, reset, timed out after retries) or answering 5xx: not worth asking again soon."""
    if isinstance(exc, UnavailableError):
        return True
    status = getattr(exc, "status", 0)
    return isinstance(status, int) and is_retryable_status(status) and status != 429


def _content_range_total(value: str | None) -> int | None:
    """The complete length of ``Content-Range: bytes a-b/N`` (or ``bytes */N``); None when unknown."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _check_total_size(resp: Response, desc: Descriptor, offset: int, host: RegistryHost) -> None:
    """SizeMismatchError before any byte is stored when the answer's length disagrees with the descriptor."""
    if desc.size <= 0:
        return
    if resp.status == 206:
        total = _content_range_total(resp.headers.get("Content-Range"))
    else:
        length = resp.headers.get("Content-Length")
        total = int(length) if length is not None and length.isdigit() and not resp.headers.get(
            "Content-Encoding") else None
    if total is not None and total != desc.size:
        log.info("%s: %s serves %d bytes, the descriptor says %d", desc.digest, host.host, total, desc.size)
        raise SizeMismatchError(desc.digest, desc.size, total)


def _content_range_start(value: str | None) -> int | None:
    if not value or not value.startswith("bytes "):
        return None
    first = value[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _sniff_media_type(raw: bytes, header_type: str, what: str) -> str:
    """The media type of a manifest: the header's unless generic, else the document's own."""
    if header_type in mt.SCHEMA1_TYPES:
        raise _schema1_error(what)
    if header_type not in _GENERIC_TYPES:
        return header_type
    try:
        doc: Any = json.loads(raw)
    except ValueError:
        raise InvalidArgumentError(
            f"{what}: manifest is not JSON (Content-Type {header_type or 'none'})"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidArgumentError(f"{what}: manifest is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise _schema1_error(what)
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        if declared in mt.SCHEMA1_TYPES:
            raise _schema1_error(what)
        return declared
    if "manifests" in doc:
        return mt.OCI_INDEX
    if "config" in doc or "layers" in doc:
        return mt.OCI_MANIFEST
    raise UnsupportedMediaTypeError(
        f"{what}: cannot tell the manifest's media type (Content-Type {header_type!r})"
    )
