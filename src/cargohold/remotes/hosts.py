"""Which hosts serve a registry namespace: containerd's ``hosts.toml`` directory format.

``--hosts-dir DIR`` holds ``DIR/<host>/hosts.toml`` (``<host>`` may carry a port: ``myregistry:5000``, or
containerd's ``myregistry_5000_``), with ``DIR/_default/hosts.toml`` as the fallback. A file lists mirrors as
``[host."https://mirror"]`` tables, tried first in file order, then ``server`` (default: the registry
itself). A directory without ``hosts.toml`` still contributes Docker-style certificates (``*.crt`` CAs,
``*.cert``/``*.key`` client pairs) to the default host.
"""

from __future__ import annotations

import ipaddress
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from cargohold.errors import InvalidArgumentError

log = logging.getLogger(__name__)

ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryHost:
    """One endpoint that may serve a registry namespace (the registry itself or a mirror).

    ``namespace`` is the registry host of the image reference (``docker.io``, ``127.0.0.1:5000``);
    ``host`` is this endpoint's ``host[:port]``. A mirror (``is_mirror``) gets ``?ns=<namespace>`` on its
    requests, as containerd does. ``client`` holds (certificate, key) pairs; a key of None means the key
    is inside the certificate file.
    """

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool = False
    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    is_mirror: bool = False
    namespace: str = ""

    def __hash__(self) -> int:
        return hash((self.scheme, self.host, self.path, self.namespace))

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def url(self, suffix: str) -> str:
        """The URL of ``<path>/<suffix>`` on this host, with ``ns=`` for mirrors."""
        url = f"{self.base_url}{self.path.rstrip('/')}/{suffix.lstrip('/')}"
        if self.is_mirror and self.namespace:
            url += ("&" if "?" in url else "?") + "ns=" + quote(self.namespace, safe=":")
        return url

    def describe(self) -> str:
        kind = "mirror" if self.is_mirror else "registry"
        return f"{kind} {self.base_url}{self.path}"


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1, with or without a port."""
    name = _hostname(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def default_host(namespace: str, *, plain_http: bool = False) -> RegistryHost:
    """The registry itself: https, or http for loopback hosts and with ``plain_http``."""
    host = DOCKER_HUB_API if namespace == DOCKER_HUB else namespace
    scheme = "http" if plain_http or is_loopback(host) else "https"
    return RegistryHost(scheme=scheme, host=host, namespace=namespace)


def host_dir_candidates(hosts_dir: Path, namespace: str) -> list[Path]:
    """Directories consulted for ``namespace``, in containerd's order."""
    names: list[str] = []
    name, sep, port = namespace.rpartition(":")
    if sep and port.isdigit() and not namespace.endswith("]"):
        names.append(f"{name}_{port}_")
    names.append(namespace)
    names.append("_default")
    return [hosts_dir / n for n in names]


def registry_hosts(
    namespace: str, *, hosts_dir: Path | None = None, plain_http: bool = False
) -> list[RegistryHost]:
    """The ordered hosts for a registry namespace: configured mirrors first, then the server."""
    if hosts_dir is not None:
        for directory in host_dir_candidates(Path(hosts_dir), namespace):
            toml_path = directory / "hosts.toml"
            if toml_path.is_file():
                hosts = load_hosts_toml(toml_path, namespace, plain_http=plain_http)
                log.debug("%s: hosts from %s: %s", namespace, toml_path, [h.describe() for h in hosts])
                return hosts
            if directory.is_dir() and directory.name != "_default":
                host = _with_docker_certs(default_host(namespace, plain_http=plain_http), directory)
                log.debug("%s: certificates from %s", namespace, directory)
                return [host]
    return [default_host(namespace, plain_http=plain_http)]


def _with_docker_certs(host: RegistryHost, directory: Path) -> RegistryHost:
    """Docker's certs.d pattern: ``*.crt`` are CAs, ``X.cert`` + ``X.key`` are client pairs."""
    cas = tuple(sorted(directory.glob("*.crt")))
    clients: list[tuple[Path, Path | None]] = []
    for cert in sorted(directory.glob("*.cert")):
        key = cert.with_suffix(".key")
        if not key.is_file():
            raise InvalidArgumentError(f"{cert}: client certificate without its key {key.name}")
        clients.append((cert, key))
    return RegistryHost(
        scheme=host.scheme,
        host=host.host,
        path=host.path,
        capabilities=host.capabilities,
        ca=cas,
        client=tuple(clients),
        namespace=host.namespace,
    )


def load_hosts_toml(path: Path, namespace: str, *, plain_http: bool = False) -> list[RegistryHost]:
    """Parse one ``hosts.toml`` for ``namespace``."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgumentError(f"{path}: cannot read hosts config: {exc}") from None
    base = path.parent
    hosts: list[RegistryHost] = []
    tables = doc.get("host", {})
    if not isinstance(tables, dict):
        raise InvalidArgumentError(f'{path}: [host] must be a table of "scheme://host" tables')
    for url, table in tables.items():
        if not isinstance(table, dict):
            raise InvalidArgumentError(f"{path}: host {url!r}: must be a table")
        hosts.append(_parse_host(path, base, url, table, namespace, plain_http=plain_http))
    server = doc.get("server")
    if server is not None:
        if not isinstance(server, str) or not server:
            raise InvalidArgumentError(f"{path}: server must be a URL string")
        hosts.append(_parse_host(path, base, server, doc, namespace, plain_http=plain_http, server=True))
    else:
        dflt = default_host(namespace, plain_http=plain_http)
        hosts.append(
            _parse_host(
                path, base, f"{dflt.scheme}://{dflt.host}", doc, namespace, plain_http=plain_http, server=True
            )
        )
    return hosts


def _parse_host(
    path: Path,
    base: Path,
    url: str,
    table: Mapping[str, Any],
    namespace: str,
    *,
    plain_http: bool,
    server: bool = False,
) -> RegistryHost:
    where = f"{path}: {'server' if server else 'host'} {url!r}"
    if "://" not in url:
        url = ("http://" if plain_http or is_loopback(url.split("/", 1)[0]) else "https://") + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgumentError(f"{where}: want http(s)://host[:port][/path]")
    override = _bool(table.get("override_path", False), where, "override_path")
    url_path = parts.path.rstrip("/")
    if override:
        api_path = url_path or "/"
    elif url_path.endswith("/v2"):
        api_path = url_path
    else:
        api_path = url_path + "/v2"
    caps = table.get("capabilities")
    if caps is None:
        capabilities = ALL_CAPABILITIES
    else:
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise InvalidArgumentError(f"{where}: capabilities must be a list of strings")
        unknown = set(caps) - ALL_CAPABILITIES
        if unknown:
            raise InvalidArgumentError(f"{where}: unknown capabilities {sorted(unknown)}")
        capabilities = frozenset(caps)
    hostport = parts.netloc
    return RegistryHost(
        scheme=parts.scheme,
        host=hostport,
        path=api_path,
        capabilities=capabilities,
        skip_verify=_bool(table.get("skip_verify", False), where, "skip_verify"),
        ca=_paths(table.get("ca"), base, where),
        client=_clients(table.get("client"), base, where),
        headers=_headers(table.get("header"), where),
        is_mirror=hostport != namespace and not (namespace == DOCKER_HUB and hostport == DOCKER_HUB_API),
        namespace=namespace,
    )


def _bool(value: Any, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{where}: {key} must be true or false")
    return value


def _path(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{where}: certificate paths must be non-empty strings")
    p = Path(value)
    return p if p.is_absolute() else base / p


def _paths(value: Any, base: Path, where: str) -> tuple[Path, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_path(value, base, where),)
    if isinstance(value, list):
        return tuple(_path(v, base, where) for v in value)
    raise InvalidArgumentError(f"{where}: ca must be a path or a list of paths")


def _clients(value: Any, base: Path, where: str) -> tuple[tuple[Path, Path | None], ...]:
    """``client``: a path, a list of paths, or a list of [cert, key] pairs (key "" = inside the cert)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidArgumentError(f"{where}: client must be a path, a list of paths or of [cert, key] pairs")
    out: list[tuple[Path, Path | None]] = []
    for item in items:
        if isinstance(item, str):
            out.append((_path(item, base, where), None))
        elif isinstance(item, list) and 1 <= len(item) <= 2:
            key = item[1] if len(item) == 2 else ""
            out.append((_path(item[0], base, where), _path(key, base, where) if key else None))
        else:
            raise InvalidArgumentError(f"{where}: client entry {item!r}: want a path or [cert, key]")
    return tuple(out)


def _headers(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{where}: [header] must be a table")
    out: dict[str, tuple[str, ...]] = {}
    for key, item in value.items():
        if isinstance(item, str):
            out[key] = (item,)
        elif isinstance(item, list) and all(isinstance(v, str) for v in item):
            out[key] = tuple(item)
        else:
            raise InvalidArgumentError(f"{where}: header {key!r} must be a string or a list of strings")
    return out
