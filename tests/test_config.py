"""The TOML config: runtime handlers' snapshotters, and errors that name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cargohold.client import Client
from cargohold.config import DEFAULT_SANDBOX_IMAGE, Config, find_config, load_config, parse_size
from cargohold.devtools import samples
from cargohold.errors import InvalidArgumentError
from support.cli import cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_runtime_handlers_map_to_snapshotters(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
snapshotter = "overlayfs"
disable_snapshot_annotations = true

[runtimes.runc]

[runtimes.kata]
snapshotter = "native"
"""))
    assert config.snapshotter_for("kata") == "native"
    assert config.snapshotter_for("runc") == "overlayfs"  # a handler without one uses the default
    assert config.snapshotter_for("") == config.snapshotter_for("unknown") == "overlayfs"
    assert config.disable_snapshot_annotations and config.sandbox_image == DEFAULT_SANDBOX_IMAGE
    assert find_config(None, tmp_path) == config
    assert find_config(None, tmp_path / "elsewhere") == Config()


@pytest.mark.parametrize(("text", "message"), [
    ("snaphotter = 'native'\n", r"unknown key\(s\) snaphotter"),
    ("[runtimes.kata]\nsnapshoter = 'native'\n", r"\[runtimes.kata\]: unknown key\(s\) snapshoter"),
    ("[runtimes]\nkata = 'native'\n", r"\[runtimes.kata\]: not a table"),
    ("disable_snapshot_annotations = 'yes'\n", "disable_snapshot_annotations must be true or false"),
    ("max_concurrent_downloads = 0\n", "max_concurrent_downloads must be an integer from 1 to 64"),
    ("[snapshotters.stargz]\nremote = true\n", r"\[snapshotters.stargz\]: address .* is required"),
    ("snapshotter = \n", "config .*config.toml: "),
    ("[snapshotters.s]\naddress = '/x'\nremote = 'yes'\n", "remote must be true or false"),
    ("[snapshotters.s]\naddress = '/x'\nnamespaced_keys = 1\n", "namespaced_keys must be true or false"),
    ("[snapshotters.s]\naddress = '/x'\ntype = 'native'\n", "type must be \"proxy\""),
    ("snapshotter = 3\n", "snapshotter must be a string"),
    ("runtimes = 'x'\n", "runtimes must be a table"),
    ("max_layer_size = 'lots'\n", "max_layer_size: 'lots' is not a size"),
    ("max_unpacked_size = '0MiB'\n", "max_unpacked_size: '0MiB': a size must be at least 1 byte"),
    ("max_unpacked_size = true\n", "max_unpacked_size must be a size"),
])
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgumentError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1.5 GiB", 3 << 29), ("64k", 64000),
])
def test_layer_limits_parse_sizes(tmp_path: Path, text: str, size: int) -> None:
    config = load_config(write(tmp_path, f"max_layer_size = '{text}'\nmax_unpacked_size = {size}\n"))
    assert (config.max_layer_size, config.max_unpacked_size) == (size, size)
    assert parse_size(text) == size
    assert (Config().max_layer_size, Config().max_unpacked_size) == (None, None)  # off by default


def test_explicit_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="no such file"):
        find_config(tmp_path / "missing.toml", tmp_path)


FULL = """
snapshotter = "native"
disable_snapshot_annotations = true
sandbox_image = "127.0.0.1:1/pause:3.10"
max_concurrent_downloads = 5

[registry]
config_path = "/etc/containerd/certs.d"

[runtimes.runc]
snapshotter = "overlayfs"

[runtimes.kata]
snapshotter = "stargz"

[runtimes.plain]

[snapshotters.stargz]
address = "/run/stargz.sock"
remote = true
"""


def test_full_config_parses(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(FULL)
    cfg = load_config(path)
    assert cfg.snapshotter == "native"
    assert cfg.disable_snapshot_annotations is True
    assert cfg.sandbox_image == "127.0.0.1:1/pause:3.10"
    assert cfg.max_concurrent_downloads == 5
    assert cfg.registry_config_path == "/etc/containerd/certs.d"
    assert cfg.snapshotter_for("runc") == "overlayfs"
    assert cfg.snapshotter_for("kata") == "stargz"
    # A handler without a snapshotter, an unknown handler and the default handler use the default.
    assert cfg.snapshotter_for("plain") == "native"
    assert cfg.snapshotter_for("nosuch") == "native"
    assert cfg.snapshotter_for("") == "native"
    assert cfg.snapshotters["stargz"].address == "/run/stargz.sock"
    assert cfg.snapshotters["stargz"].remote is True
    assert cfg.snapshotters["stargz"].namespaced_keys is True  # a remote proxy's default
    assert cfg.path == path


@pytest.mark.parametrize(("extra", "expected"), [
    ("", False), ("remote = true\n", True), ("remote = true\nnamespaced_keys = false\n", False),
    ("namespaced_keys = true\n", True),
])
def test_namespaced_keys_default_to_remote(tmp_path: Path, extra: str, expected: bool) -> None:
    cfg = load_config(write(tmp_path, f"[snapshotters.s]\naddress = '/x'\n{extra}"))
    assert cfg.snapshotters["s"].namespaced_keys is expected


def test_client_reads_root_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "config.toml").write_text(
        "snapshotter = 'native'\nmax_concurrent_downloads = 7\n[registry]\nconfig_path = '/tmp/certs.d'\n")
    client = Client(root)
    assert client.default_snapshotter == "native"
    assert client.snapshotter().name == "native"
    assert client.max_concurrent_downloads == 7
    assert client.hosts_dir == Path("/tmp/certs.d")
    # Arguments win over the file.
    explicit = Client(root, default_snapshotter="overlayfs", max_concurrent_downloads=2, hosts_dir="/h")
    assert (explicit.default_snapshotter, explicit.max_concurrent_downloads, explicit.hosts_dir) == (
        "overlayfs", 2, Path("/h"))


def test_cli_config_option_and_errors(registry, tmp_path: Path) -> None:
    img = samples.build_image([samples.small_base_layer()])
    samples.push(registry.url, "cfg/app", "v1", img)
    root = tmp_path / "root"
    cfg = tmp_path / "c.toml"
    cfg.write_text("snapshotter = 'native'\n")
    proc = cli(root, "--config", str(cfg), "pull", f"{registry.host}/cfg/app:v1", "--output", "json", check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["unpack"]["snapshotter"] == "native"

    cfg.write_text("snapshoter = 'native'\n")
    bad = cli(root, "--config", str(cfg), "images", "ls", check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("cargohold: error: config ")
    assert "unknown key(s) snapshoter" in bad.stderr

    missing = cli(root, "--config", str(tmp_path / "nope.toml"), "images", "ls", check=False)
    assert missing.returncode == 2
    assert "no such file" in missing.stderr
