"""The HTTP transport under the registry client: urllib3 pools, TLS per host, bounded retries, redirects.

Thread-safe: one ``Transport`` is shared by every download of a pull.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import (
    HTTPError,
    InsecureRequestWarning,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    SSLError,
)
from urllib3.exceptions import (
    TimeoutError as Urllib3TimeoutError,
)
from urllib3.util.ssl_ import create_urllib3_context

from cargohold import __version__
from cargohold.errors import UnavailableError
from cargohold.events import Event, EventSink, discard
from cargohold.remotes.hosts import RegistryHost
from cargohold.remotes.timeouts import DEFAULT_FETCH_TIMEOUT as DEFAULT_FETCH_TIMEOUT  # re-exported
from cargohold.remotes.timeouts import DEFAULT_STALL_TIMEOUT as DEFAULT_STALL_TIMEOUT  # re-exported

log = logging.getLogger(__name__)

DEFAULT_USER_AGENT = f"cargohold/{__version__}"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10

Response = urllib3.BaseHTTPResponse



@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often one request is tried (``attempts`` in all) and how long to wait in between.

    Retried: 429 and 5xx answers (except 501), connection resets and timeouts. Not retried: connection
    refused and unknown host names (the next host of a mirror list is the better bet). The wait is
    ``backoff * 2**n`` (capped at ``max_backoff``) unless the answer has ``Retry-After``, which is honoured
    up to ``max_retry_after`` seconds.
    """

    attempts: int = 4
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 30.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1-based), with a little jitter."""
        base = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        return float(base * (0.9 + 0.2 * random.random()))


def is_retryable_status(status: int) -> bool:
    return status == 429 or (500 <= status <= 599 and status != 501)


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: a number of seconds or an HTTP-date; None when unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _retryable_error(exc: BaseException) -> bool:
    if isinstance(exc, NameResolutionError | SSLError):
        return False
    if isinstance(exc, NewConnectionError):
        # Nobody listens there: retrying only delays the fallback to the next host.
        return not isinstance(exc.__cause__, ConnectionRefusedError)
    return isinstance(exc, ProtocolError | Urllib3TimeoutError)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(exc, NewConnectionError) and cause is not None:
        return f"cannot connect: {cause}"
    return str(exc) or type(exc).__name__


def discard_response(resp: Response) -> None:
    """Drop what is left of a response and give its connection back to the pool."""
    try:
        resp.drain_conn()
    except HTTPError:
        pass
    resp.release_conn()


class Transport:
    """Sends requests with retries and redirects; one urllib3 pool manager per TLS configuration.

    ``read_timeout`` is how long a response may send nothing before it counts as stalled (see
    DEFAULT_STALL_TIMEOUT); ``connect_timeout`` bounds each connection attempt.
    """

    def __init__(
        self,
        *,
        user_agent: str = DEFAULT_USER_AGENT,
        retries: RetryPolicy | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = DEFAULT_STALL_TIMEOUT,
        on_event: EventSink | None = None,
        sleep: Callable[[float], None] = time.sleep,
        pool_size: int = 16,
    ) -> None:
        self.user_agent = user_agent
        self.retries = retries or RetryPolicy()
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.on_event: EventSink = on_event or discard
        self._sleep = sleep
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._managers: dict[tuple[object, ...], urllib3.PoolManager] = {}

    def _manager(self, host: RegistryHost | None) -> urllib3.PoolManager:
        """The pool manager for a host's TLS settings (CAs, client certs, skip_verify)."""
        if host is None or host.scheme != "https" or not (host.ca or host.client or host.skip_verify):
            key: tuple[object, ...] = ("default",)
        else:
            key = (host.skip_verify, host.ca, host.client)
        with self._lock:
            mgr = self._managers.get(key)
            if mgr is None:
                mgr = self._new_manager(None if key == ("default",) else host)
                self._managers[key] = mgr
            return mgr

    def _new_manager(self, host: RegistryHost | None) -> urllib3.PoolManager:
        kwargs: dict[str, object] = {
            "num_pools": 32,
            "maxsize": self._pool_size,
            "block": False,
            "retries": False,
        }
        if host is not None:
            ctx = create_urllib3_context()
            if host.skip_verify:
                # The hosts.toml asked for it: say so once in our log instead of a warning per request.
                log.warning("%s: TLS certificate verification disabled (skip_verify)", host.host)
                hostname = re.escape(host.host.rsplit(":", 1)[0].strip("[]"))
                warnings.filterwarnings(
                    "ignore", message=f".*host '{hostname}'", category=InsecureRequestWarning
                )
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                kwargs["assert_hostname"] = False
            else:
                ctx.load_default_certs()
                for ca in host.ca:
                    ctx.load_verify_locations(cafile=str(ca))
            for cert, key in host.client:
                ctx.load_cert_chain(str(cert), str(key) if key else None)
            kwargs["ssl_context"] = ctx
        return urllib3.PoolManager(**kwargs)  # type: ignore[arg-type]

    def request(
        self,
        method: str,
        url: str,
        *,
        host: RegistryHost | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        stream: bool = False,
        follow_redirects: bool = True,
        attempts: int | None = None,
    ) -> Response:
        """Send one request (retried as the policy says) and follow redirects.

        ``host`` supplies TLS settings and configured headers for URLs on that host. With ``stream``, the
        body is left unread: read it and call ``release_conn()``, or ``discard_response``. A response with a
        retryable status is returned when the attempts run out; connection failures raise UnavailableError
        naming the host. ``attempts`` overrides the policy's (1: no retry, when another host is the retry).
        """
        hdrs: dict[str, str] = {"User-Agent": self.user_agent}
        if host is not None:
            for name, values in host.headers.items():
                hdrs[name] = ", ".join(values)
        hdrs.update(headers or {})
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            tls_host = host if host is not None and urlsplit(url).netloc == host.host else None
            resp = self._send(method, url, hdrs, body, stream, tls_host, attempts)
            if not follow_redirects or resp.status not in REDIRECT_STATUSES:
                return resp
            location = resp.headers.get("Location")
            if not location:
                return resp
            discard_response(resp)
            target = urljoin(url, location)
            if urlsplit(target).netloc != origin:
                # Credentials are for the registry, never for the storage backend it redirects to.
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, body = "GET", None
            log.debug("%s redirected to %s", url, target)
            url = target
        raise UnavailableError(f"{origin}: more than {MAX_REDIRECTS} redirects for {method} {url}")

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        stream: bool,
        host: RegistryHost | None,
        attempts: int | None = None,
    ) -> Response:
        policy = self.retries
        parts = urlsplit(url)
        where = parts.netloc
        manager = self._manager(host)
        attempts = max(1, attempts if attempts is not None else policy.attempts)
        for attempt in range(1, attempts + 1):
            try:
                resp = manager.request(
                    method,
                    url,
                    headers=dict(headers),
                    body=body,
                    preload_content=not stream,
                    redirect=False,
                    retries=False,
                    timeout=self.timeout,
                )
            except HTTPError as exc:
                if attempt >= attempts or not _retryable_error(exc):
                    raise UnavailableError(f"{where}: {method} {parts.path}: {_reason(exc)}") from exc
                delay = policy.delay(attempt)
                self._note_retry(where, f"{method} {parts.path}: {_reason(exc)}", attempt, attempts, delay)
                self._sleep(delay)
                continue
            if attempt < attempts and is_retryable_status(resp.status):
                after = retry_after_seconds(resp.headers.get("Retry-After"))
                delay = min(after, policy.max_retry_after) if after is not None else policy.delay(attempt)
                discard_response(resp)
                self._note_retry(
                    where, f"{method} {parts.path}: HTTP {resp.status}", attempt, attempts, delay
                )
                self._sleep(delay)
                continue
            return resp
        raise AssertionError("unreachable")

    def _note_retry(self, where: str, what: str, attempt: int, attempts: int, delay: float) -> None:
        message = f"{what}; retry {attempt}/{attempts - 1} in {delay:.1f}s"
        log.info("%s: %s", where, message)
        self.on_event(Event(action="host", status="info", item=where, message=message))

    def close(self) -> None:
        with self._lock:
            managers, self._managers = list(self._managers.values()), {}
        for mgr in managers:
            mgr.clear()
