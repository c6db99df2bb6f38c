"""``login`` and ``logout``: check credentials against a registry, then keep them where docker keeps them.

Where, as docker decides: the credential helper named for the registry in ``credHelpers``, else the
``credsStore`` helper, else base64 ``auth`` under ``auths`` in ``config.json`` (``$DOCKER_CONFIG``, default
``~/.docker``). The file is rewritten atomically, mode 0600, keeping every other key.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cargohold.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from cargohold.remotes.credentials import (
    DOCKER_HUB_SERVER,
    HELPER_TIMEOUT,
    Credentials,
    docker_config_path,
    normalize_server,
)
from cargohold.remotes.http import discard_response
from cargohold.remotes.resolver import Resolver


@dataclass(frozen=True, slots=True, kw_only=True)
class Saved:
    """Where credentials went (or were erased from): a helper's name, else the config file."""

    server: str
    helper: str = ""
    path: Path | None = None

    def describe(self) -> str:
        return f"credential helper docker-credential-{self.helper}" if self.helper else str(self.path)


def server_key(registry: str) -> str:
    """The key docker uses for ``registry``: ``host[:port]``, or Docker Hub's ``https://index.docker.io/v1/``."""
    host = normalize_server(registry)
    if not host:
        raise InvalidArgumentError(f"registry {registry!r}: want a host[:port]")
    return DOCKER_HUB_SERVER if host == "docker.io" else host


def verify(resolver: Resolver, registry: str) -> None:
    """``GET /v2/`` on ``registry`` with the resolver's credentials (answering its challenge); raises
    UnauthorizedError when they are refused, RegistryError/UnavailableError when it does not answer well."""
    host = resolver.hosts(normalize_server(registry))[-1]  # the registry itself, not a mirror
    resp = resolver.authorizer.send(
        host, [], lambda auth: resolver.transport.request("GET", host.url(""), host=host, headers=auth),
        repository="")
    status = resp.status
    discard_response(resp)
    if status >= 400:
        raise UnavailableError(f"{host.host}: GET /v2/ answered HTTP {status}: not a registry?")


def save(registry: str, creds: Credentials, *, env: Mapping[str, str] | None = None) -> Saved:
    """Keep ``creds`` for ``registry``: in its credential helper when one is configured, else in config.json."""
    env = os.environ if env is None else env
    path = docker_config_path(env)
    doc = _read(path)
    server = server_key(registry)
    helper = _helper_for(doc, server)
    if helper:
        payload = json.dumps({"ServerURL": server, "Username": creds.username, "Secret": creds.password})
        _run_helper(helper, "store", payload, server, env)
        return Saved(server=server, helper=helper)
    auths = doc.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise InvalidArgumentError(f"{path}: auths is not a JSON object")
    for key in [k for k in auths if normalize_server(k) == normalize_server(server)]:
        del auths[key]  # one entry per registry, whichever spelling an older login used
    token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
    auths[server] = {"auth": token}
    _write(path, doc)
    return Saved(server=server, path=path)


def erase(registry: str, *, env: Mapping[str, str] | None = None) -> Saved:
    """Forget the credentials of ``registry`` (its helper's ``erase``, or its ``auths`` entry); NotFound is not
    an error for a helper (docker's behaviour) but is for the config file: nothing to log out from."""
    env = os.environ if env is None else env
    path = docker_config_path(env)
    doc = _read(path)
    server = server_key(registry)
    helper = _helper_for(doc, server)
    if helper:
        _run_helper(helper, "erase", server, server, env)
        return Saved(server=server, helper=helper)
    auths = doc.get("auths")
    keys = [k for k in auths if normalize_server(k) == normalize_server(server)] if isinstance(auths, dict) else []
    if not keys:
        raise FailedPreconditionError(f"not logged in to {server} (no entry in {path})")
    assert isinstance(auths, dict)
    for key in keys:
        del auths[key]
    _write(path, doc)
    return Saved(server=server, path=path)


def _helper_for(doc: Mapping[str, Any], server: str) -> str:
    helpers = doc.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if normalize_server(key) == normalize_server(server) and isinstance(name, str) and name:
                return name
    store = doc.get("credsStore")
    return store if isinstance(store, str) else ""


def _run_helper(name: str, action: str, payload: str, server: str, env: Mapping[str, str]) -> None:
    program = f"docker-credential-{name}"
    exe = shutil.which(program, path=env.get("PATH"))
    if exe is None:
        raise FailedPreconditionError(f"credential helper {program} (configured for {server}) not found on PATH")
    try:
        proc = subprocess.run([exe, action], input=payload.encode(), capture_output=True, timeout=HELPER_TIMEOUT,
                              env=dict(env))
    except subprocess.TimeoutExpired:
        raise UnavailableError(f"credential helper {program} {action} timed out for {server}") from None
    if proc.returncode != 0:
        text = (proc.stdout or proc.stderr).decode("utf-8", "replace").strip()
        raise UnavailableError(f"credential helper {program} {action} failed for {server}: "
                               f"{text or 'exit ' + str(proc.returncode)}")


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"{path}: cannot read docker config: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgumentError(f"{path}: docker config is not a JSON object")
    return doc


def _write(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically with ``doc``, mode 0600 (it holds passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=path.parent)  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent="\t")
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
