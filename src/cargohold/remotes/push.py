"""Push to a registry: blobs (HEAD skip, cross-repo mount, monolithic or chunked upload), then manifests.

A ``Pusher`` speaks the distribution spec's push API to one repository; ``cargohold.remotes.pushplan`` plans
an image's push from a content store and walks it in dependency order.

>>> pusher = Pusher(resolver, "127.0.0.1:5000/team/app:v1")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode, urljoin

from cargohold.content.store import Info, Provider, ReaderAt
from cargohold.errors import (
    CargoholdError,
    DigestMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    RegistryError,
    SizeMismatchError,
    UnauthorizedError,
    UnavailableError,
)
from cargohold.events import Event
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.reference import Reference
from cargohold.remotes.auth import pull_scope
from cargohold.remotes.errors import parse_error_body, registry_error
from cargohold.remotes.hosts import RegistryHost
from cargohold.remotes.http import Response
from cargohold.remotes.resolver import Resolver

log = logging.getLogger(__name__)

DEFAULT_CHUNK_THRESHOLD = 16 << 20
DEFAULT_CHUNK_SIZE = 8 << 20
DEFAULT_CONCURRENCY = 3

# Registry codes after which a fresh upload may succeed (the session expired, or bytes got duplicated).
_RESTART_CODES = frozenset({"BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID", "DIGEST_INVALID", "SIZE_INVALID"})

ProgressFn = Callable[[int], None]


class PushSource(Provider, Protocol):
    """What a push reads: committed blobs and their labels (``NamespacedStore`` is one)."""

    def exists(self, digest: Digest) -> bool: ...

    def info(self, digest: Digest) -> Info: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Upload:
    """An upload session the registry opened: the URL for the next request and the bytes it holds."""

    location: str
    offset: int = 0


class _Restart(Exception):
    """An upload failed in a way a fresh upload session may fix; ``error`` is what to raise otherwise."""

    def __init__(self, error: CargoholdError) -> None:
        super().__init__(str(error))
        self.error = error


class Pusher:
    """Pushes blobs and manifests to one repository, on the first push-capable host of its registry.

    Requests ask for ``pull,push`` on the repository (and ``pull`` on the source repository of a mount);
    401 challenges are answered by the resolver's authorizer, 429/5xx answers and dropped connections are
    retried by its transport. A failed upload starts over (resuming from the registry's ``Range`` when a
    chunked upload was cut off), as many times as the transport's retry policy allows attempts.
    """

    def __init__(
        self,
        resolver: Resolver,
        ref: Reference | str,
        *,
        chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD,
        chunk_size: int | None = None,
    ) -> None:
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        hosts = [h for h in resolver.hosts(reference.domain) if h.can("push")]
        if not hosts:
            raise FailedPreconditionError(
                f"{reference}: no host for {reference.domain} has the push capability"
            )
        if chunk_threshold < 0 or (chunk_size is not None and chunk_size < 1):
            raise InvalidArgumentError(
                f"push to {reference.name}: invalid chunk threshold {chunk_threshold} / size {chunk_size}"
            )
        self.resolver = resolver
        self.reference = reference
        self.host: RegistryHost = hosts[0]
        self.repository = reference.path
        self.chunk_threshold = chunk_threshold
        self.chunk_size = chunk_size or min(DEFAULT_CHUNK_SIZE, max(1, chunk_threshold))
        self._scope = pull_scope(self.repository, "pull", "push")

    @property
    def domain(self) -> str:
        """The registry of the reference (``127.0.0.1:5000``), as distribution-source labels name it."""
        return self.reference.domain

    @property
    def name(self) -> str:
        """``host/repository`` for messages."""
        return f"{self.host.host}/{self.repository}"

    # -- plumbing --------------------------------------------------------------------------------------------

    def _url(self, suffix: str) -> str:
        return self.host.url(f"{self.repository}/{suffix}")

    def _send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        extra_scopes: Sequence[str] = (),
    ) -> Response:
        """One authorized request (body read); ``url`` is absolute: upload Locations are."""
        base = dict(headers or {})
        transport = self.resolver.transport

        def do(auth: Mapping[str, str]) -> Response:
            return transport.request(method, url, host=self.host, headers={**base, **auth}, body=body)

        return self.resolver.authorizer.send(
            self.host, [self._scope, *extra_scopes], do, repository=self.repository
        )

    def _error(self, resp: Response, what: str) -> CargoholdError:
        return registry_error(self.host.host, resp.status, resp.data, what=what, repository=self.repository)

    def _fail_upload(self, resp: Response, what: str) -> Exception:
        """The error for a failed upload request: wrapped in ``_Restart`` when a new upload may succeed."""
        err = self._error(resp, what)
        code = parse_error_body(resp.data).code
        if resp.status in (404, 416) or code in _RESTART_CODES or resp.status == 429 or resp.status >= 500:
            return _Restart(err)
        return err

    def _location(self, resp: Response, base: str, what: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(self.host.host, resp.status, "", f"{what}: answer {resp.status} without Location")
        return urljoin(base, location)

    def _check_digest(self, resp: Response, desc: Descriptor, what: str) -> None:
        answered = resp.headers.get("Docker-Content-Digest")
        if answered and answered.strip() != str(desc.digest):
            raise DigestMismatchError(desc.digest, answered.strip(), what=f"{what}: registry's Docker-Content-Digest")

    def _what(self, desc: Descriptor) -> str:
        return f"{self.name}@{desc.digest}"

    # -- queries ---------------------------------------------------------------------------------------------

    def exists(self, desc: Descriptor) -> bool:
        """Whether the repository has ``desc``: HEAD ``/manifests/<digest>`` or ``/blobs/<digest>``."""
        manifest = is_manifest_like(desc.media_type)
        kind = "manifests" if manifest else "blobs"
        headers = {"Accept": ", ".join(dict.fromkeys([desc.media_type, mt.MANIFEST_ACCEPT]))} if manifest else {}
        resp = self._send("HEAD", self._url(f"{kind}/{desc.digest}"), headers=headers)
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise self._error(resp, self._what(desc))

    def manifest_digest(self, tag: str) -> Digest | None:
        """The digest ``tag`` points at now (HEAD ``/manifests/<tag>``), None when the tag is unknown."""
        resp = self._send("HEAD", self._url(f"manifests/{tag}"), headers={"Accept": mt.MANIFEST_ACCEPT})
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._error(resp, f"{self.name}:{tag}")
        answered = resp.headers.get("Docker-Content-Digest")
        try:
            return Digest.parse(answered.strip()) if answered else None
        except InvalidArgumentError:
            return None

    # -- blobs -----------------------------------------------------------------------------------------------

    def start_upload(self) -> Upload:
        """POST ``/blobs/uploads/``: a new upload session."""
        url = self._url("blobs/uploads/")
        resp = self._send("POST", url)
        if resp.status != 202:
            raise self._error(resp, f"{self.name}: start upload")
        return Upload(location=self._location(resp, url, f"{self.name}: start upload"))

    def mount(self, desc: Descriptor, from_repo: str) -> Upload | None:
        """Ask the registry to mount ``desc`` from ``from_repo`` of the same registry.

        Returns None when it did (201 Created). A registry that cannot (unknown there, not allowed) starts
        a plain upload instead (202): that session is returned, for ``push_blob`` or ``cancel``. A 401 on the
        mount (no pull right on the source repository) is answered with a plain upload session too.
        """
        what = f"{self._what(desc)} (mount from {from_repo})"
        query = urlencode({"mount": str(desc.digest), "from": from_repo})
        url = self._url(f"blobs/uploads/?{query}")
        try:
            resp = self._send("POST", url, extra_scopes=[pull_scope(from_repo, "pull")])
        except UnauthorizedError as exc:
            log.info("%s: refused (%s); uploading instead", what, exc)
            return self.start_upload()
        if resp.status == 201:
            self._check_digest(resp, desc, what)
            return None
        if resp.status == 202:
            return Upload(location=self._location(resp, url, what))
        raise self._error(resp, what)

    def cancel(self, upload: Upload) -> None:
        """DELETE an upload session (best effort: a registry that already forgot it is fine)."""
        try:
            resp = self._send("DELETE", upload.location)
        except CargoholdError as exc:
            log.debug("%s: cancelling upload failed: %s", self.name, exc)
            return
        if resp.status not in (204, 404):
            log.debug("%s: cancelling upload answered %s", self.name, resp.status)

    def push_blob(
        self, desc: Descriptor, reader: ReaderAt, *, upload: Upload | None = None, progress: ProgressFn | None = None
    ) -> None:
        """Upload a blob's bytes from ``reader``: one PUT up to ``chunk_threshold`` bytes, else PATCH chunks
        of ``chunk_size`` and a final PUT ``?digest=``. ``upload`` is a session already open (from ``mount``);
        it is used up: finished, or cancelled when the upload fails.

        The registry's Docker-Content-Digest must match. ``progress(sent)`` is called as bytes go out.
        """
        policy = self.resolver.transport.retries
        attempts = max(1, policy.attempts)
        for attempt in range(1, attempts + 1):
            try:
                if reader.size != desc.size:
                    raise SizeMismatchError(desc.digest, desc.size, reader.size)
                if upload is None:
                    upload = self.start_upload()
                if desc.size > self.chunk_threshold:
                    self._upload_chunked(desc, reader, upload, progress)
                else:
                    self._upload_whole(desc, reader, upload, progress)
                return
            except (_Restart, UnavailableError) as exc:
                error = exc.error if isinstance(exc, _Restart) else exc
                if upload is not None:
                    self.cancel(upload)
                upload = None
                if attempt >= attempts:
                    raise error from None
                delay = policy.delay(attempt)
                log.info("%s: upload failed (%s); starting over in %.1fs", self._what(desc), error, delay)
                self.resolver.transport.on_event(Event(
                    action="host", status="info", item=self.host.host,
                    message=f"upload {desc.digest}: {error}; retry {attempt}/{attempts - 1}",
                ))
                time.sleep(delay)
            except BaseException:
                # The session would linger on the registry until it expires.
                if upload is not None:
                    self.cancel(upload)
                raise

    def _upload_whole(
        self, desc: Descriptor, reader: ReaderAt, upload: Upload, progress: ProgressFn | None
    ) -> None:
        data = _read_exact(reader, desc, 0, desc.size)
        what = self._what(desc)
        url = _with_query(upload.location, digest=str(desc.digest))
        resp = self._send("PUT", url, headers={"Content-Type": "application/octet-stream"}, body=data)
        if resp.status != 201:
            raise self._fail_upload(resp, what)
        self._check_digest(resp, desc, what)
        if progress is not None:
            progress(desc.size)

    def _upload_chunked(
        self, desc: Descriptor, reader: ReaderAt, upload: Upload, progress: ProgressFn | None
    ) -> None:
        what = self._what(desc)
        location, offset = upload.location, upload.offset
        resumes = max(1, self.resolver.transport.retries.attempts)

        def resume(error: CargoholdError) -> Upload:
            # Ask the session where it stands and go on from there; a session that is gone (or a chunk
            # failing again and again) means starting over.
            nonlocal resumes
            resumes -= 1
            resumed = self._status(location) if resumes >= 0 else None
            if resumed is None:
                raise _Restart(error)
            log.info("%s: chunk at %d failed (%s); registry holds %d bytes", what, offset, error, resumed.offset)
            return resumed

        while offset < desc.size:
            n = min(self.chunk_size, desc.size - offset)
            data = _read_exact(reader, desc, offset, n)
            headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + n - 1}"}
            try:
                resp = self._send("PATCH", location, headers=headers, body=data)
            except UnavailableError as exc:
                resumed = resume(exc)
                location, offset = resumed.location, resumed.offset
                continue
            if resp.status == 416:
                resumed = resume(self._error(resp, what))
                location, offset = resumed.location, resumed.offset
                continue
            if resp.status != 202:
                raise self._fail_upload(resp, what)
            location = self._location(resp, location, what)
            held = _range_end(resp.headers.get("Range"))
            if held is not None and held != offset + n - 1:
                raise _Restart(RegistryError(
                    self.host.host, resp.status, "", f"{what}: registry holds bytes 0-{held}, sent up to "
                    f"{offset + n - 1}"))
            offset += n
            if progress is not None:
                progress(offset)
        resp = self._send("PUT", _with_query(location, digest=str(desc.digest)),
                          headers={"Content-Type": "application/octet-stream"}, body=b"")
        if resp.status != 201:
            raise self._fail_upload(resp, what)
        self._check_digest(resp, desc, what)

    def _status(self, location: str) -> Upload | None:
        """GET an upload session's status: where it stands (``Range: 0-<last byte>``), None when it is gone."""
        try:
            resp = self._send("GET", location)
        except CargoholdError:
            return None
        if resp.status != 204:
            return None
        end = _range_end(resp.headers.get("Range"))
        # "0-0" is what distribution says for an empty session as well as for one byte: take it as empty; a
        # wrong guess ends in a digest error and a fresh upload.
        offset = end + 1 if end else 0
        return Upload(location=self._location(resp, location, self.name), offset=offset)

    # -- manifests -------------------------------------------------------------------------------------------

    def push_manifest(self, desc: Descriptor, raw: bytes, *, tag: str = "") -> str:
        """PUT a manifest or index (``Content-Type`` its media type) under ``tag``, else under its digest.

        Returns the registry's ``OCI-Subject`` answer ("" without one): a registry that names the subject
        there lists the manifest among its referrers itself (distribution spec 1.1).
        """
        actual = Digest.from_bytes(raw, desc.digest.algorithm)
        what = f"{self.name}:{tag}" if tag else self._what(desc)
        if actual != desc.digest:
            raise DigestMismatchError(desc.digest, actual, what=f"manifest {what} in the local store")
        url = self._url(f"manifests/{tag or desc.digest}")
        resp = self._send("PUT", url, headers={"Content-Type": desc.media_type}, body=raw)
        if resp.status not in (200, 201):
            raise self._error(resp, what)
        self._check_digest(resp, desc, what)
        return (resp.headers.get("OCI-Subject") or "").strip()

    def get_manifest(self, reference: str, accept: str = mt.MANIFEST_ACCEPT) -> tuple[str, bytes] | None:
        """GET ``/manifests/<reference>`` (a tag or digest): its Content-Type and bytes, None on 404."""
        resp = self._send("GET", self._url(f"manifests/{reference}"), headers={"Accept": accept})
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._error(resp, f"{self.name}:{reference}")
        content_type = (resp.headers.get("Content-Type") or "").split(";", 1)[0].strip()
        return content_type, bytes(resp.data)


# -- helpers -------------------------------------------------------------------------------------------------


def is_manifest_like(media_type: str) -> bool:
    """Manifests and indexes live under /manifests/, everything else under /blobs/."""
    return mt.is_manifest(media_type) or mt.is_index(media_type)


def _read_exact(reader: ReaderAt, desc: Descriptor, offset: int, n: int) -> bytes:
    data = reader.read_at(offset, n)
    if len(data) != n:
        raise SizeMismatchError(desc.digest, desc.size, offset + len(data))
    return data


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


def _range_end(value: str | None) -> int | None:
    """The last byte of a ``Range: 0-<end>`` answer (``bytes=`` prefix tolerated), None when unreadable."""
    if not value:
        return None
    text = value.strip().removeprefix("bytes=")
    _, sep, end = text.partition("-")
    return int(end) if sep and end.isdigit() else None
