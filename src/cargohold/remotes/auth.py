"""Registry authentication: ``WWW-Authenticate`` challenges, Basic, and the Bearer token flow.

Credentials come from a ``CredentialStore``: an explicit ``--user``, Docker's ``config.json`` (``auths``,
``credsStore``, ``credHelpers``) or a chain of them (see ``credentials_for`` and ``remotes.credentials``).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from cargohold.errors import UnauthorizedError
from cargohold.remotes.credentials import (
    ChainCredentials,
    Credentials,
    CredentialStore,
    DockerConfigCredentials,
    StaticCredentials,
    credentials_for,
    parse_user,
)
from cargohold.remotes.errors import parse_error_body, registry_error
from cargohold.remotes.hosts import RegistryHost
from cargohold.remotes.http import Response, Transport, discard_response

__all__ = [
    "Authorizer",
    "ChainCredentials",
    "Challenge",
    "Credentials",
    "CredentialStore",
    "DockerConfigCredentials",
    "StaticCredentials",
    "credentials_for",
    "parse_challenges",
    "parse_user",
    "pull_scope",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL = 60.0
CLIENT_ID = "cargohold"
MAX_TOKEN_RESPONSE = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: ``scheme`` lowercased (``bearer``, ``basic``), its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.params.get("scope", "").split())


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 7235); several challenges may share one value."""
    out: list[Challenge] = []
    for value in values:
        out.extend(_parse_one_header(value))
    return out


def _parse_one_header(text: str) -> list[Challenge]:
    out: list[Challenge] = []
    i, n = 0, len(text)
    scheme = ""
    params: dict[str, str] = {}

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and text[i] in chars:
            i += 1

    def token() -> str:
        nonlocal i
        start = i
        while i < n and text[i] not in ' \t,="':
            i += 1
        return text[start:i]

    while i < n:
        skip(" \t,")
        if i >= n:
            break
        word = token()
        skip(" \t")
        if i < n and text[i] == "=" and scheme:
            i += 1
            skip(" \t")
            if i < n and text[i] == '"':
                i += 1
                chars: list[str] = []
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(text[i])
                    i += 1
                i += 1
                params[word.lower()] = "".join(chars)
            else:
                params[word.lower()] = token()
        elif word:
            # A bare token starts a new challenge (token68 credentials are not used by registries).
            if scheme:
                out.append(Challenge(scheme=scheme, params=params))
            scheme, params = word.lower(), {}
        else:
            i += 1
    if scheme:
        out.append(Challenge(scheme=scheme, params=params))
    return out


def pull_scope(repository: str, *actions: str) -> str:
    """``repository:<name>:pull`` (or the given actions, comma-joined)."""
    return f"repository:{repository}:{','.join(actions or ('pull',))}"


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


@dataclass(slots=True)
class _Token:
    header: str
    expires: float


class Authorizer:
    """Authorizes registry requests for every host of a resolver; thread-safe.

    Remembers each host's challenge so later requests authorize up front, and caches bearer tokens per
    (host, scopes) until they expire. A 401 on a cached token fetches a new one once; a 401 on fresh
    credentials is an UnauthorizedError naming the host and repository.
    """

    def __init__(
        self,
        transport: Transport,
        credentials: CredentialStore | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.credentials = credentials
        self._clock = clock
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, frozenset[str]], _Token] = {}

    def _creds(self, host: str) -> Credentials | None:
        return self.credentials.get(host) if self.credentials is not None else None

    def send(
        self,
        host: RegistryHost,
        scopes: Iterable[str],
        do: Callable[[Mapping[str, str]], Response],
        *,
        repository: str,
    ) -> Response:
        """Call ``do(auth_headers)`` and answer 401 challenges; returns the first non-401 response.

        Raises UnauthorizedError when fresh credentials (or a fresh token) are refused too, or when a
        challenge asks for credentials we do not have.
        """
        wanted = frozenset(scopes)
        where = f"{host.namespace or host.host}/{repository}" if repository else (host.namespace or host.host)
        header = self._prior(host, wanted)
        fresh = False
        while True:
            resp = do({"Authorization": header} if header else {})
            if resp.status != 401:
                return resp
            challenges = parse_challenges(resp.headers.getlist("WWW-Authenticate"))
            body = resp.data
            discard_response(resp)
            chosen = _pick(challenges)
            if chosen is None:
                err = parse_error_body(body)
                raise UnauthorizedError(
                    f"{where}: unauthorized ({err.code or 'HTTP 401'}) and no usable WWW-Authenticate "
                    "challenge "
                    f"from {host.host}"
                )
            if header is not None and (fresh or header.startswith("Basic ")):
                raise self._refused(host, where, chosen, header)
            with self._lock:
                self._challenges[host.host] = chosen
                self._tokens.pop((host.host, wanted), None)
            header = self._authorize(host, chosen, wanted, where)
            fresh = True

    def _refused(
        self, host: RegistryHost, where: str, challenge: Challenge, header: str
    ) -> UnauthorizedError:
        creds = self._creds(host.host)
        who = f"credentials for user {creds.username!r}" if creds and creds.username else "the credentials"
        if header.startswith("Basic "):
            return UnauthorizedError(f"{where}: unauthorized: {host.host} rejected {who}")
        reason = challenge.params.get("error_description") or challenge.params.get("error") or "token refused"
        scope = challenge.params.get("scope", "")
        extra = f" (scope {scope})" if scope else ""
        if creds is None:
            return UnauthorizedError(
                f"{where}: unauthorized: anonymous token refused by {host.host}: {reason}{extra}; "
                f"no credentials for {host.host} (use --user or docker login)"
            )
        return UnauthorizedError(
            f"{where}: unauthorized: {host.host} refused the token for {who}: {reason}{extra}"
        )

    def _prior(self, host: RegistryHost, scopes: frozenset[str]) -> str | None:
        """The Authorization header to send before any challenge, from what this host asked for before."""
        with self._lock:
            challenge = self._challenges.get(host.host)
            token = self._tokens.get((host.host, scopes))
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._creds(host.host)
            return basic_header(creds) if creds is not None and creds.username else None
        if token is not None and token.expires > self._clock():
            return token.header
        try:
            return self._authorize(host, challenge, scopes, host.host)
        except UnauthorizedError:
            return None  # let the registry's own challenge decide

    def _authorize(self, host: RegistryHost, challenge: Challenge, scopes: frozenset[str], where: str) -> str:
        creds = self._creds(host.host)
        if challenge.scheme == "basic":
            if creds is None or not creds.username:
                raise UnauthorizedError(
                    f"{where}: unauthorized: {host.host} requires a user name and password and none is "
                    f"configured (use --user or docker login)"
                )
            return basic_header(creds)
        all_scopes = frozenset(scopes | challenge.scopes)
        header, ttl = self._fetch_token(host, challenge, all_scopes, creds, where)
        with self._lock:
            self._tokens[(host.host, scopes)] = _Token(header=header, expires=self._clock() + ttl)
        return header

    def _fetch_token(
        self,
        host: RegistryHost,
        challenge: Challenge,
        scopes: frozenset[str],
        creds: Credentials | None,
        where: str,
    ) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UnauthorizedError(
                f"{where}: {host.host} sent a bearer challenge without a usable realm {realm!r}"
            )
        service = challenge.params.get("service", "")
        tls_host = host if parts.netloc == host.host else None
        if creds is not None and creds.identity_token:
            form: list[tuple[str, str]] = [
                ("grant_type", "refresh_token"),
                ("refresh_token", creds.identity_token),
                ("client_id", CLIENT_ID),
                ("access_type", "offline"),
            ]
            if service:
                form.append(("service", service))
            if scopes:
                form.append(("scope", " ".join(sorted(scopes))))
            resp = self.transport.request(
                "POST",
                realm,
                host=tls_host,
                body=urlencode(form).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        else:
            query: list[tuple[str, str]] = []
            if service:
                query.append(("service", service))
            query.extend(("scope", s) for s in sorted(scopes))
            headers = {"Authorization": basic_header(creds)} if creds is not None and creds.username else {}
            url = realm + ("&" if "?" in realm else "?") + urlencode(query) if query else realm
            resp = self.transport.request("GET", url, host=tls_host, headers=headers)
        body = resp.data[:MAX_TOKEN_RESPONSE]
        resp.release_conn()
        if resp.status in (401, 403):
            if creds is None:
                raise UnauthorizedError(
                    f"{where}: unauthorized: token server {parts.netloc} refused anonymous access; no "
                    f"credentials for {host.host} (use --user or docker login)"
                )
            who = f"user {creds.username!r}" if creds.username else "the identity token"
            raise UnauthorizedError(f"{where}: unauthorized: token server {parts.netloc} rejected {who}")
        if resp.status != 200:
            raise registry_error(parts.netloc, resp.status, body, what=f"token for {where}")
        try:
            doc: Any = json.loads(body)
        except ValueError:
            raise UnauthorizedError(f"{where}: token server {parts.netloc} answered no JSON") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise UnauthorizedError(f"{where}: token server {parts.netloc} answered no token")
        expires_in = doc.get("expires_in")
        ttl = (
            float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else DEFAULT_TOKEN_TTL
        )
        # Renew a little early so a token does not expire between our check and the registry's.
        ttl = max(1.0, ttl - min(10.0, ttl * 0.1))
        log.debug(
            "token for %s (scopes %s) from %s, valid %.0fs", host.host, sorted(scopes), parts.netloc, ttl
        )
        return "Bearer " + token, ttl


def _pick(challenges: list[Challenge]) -> Challenge | None:
    for scheme in ("bearer", "basic"):
        for ch in challenges:
            if ch.scheme == scheme:
                return ch
    return None
