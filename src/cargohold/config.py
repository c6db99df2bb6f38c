"""cargohold's configuration file (TOML), read by every command from ``--config FILE`` or ``ROOT/config.toml``.

::

    snapshotter = "overlayfs"              # default snapshotter ("" = overlayfs where the kernel has it)
    disable_snapshot_annotations = false   # true: no per-layer cri.* labels on snapshots
    sandbox_image = "registry.k8s.io/pause:3.10"
    max_concurrent_downloads = 3
    lock_timeout = 30                      # seconds to wait for another process's write on metadata.db
    stall_timeout = 15                     # seconds without data before a download says so and reconnects
    fetch_timeout = 120                    # seconds without any progress before a download gives up
    max_layer_size = "1GiB"                # refuse (before fetching) a layer blob larger than this; off by default
    max_unpacked_size = "8GiB"             # stop a layer inflating past this many uncompressed bytes; off by default

    [registry]
    config_path = "/etc/containerd/certs.d"   # <host>/hosts.toml mirrors, as containerd

    [runtimes.kata]
    snapshotter = "stargz"                 # runtime handler -> snapshotter

    [snapshotters.stargz]                  # a proxy snapshotter: containerd's snapshots gRPC API
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
    remote = true                          # lazy: layers are fetched on demand, never force-fed
    namespaced_keys = true                 # keys "<namespace>/<key>" on the wire (default: = remote)

Unknown keys are errors that name the file and the key, so a typo never silently changes nothing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cargohold.errors import InvalidArgumentError
from cargohold.metadata.db import DEFAULT_LOCK_TIMEOUT
from cargohold.remotes.timeouts import DEFAULT_FETCH_TIMEOUT, DEFAULT_STALL_TIMEOUT

CONFIG_NAME = "config.toml"
DEFAULT_SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeConfig:
    """One runtime handler (``[runtimes.NAME]``)."""

    name: str
    snapshotter: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotterConfig:
    """A snapshotter served over containerd's snapshots gRPC API (``[snapshotters.NAME]``)."""

    name: str
    address: str
    remote: bool = False
    namespaced_keys: bool = False
    """Prefix keys with the namespace on the wire (for daemons that ignore the namespace header, as stargz
    does); by default on for ``remote`` snapshotters."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    snapshotter: str = ""
    disable_snapshot_annotations: bool = False
    sandbox_image: str = DEFAULT_SANDBOX_IMAGE
    max_concurrent_downloads: int = 3
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    registry_config_path: str = ""
    max_layer_size: int | None = None
    max_unpacked_size: int | None = None
    runtimes: Mapping[str, RuntimeConfig] = field(default_factory=dict)
    snapshotters: Mapping[str, SnapshotterConfig] = field(default_factory=dict)
    path: Path | None = None

    def snapshotter_for(self, runtime_handler: str) -> str:
        """The snapshotter of a runtime handler; "" (the default) for an unknown or empty handler.

        An unknown handler is not an error here: kubelet sends "" for the default runtime, and the runtime
        service, not the image service, refuses unknown handlers.
        """
        runtime = self.runtimes.get(runtime_handler) if runtime_handler else None
        if runtime is not None and runtime.snapshotter:
            return runtime.snapshotter
        return self.snapshotter


_TOP_KEYS = {"snapshotter", "disable_snapshot_annotations", "sandbox_image", "max_concurrent_downloads",
             "lock_timeout", "stall_timeout", "fetch_timeout", "max_layer_size", "max_unpacked_size",
             "registry", "runtimes", "snapshotters"}


def load_config(path: Path | str) -> Config:
    """Parse a config file; InvalidArgumentError names the file and the key at fault."""
    where = Path(path)
    try:
        data = tomllib.loads(where.read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"config {where}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"config {where}: {exc}") from None
    return parse_config(data, where)


def parse_config(data: Mapping[str, Any], where: Path | None = None) -> Config:
    label = f"config {where}" if where else "config"
    _known(data, _TOP_KEYS, label)
    registry = _table(data, "registry", label)
    _known(registry, {"config_path"}, f"{label}: [registry]")
    runtimes: dict[str, RuntimeConfig] = {}
    for name, value in _table(data, "runtimes", label).items():
        section = f"{label}: [runtimes.{name}]"
        if not isinstance(value, dict):
            raise InvalidArgumentError(f"{section}: not a table")
        _known(value, {"snapshotter"}, section)
        runtimes[name] = RuntimeConfig(name=name, snapshotter=_str(value, "snapshotter", section))
    snapshotters: dict[str, SnapshotterConfig] = {}
    for name, value in _table(data, "snapshotters", label).items():
        section = f"{label}: [snapshotters.{name}]"
        if not isinstance(value, dict):
            raise InvalidArgumentError(f"{section}: not a table")
        _known(value, {"address", "remote", "namespaced_keys", "type"}, section)
        if value.get("type", "proxy") != "proxy":
            raise InvalidArgumentError(f"{section}: type must be \"proxy\", not {value['type']!r}")
        address = _str(value, "address", section)
        if not address:
            raise InvalidArgumentError(f"{section}: address (the snapshotter's unix socket) is required")
        remote = _bool(value, "remote", section)
        namespaced = _bool(value, "namespaced_keys", section) if "namespaced_keys" in value else remote
        snapshotters[name] = SnapshotterConfig(name=name, address=address, remote=remote,
                                               namespaced_keys=namespaced)
    downloads = data.get("max_concurrent_downloads", 3)
    if not isinstance(downloads, int) or isinstance(downloads, bool) or not 1 <= downloads <= 64:
        raise InvalidArgumentError(f"{label}: max_concurrent_downloads must be an integer from 1 to 64")
    return Config(
        snapshotter=_str(data, "snapshotter", label),
        disable_snapshot_annotations=_bool(data, "disable_snapshot_annotations", label),
        sandbox_image=_str(data, "sandbox_image", label) or DEFAULT_SANDBOX_IMAGE,
        max_concurrent_downloads=downloads,
        lock_timeout=_seconds(data, "lock_timeout", DEFAULT_LOCK_TIMEOUT, 0, label),
        stall_timeout=_seconds(data, "stall_timeout", DEFAULT_STALL_TIMEOUT, 0.1, label),
        fetch_timeout=_seconds(data, "fetch_timeout", DEFAULT_FETCH_TIMEOUT, 0.1, label),
        registry_config_path=_str(registry, "config_path", f"{label}: [registry]"),
        max_layer_size=_size(data, "max_layer_size", label),
        max_unpacked_size=_size(data, "max_unpacked_size", label),
        runtimes=runtimes,
        snapshotters=snapshotters,
        path=where,
    )


def find_config(explicit: Path | None, root: Path) -> Config:
    """The config a command runs with: ``explicit`` (must exist), else ``ROOT/config.toml``, else defaults."""
    if explicit is not None:
        return load_config(explicit)
    candidate = root / CONFIG_NAME
    if candidate.is_file():
        return load_config(candidate)
    return Config()


def _known(data: Mapping[str, Any], keys: set[str], label: str) -> None:
    unknown = sorted(set(data) - keys)
    if unknown:
        raise InvalidArgumentError(f"{label}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(keys))})")


def _table(data: Mapping[str, Any], key: str, label: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{label}: {key} must be a table")
    return value


def _str(data: Mapping[str, Any], key: str, label: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{label}: {key} must be a string, not {value!r}")
    return value


def _bool(data: Mapping[str, Any], key: str, label: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{label}: {key} must be true or false, not {value!r}")
    return value


def _seconds(data: Mapping[str, Any], key: str, default: float, least: float, label: str) -> float:
    value = data.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not least <= value <= 86400:
        raise InvalidArgumentError(f"{label}: {key} must be a number of seconds from {least:g} to 86400")
    return float(value)


_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count written as ``512MiB``, ``1.5GB``, ``4096`` (binary and decimal units); ValueError if not."""
    value = text.strip()
    number = value.rstrip("BbIiKkMmGgTt ")
    unit = value[len(number):].strip().upper()
    if unit not in _UNITS or not number:
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 512MiB, 2GB)")
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 512MiB, 2GB)") from None
    size = int(amount * _UNITS[unit])
    if amount < 0 or size < 1:
        raise ValueError(f"{text!r}: a size must be at least 1 byte")
    return size


def _size(data: Mapping[str, Any], key: str, label: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{label}: {key} must be a size such as \"512MiB\", not {value!r}")
    try:
        return parse_size(value)
    except ValueError as exc:
        raise InvalidArgumentError(f"{label}: {key}: {exc}") from None
