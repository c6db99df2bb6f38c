"""A real docker-registry (distribution) on 127.0.0.1 for the tests, ``make demo`` and ``make bench``.

``start_registry`` writes a config, starts ``docker-registry serve`` on a free loopback port and waits until
``/v2/`` answers. ``push_blob`` / ``push_manifest`` seed it with plain uploads (not cargohold's push).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import urllib3

from cargohold.errors import NotFoundError, UnavailableError
from cargohold.oci.digest import Digest
from cargohold.remotes.errors import registry_error

BINARY_NAMES = ("docker-registry", "registry")
START_TIMEOUT = 15.0

_http = urllib3.PoolManager(num_pools=16, maxsize=8, retries=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenAuth:
    """Bearer token auth: the registry trusts JWTs from ``issuer`` signed by a cert in ``rootcertbundle``."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


def find_registry_binary() -> str:
    """``/usr/bin/docker-registry`` or whichever of ``docker-registry`` / ``registry`` is on PATH."""
    for name in BINARY_NAMES:
        found = shutil.which(name)
        if found:
            return found
    if os.access("/usr/bin/docker-registry", os.X_OK):
        return "/usr/bin/docker-registry"
    raise NotFoundError(
        "docker-registry binary not found on PATH (install the Debian package docker-registry, "
        "or put distribution's `registry` binary on PATH)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _yaml(value: Any, indent: int = 0) -> str:
    """A tiny YAML emitter for the config: nested mappings of scalars (JSON scalars are valid YAML)."""
    pad = "  " * indent
    lines: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(item, indent + 1))
        else:
            lines.append(f"{pad}{key}: {json.dumps(item)}")
    return "\n".join(lines)


def registry_config(
    storage: Path,
    port: int,
    *,
    htpasswd: Path | None = None,
    token: TokenAuth | None = None,
    tls: tuple[Path, Path] | None = None,
    tls_client_ca: Path | None = None,
    schema1: bool = False,
    proxy_remote: str | None = None,
) -> str:
    """The YAML config of a loopback registry with filesystem storage and deletes enabled (``schema1``:
    accept and serve signed Docker schema 1 manifests; ``proxy_remote``: a pull-through cache of that
    registry URL, as a mirror)."""
    if htpasswd is not None and token is not None:
        raise ValueError("registry config: choose htpasswd or token auth, not both")
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            # No blob descriptor cache: tests edit the storage directory behind the registry's back.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
        # Foreign / non-distributable layers carry urls; without an allow list the registry refuses them all.
        "validation": {"manifests": {"urls": {"allow": ["^https?://"]}}},
    }
    if schema1:
        config["compatibility"] = {"schema1": {"enabled": True}}
    if proxy_remote is not None:
        config["proxy"] = {"remoteurl": proxy_remote}
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        if tls_client_ca is not None:
            config["http"]["tls"]["clientcas"] = [str(tls_client_ca)]
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "cargohold-test", "path": str(htpasswd)}}
    if token is not None:
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.rootcertbundle),
            }
        }
    return _yaml(config) + "\n"


class RegistryProcess:
    """A running ``docker-registry``. ``url`` is ``http://127.0.0.1:PORT`` (``https://`` with TLS),
    ``host`` is ``127.0.0.1:PORT``. Use as a context manager, or call ``stop()``.
    """

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        port: int,
        storage: Path,
        config_path: Path,
        log_path: Path,
        tls_cert: Path | None = None,
    ) -> None:
        self.process = process
        self.tls_cert = tls_cert
        self.port = port
        self.storage = storage
        self.config_path = config_path
        self.log_path = log_path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.host}"

    def log_text(self) -> str:
        """Everything the registry logged so far (its access log shows each request)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def blob_data_path(self, digest: Digest | str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (the file tests corrupt on purpose)."""
        d = Digest.parse(digest)
        return self.storage / "docker/registry/v2/blobs" / d.algorithm / d.hex[:2] / d.hex / "data"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RegistryProcess({self.url}, storage={self.storage})"


Registry = RegistryProcess


def start_registry(
    tmpdir: Path,
    *,
    htpasswd: Path | None = None,
    token: TokenAuth | None = None,
    port: int | None = None,
    log_path: Path | None = None,
    tls: tuple[Path, Path] | None = None,
    tls_client_ca: Path | None = None,
    schema1: bool = False,
    proxy_remote: str | None = None,
) -> RegistryProcess:
    """Start a registry storing under ``tmpdir/storage``; return once ``GET /v2/`` answers (200 or 401).

    ``tls`` = (certificate, key) serves HTTPS; the certificate must be valid for 127.0.0.1 (it is also
    the CA used to check readiness); ``tls_client_ca`` also requires client certificates signed by that CA.
    Restarting on the same ``tmpdir`` keeps the stored images.
    """
    binary = find_registry_binary()
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    storage = tmpdir / "storage"
    storage.mkdir(exist_ok=True)
    log_path = Path(log_path) if log_path is not None else tmpdir / "registry.log"
    last_error = ""
    # A port picked free may be taken before the registry binds it; pick another then.
    for _ in range(3 if port is None else 1):
        chosen = port if port is not None else free_port()
        config_path = tmpdir / "config.yml"
        config_path.write_text(
            registry_config(
                storage, chosen, htpasswd=htpasswd, token=token, tls=tls, tls_client_ca=tls_client_ca,
                schema1=schema1, proxy_remote=proxy_remote,
            )
        )
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        reg = RegistryProcess(
            process=proc,
            port=chosen,
            storage=storage,
            config_path=config_path,
            log_path=log_path,
            tls_cert=tls[0] if tls is not None else None,
        )
        try:
            if _wait_ready(reg, client_auth=tls_client_ca is not None):
                return reg
        except BaseException:
            reg.stop()
            raise
        last_error = reg.log_text()[-2000:]
        reg.stop()
        if "address already in use" not in last_error:
            break
    raise UnavailableError(f"docker-registry ({binary}) did not start; log {log_path}:\n{last_error}")


def _wait_ready(reg: RegistryProcess, *, client_auth: bool = False) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.005
    while time.monotonic() < deadline:
        if reg.process.poll() is not None:
            return False
        try:
            resp = (_tls_pool(reg.tls_cert) if reg.tls_cert else _http).request(
                "GET", reg.url + "/v2/", timeout=urllib3.Timeout(connect=0.5, read=2.0), redirect=False
            )
        except urllib3.exceptions.SSLError:
            if client_auth:
                return True  # it answers TLS and wants a client certificate the poll does not have
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
            continue
        except urllib3.exceptions.HTTPError:
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
            continue
        if resp.status in (200, 401):
            return True
        time.sleep(delay)
    return False


def _tls_pool(ca: Path) -> urllib3.PoolManager:
    return urllib3.PoolManager(ca_certs=str(ca), cert_reqs="CERT_REQUIRED", retries=False)


# -- seeding ------------------------------------------------------------------------------------------------


def _headers(auth_header: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    if auth_header:
        headers["Authorization"] = auth_header
    return headers


def _host(base_url: str) -> str:
    return base_url.split("://", 1)[-1].rstrip("/")


def _fail(base_url: str, resp: urllib3.BaseHTTPResponse, what: str, repo: str) -> Exception:
    return registry_error(_host(base_url), resp.status, resp.data, what=what, repository=repo)


def push_blob(base_url: str, repo: str, data: bytes, *, auth_header: str | None = None) -> Digest:
    """Upload one blob (POST then a single PUT); skip it when the registry has it. Returns its digest."""
    base_url = base_url.rstrip("/")
    digest = Digest.from_bytes(data)
    what = f"{_host(base_url)}/{repo}@{digest}"
    head = _http.request("HEAD", f"{base_url}/v2/{repo}/blobs/{digest}", headers=_headers(auth_header))
    if head.status == 200:
        return digest
    start = _http.request("POST", f"{base_url}/v2/{repo}/blobs/uploads/", headers=_headers(auth_header))
    if start.status != 202:
        raise _fail(base_url, start, what, repo)
    location = start.headers.get("Location", "")
    if location.startswith("/"):
        location = base_url + location
    sep = "&" if "?" in location else "?"
    put = _http.request(
        "PUT",
        f"{location}{sep}digest={digest}",
        body=data,
        headers=_headers(
            auth_header, {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        ),
    )
    if put.status != 201:
        raise _fail(base_url, put, what, repo)
    return digest


def push_manifest(
    base_url: str, repo: str, reference: str, raw: bytes, media_type: str, *, auth_header: str | None = None
) -> Digest:
    """PUT a manifest or index under a tag or digest. Returns the digest of ``raw``."""
    base_url = base_url.rstrip("/")
    digest = Digest.from_bytes(raw)
    resp = _http.request(
        "PUT",
        f"{base_url}/v2/{repo}/manifests/{reference}",
        body=raw,
        headers=_headers(auth_header, {"Content-Type": media_type}),
    )
    if resp.status != 201:
        raise _fail(base_url, resp, f"{_host(base_url)}/{repo}:{reference}", repo)
    answered = resp.headers.get("Docker-Content-Digest")
    if answered and answered != str(digest):
        raise UnavailableError(
            f"{_host(base_url)}/{repo}:{reference}: registry stored {answered}, pushed {digest}"
        )
    return digest


# -- htpasswd ------------------------------------------------------------------------------------------------


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    """Append a bcrypt ``user:hash`` line to ``path`` (distribution accepts only bcrypt).

    Uses ``htpasswd -Bbn`` (Debian apache2-utils) when present, else the ``bcrypt`` Python package.
    """
    path = Path(path)
    tool = shutil.which("htpasswd")
    if tool:
        out = subprocess.run(
            [tool, "-Bbn", user, password], check=True, capture_output=True, text=True, timeout=30
        ).stdout
        line = out.strip().splitlines()[0]
    else:
        try:
            bcrypt: Any = importlib.import_module("bcrypt")
        except ImportError:
            raise NotFoundError(
                "make_htpasswd: neither `htpasswd` (Debian apache2-utils) nor the Python bcrypt package "
                "is installed"
            ) from None
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
        line = f"{user}:{hashed}"
    with open(path, "a") as f:
        f.write(line + "\n")
    return path
