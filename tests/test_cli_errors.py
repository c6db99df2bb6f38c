"""What a user sees when something is wrong: one ``cargohold: error:`` line naming the thing, the documented exit
status (1 failed, 2 bad input), never a traceback; read-only commands never create a data root."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from tests.support.cli import cargohold_cmd, cli

from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess


def _one_error(proc: subprocess.CompletedProcess[str], status: int, *needles: str) -> None:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("cargohold: error: ")]
    assert len(errors) == 1, proc.stderr
    assert errors == [line for line in lines if "error" in line.lower()], "the error is printed once"
    for needle in needles:
        assert needle in errors[0]


@pytest.mark.parametrize("args, needle", [
    (["pul", "x"], "No such command 'pul'"),
    (["pull"], "Missing argument 'REF'"),
    (["pull", "--bogus-option", "x"], "--bogus-option"),
    (["pull", "--platform", "bogus", "x"], "invalid platform 'bogus'"),
    (["images", "inspect", "--platform", "linux/nonsense", "x"], "invalid platform 'linux/nonsense'"),
    (["serve", "cri", "--socket", "/tmp/" + "s" * 120], "at most 107"),
])
def test_usage_errors_exit_2_with_our_prefix(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = cli(tmp_path / "root", *args, check=False)
    _one_error(proc, 2, needle)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("args", [["images", "ls"], ["content", "ls"], ["snapshots", "ls"], ["images", "check"]])
def test_read_only_commands_do_not_create_the_root(tmp_path: Path, args: list[str]) -> None:
    root = tmp_path / "never"
    proc = cli(root, *args, check=False)
    _one_error(proc, 1, f"data root {root} does not exist (nothing pulled yet?)")
    assert not root.exists()


def test_registry_error_is_printed_once(tmp_path: Path, registry: RegistryProcess) -> None:
    samples.push(registry.url, "once/app", "v1", samples.build_image([samples.small_base_layer()]))
    proc = cli(tmp_path / "root", "pull", f"{registry.host}/once/app:missing", check=False)
    _one_error(proc, 1, "once/app:missing", "MANIFEST_UNKNOWN")


def test_unwritable_roots_name_the_path(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_error(cli(afile, "images", "tag", "a", "b", check=False), 2, f"'{afile}' is a file")
    _one_error(cli(afile / "sub", "images", "tag", "a", "b", check=False), 1, f"cannot create data root {afile}")

    # Another user's root: run as nobody (the test runs as root), in a directory nobody may enter.
    base = Path(tempfile.mkdtemp(prefix="cargohold-owned-", dir="/tmp"))
    os.chmod(base, 0o755)
    root = base / "owned"
    cli(root, "gc")
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    proc = subprocess.run([*nobody, *cargohold_cmd(root, "images", "tag", "a", "b")], text=True,
                          capture_output=True, timeout=60)
    _one_error(proc, 1, f"data root {root} is not writable (permission denied)")
    proc = subprocess.run([*nobody, *cargohold_cmd(root, "images", "ls")], text=True, capture_output=True,
                          timeout=60)
    _one_error(proc, 1, f"{root}/metadata.db")
    shutil.rmtree(base)


def test_read_only_file_system_root(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        _one_error(cli(ro, "images", "tag", "a", "b", check=False), 1,
                   f"data root {ro} is not writable (read-only file system)")
        _one_error(cli(ro / "x", "gc", check=False), 1, f"cannot create data root {ro / 'x'}: Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_unmount_of_something_not_mounted_fails(tmp_path: Path) -> None:
    target = tmp_path / "nothing"
    target.mkdir()
    cli(tmp_path / "root", "gc")
    _one_error(cli(tmp_path / "root", "unmount", str(target), check=False), 1, f"{target}: not mounted")


def test_bad_archive_is_exit_2_whatever_is_wrong(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all\n" * 100)
    _one_error(cli(tmp_path / "root", "import", str(garbage), check=False), 2, str(garbage))
    empty = tmp_path / "empty.tar"
    subprocess.run(["tar", "cf", str(empty), "--files-from", "/dev/null"], check=True)
    _one_error(cli(tmp_path / "root", "import", str(empty), check=False), 2, str(empty))
