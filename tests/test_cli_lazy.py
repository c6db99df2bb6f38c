"""The command line imports a command's module only when that command is used: ``--help`` and completion list
every command from the summaries kept in ``cargohold.cli.main``, which must say what each command's own help
says; a command run loads its own module and no other command's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cargohold.cli.lazy import LazyCommand, LazyGroup
from cargohold.cli.main import LAZY_COMMANDS, LAZY_CONTENT_COMMANDS, LAZY_SNAPSHOTS_COMMANDS, cli
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess
from support.cli import cli as run_cli
from test_second_pull import four_layers, heavy, loaded_modules

TABLES = {(): LAZY_COMMANDS, ("content",): LAZY_CONTENT_COMMANDS, ("snapshots",): LAZY_SNAPSHOTS_COMMANDS}
LAZY = [(path, name, entry) for path, table in TABLES.items() for name, entry in sorted(table.items())]
# The command modules (and the services only they use) that a pull, --help or images ls never needs.
COMMAND_MODULES = ("cargohold.cli.archive", "cargohold.cli.inspect", "cargohold.cli.login",
                   "cargohold.cli.maintenance", "cargohold.cli.push", "cargohold.cli.referrers",
                   "cargohold.cli.runtime")
OTHER_SERVICES = ("cargohold.services.archive", "cargohold.services.copy", "cargohold.services.maintenance",
                  "cargohold.services.push", "cargohold.services.referrers", "cargohold.services.runtime",
                  "cargohold.images.archive_import", "cargohold.images.archive_export")


def _group(path: tuple[str, ...]) -> LazyGroup:
    group: click.Command | None = cli
    for name in path:
        assert isinstance(group, click.Group)
        group = group.get_command(click.Context(group), name)
    assert isinstance(group, LazyGroup)
    return group


@pytest.mark.parametrize(("path", "name", "entry"), LAZY, ids=[" ".join((*p, n)) for p, n, _ in LAZY])
def test_each_summary_is_the_commands_own(path: tuple[str, ...], name: str, entry: LazyCommand) -> None:
    command = entry.load()
    assert command.name == name and not command.hidden  # listed as visible before it is loaded
    first = " ".join((command.help or "").split("\n\n")[0].split())
    assert entry.summary == first
    group = _group(path)
    for limit in (30, 45, 60, 74, 120):  # as --help (its width) and completion (45) shorten it
        assert group._summary(name, limit) in (None, command.get_short_help_str(limit))


def test_every_lazy_command_is_reachable_and_has_help() -> None:
    runner = CliRunner()
    for path, name, _ in LAZY:
        result = runner.invoke(cli, [*path, name, "--help"], prog_name="cargohold")
        assert result.exit_code == 0, (path, name, result.output)
        assert result.output.startswith(f"Usage: cargohold {' '.join((*path, name))} "), result.output


def _help_in_fresh_process(*args: str) -> tuple[str, set[str]]:
    """``cargohold ARGS --help``'s output and the modules it loaded (a new interpreter: nothing preloaded)."""
    code = ("import json, sys\n"
            "from cargohold.cli.main import main\n"
            "try:\n"
            "    main()\n"
            "except SystemExit:\n"
            "    pass\n"
            "sys.stderr.write(json.dumps(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code, *args, "--help"], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("CARGOHOLD_")})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, set(json.loads(proc.stderr))


@pytest.mark.parametrize("path", sorted(TABLES))
def test_help_lists_lazy_commands_without_importing_them(path: tuple[str, ...]) -> None:
    text, modules = _help_in_fresh_process(*path)
    for name in TABLES[path]:
        assert f"\n  {name} " in text, name
    assert heavy(modules, *COMMAND_MODULES, *OTHER_SERVICES) == []


def test_a_lazy_command_runs(tmp_path: Path) -> None:
    # `leases ls` on an empty root: the command is imported, runs, and prints its (empty) table.
    root = tmp_path / "root"
    run_cli(root, "gc")
    assert run_cli(root, "leases", "ls").stdout.split() == ["ID", "PROCESS", "RESOURCES", "CREATED", "EXPIRES"]


def test_pull_loads_no_other_command(registry: RegistryProcess, tmp_path: Path) -> None:
    samples.push(registry.url, "lazy/app", "v1", four_layers())
    ref = f"{registry.host}/lazy/app:v1"
    root = tmp_path / "root"
    run_cli(root, "pull", ref)
    pulled = loaded_modules(tmp_path, "--root", str(root), "pull", ref)
    assert "cargohold.services.pull" in pulled
    assert heavy(pulled, *COMMAND_MODULES, *OTHER_SERVICES) == []
