"""Credentials given for one pull (CRI's AuthConfig) and the resolver built for them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cargohold.errors import UnauthorizedError
from cargohold.events import EventSink
from cargohold.remotes.auth import Authorizer
from cargohold.remotes.credentials import (
    ChainCredentials,
    Credentials,
    CredentialStore,
    StaticCredentials,
    normalize_server,
)
from cargohold.remotes.hosts import RegistryHost
from cargohold.remotes.http import Response, Transport, discard_response
from cargohold.remotes.resolver import Resolver


@dataclass(frozen=True, slots=True, kw_only=True)
class PullAuth:
    """Credentials for one pull, as CRI's AuthConfig carries them.

    ``username``/``password`` (Basic, or the token server's password grant), ``identity_token`` (a refresh
    token for the token server) or ``registry_token`` (sent to the registry as ``Bearer`` as it is).
    ``server`` (``host[:port]`` or a URL) limits them to that registry; "" means any host of the pull.
    """

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""
    server: str = ""

    def __repr__(self) -> str:  # never print secrets
        return f"PullAuth(username={self.username!r}, server={self.server!r}, secrets=***)"

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)


class BearerTokenAuthorizer(Authorizer):
    """Sends a fixed bearer token (CRI's ``registry_token``) to the registries ``hosts`` (all when empty); other
    hosts are left to ``fallback``. A 401 is an UnauthorizedError naming the host: the token is not renewable."""

    def __init__(self, transport: Transport, token: str, *, fallback: Authorizer, hosts: Sequence[str] = ()
                 ) -> None:
        super().__init__(transport, None)
        self.token = token
        self.hosts = frozenset(normalize_server(h) for h in hosts)
        self.fallback = fallback

    def send(self, host: RegistryHost, scopes: Iterable[str], do: Callable[[Mapping[str, str]], Response], *,
             repository: str) -> Response:
        mine = not self.hosts or normalize_server(host.host) in self.hosts or (
            bool(host.namespace) and normalize_server(host.namespace) in self.hosts)
        if not mine:
            return self.fallback.send(host, scopes, do, repository=repository)
        resp = do({"Authorization": f"Bearer {self.token}"})
        if resp.status == 401:
            discard_response(resp)
            where = f"{host.namespace or host.host}/{repository}" if repository else host.host
            raise UnauthorizedError(f"{where}: unauthorized: {host.host} rejected the registry token")
        return resp


@contextlib.contextmanager
def pull_resolver(resolver: Resolver, auth: PullAuth | None, *, hosts_dir: Path | None,
                  credentials: CredentialStore | None, plain_http: bool, on_event: EventSink) -> Iterator[Resolver]:
    """``resolver`` itself without ``auth``; with ``auth``, a fresh resolver (its own token cache, closed on
    exit) so credentials given for one pull never leak into other pulls through cached tokens."""
    if auth is None or auth.empty:
        yield resolver
        return
    hosts = (auth.server,) if auth.server else ()
    stores: list[CredentialStore] = []
    if auth.username or auth.password or auth.identity_token:
        creds = Credentials(username=auth.username, password=auth.password, identity_token=auth.identity_token)
        stores.append(StaticCredentials(creds, hosts))
    if credentials is not None:
        stores.append(credentials)
    own = Resolver(hosts_dir=hosts_dir, credentials=ChainCredentials(*stores), plain_http=plain_http,
                   on_event=on_event, stall_timeout=resolver.stall_timeout, fetch_timeout=resolver.fetch_timeout)
    if auth.registry_token:
        own.authorizer = BearerTokenAuthorizer(own.transport, auth.registry_token, hosts=hosts,
                                               fallback=own.authorizer)
    try:
        yield own
    finally:
        own.close()
