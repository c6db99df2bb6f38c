"""Where registry credentials come from: ``--user``, Docker's ``config.json`` and credential helpers."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cargohold.errors import InvalidArgumentError, UnavailableError

log = logging.getLogger(__name__)

DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
# Names under which Docker Hub's credentials may be stored, for the hosts we talk to.
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """A user name and password, or an identity (refresh) token for the OAuth2 token endpoint."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:  # never print secrets
        token = "***" if self.identity_token else ""
        return f"Credentials(username={self.username!r}, password=***, identity_token={token!r})"


class CredentialStore(Protocol):
    """Finds credentials for a registry host (``host[:port]``); None when it has none."""

    def get(self, host: str) -> Credentials | None: ...


class StaticCredentials:
    """The same credentials for every host (``--user``), or only for the hosts named."""

    def __init__(self, credentials: Credentials, hosts: tuple[str, ...] = ()) -> None:
        self.credentials = credentials
        self.hosts = frozenset(normalize_server(h) for h in hosts)

    def get(self, host: str) -> Credentials | None:
        if self.hosts and normalize_server(host) not in self.hosts:
            return None
        return self.credentials


class ChainCredentials:
    """Asks each store in turn; the first answer wins."""

    def __init__(self, *stores: CredentialStore) -> None:
        self.stores = stores

    def get(self, host: str) -> Credentials | None:
        for store in self.stores:
            found = store.get(host)
            if found is not None:
                return found
        return None


def normalize_server(server: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``; Docker Hub's names -> ``docker.io``."""
    s = server.strip()
    if "://" in s:
        s = s.split("://", 1)[1]
    s = s.split("/", 1)[0].lower()
    return "docker.io" if s in _HUB_ALIASES else s


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    env = os.environ if env is None else env
    base = env.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


class DockerConfigCredentials:
    """Credentials from Docker's ``config.json``, read once on first use.

    Order per host, as docker does: ``credHelpers[host]``, then ``credsStore``, then ``auths``. Helpers are
    run as ``docker-credential-<name> get`` with the server on stdin. A missing ``credsStore`` helper is
    logged and skipped (a stale ``desktop`` store must not break anonymous pulls); a failing helper named
    for the host in ``credHelpers`` is an error.
    """

    def __init__(self, path: Path | None = None, *, env: Mapping[str, str] | None = None) -> None:
        self.path = Path(path) if path is not None else docker_config_path(env)
        self._env = dict(os.environ if env is None else env)
        self._lock = threading.Lock()
        self._loaded = False
        self._auths: dict[str, Credentials] = {}
        self._helpers: dict[str, str] = {}
        self._store = ""
        self._cache: dict[str, Credentials | None] = {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            doc: Any = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"{self.path}: cannot read docker config: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidArgumentError(f"{self.path}: docker config is not a JSON object")
        for server, entry in (doc.get("auths") or {}).items():
            creds = _auth_entry(self.path, server, entry)
            if creds is not None:
                self._auths.setdefault(normalize_server(server), creds)
        for server, helper in (doc.get("credHelpers") or {}).items():
            if isinstance(helper, str) and helper:
                self._helpers[normalize_server(server)] = helper
        store = doc.get("credsStore")
        self._store = store if isinstance(store, str) else ""

    def get(self, host: str) -> Credentials | None:
        key = normalize_server(host)
        with self._lock:
            self._load()
            if key in self._cache:
                return self._cache[key]
            found = self._lookup(key)
            self._cache[key] = found
            return found

    def _lookup(self, key: str) -> Credentials | None:
        server = DOCKER_HUB_SERVER if key == "docker.io" else key
        helper = self._helpers.get(key)
        if helper:
            return run_credential_helper(helper, server, env=self._env)
        if self._store:
            try:
                found = run_credential_helper(self._store, server, env=self._env)
            except UnavailableError as exc:
                log.warning("credsStore %s: %s; using auths of %s", self._store, exc, self.path)
                found = None
            if found is not None:
                return found
        return self._auths.get(key)


def _auth_entry(path: Path, server: str, entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken") or ""
    user, password = entry.get("username") or "", entry.get("password") or ""
    encoded = entry.get("auth") or ""
    if encoded:
        try:
            user, sep, password = base64.b64decode(encoded, validate=False).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgumentError(
                f"{path}: auths[{server!r}].auth is not base64 of user:password"
            ) from None
        if not sep:
            raise InvalidArgumentError(f"{path}: auths[{server!r}].auth is not base64 of user:password")
    if not (user or token):
        return None
    return Credentials(username=user, password=password, identity_token=token)


def run_credential_helper(
    name: str, server: str, *, env: Mapping[str, str] | None = None
) -> Credentials | None:
    """``docker-credential-<name> get``; None when the helper knows no credentials for ``server``."""
    program = f"docker-credential-{name}"
    path_env = (env or os.environ).get("PATH")
    exe = shutil.which(program, path=path_env)
    if exe is None:
        raise UnavailableError(f"credential helper {program} not found on PATH (for {server})")
    try:
        proc = subprocess.run(
            [exe, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            env=dict(env) if env is not None else None,
        )
    except subprocess.TimeoutExpired:
        raise UnavailableError(f"credential helper {program} timed out for {server}") from None
    out = proc.stdout.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        text = out or proc.stderr.decode("utf-8", "replace").strip()
        if "credentials not found" in text.lower():
            return None
        raise UnavailableError(f"credential helper {program} failed for {server}: {text or proc.returncode}")
    try:
        doc = json.loads(out)
        user, secret = doc.get("Username", ""), doc.get("Secret", "")
    except (ValueError, AttributeError):
        raise UnavailableError(f"credential helper {program} answered no JSON for {server}") from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise UnavailableError(f"credential helper {program} answered malformed JSON for {server}")
    if user == "<token>":
        return Credentials(identity_token=secret)
    if not user and not secret:
        return None
    return Credentials(username=user, password=secret)


def parse_user(user: str, *, password_prompt: Callable[[str], str] | None = None) -> Credentials:
    """``USER:PASSWORD`` -> Credentials; ``USER`` alone asks ``password_prompt`` (the CLI's) for it."""
    name, sep, password = user.partition(":")
    if not name:
        raise InvalidArgumentError("--user: empty user name (want USER[:PASSWORD])")
    if not sep:
        if password_prompt is None:
            raise InvalidArgumentError(f"--user {name}: no password (want USER:PASSWORD)")
        password = password_prompt(name)
    return Credentials(username=name, password=password)


def credentials_for(
    user: str | None,
    *,
    docker_config: Path | None = None,
    password_prompt: Callable[[str], str] | None = None,
) -> CredentialStore:
    """The credentials the CLI uses: ``--user`` first (for every host), then Docker's config.json."""
    docker = DockerConfigCredentials(docker_config)
    if not user:
        return docker
    return ChainCredentials(StaticCredentials(parse_user(user, password_prompt=password_prompt)), docker)
