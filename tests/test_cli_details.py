"""Small things users see: sizes, lists without duplicates, readable labels, help text, image naming."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from click.testing import CliRunner
from tests.support.cli import cli

from cargohold.cli.main import cli as cli_group
from cargohold.devtools import samples
from cargohold.devtools.registry import RegistryProcess


def _image(registry: RegistryProcess, repo: str) -> tuple[str, samples.SampleImage]:
    """An image whose first layer comes again on top (the same blob twice in the manifest)."""
    base = samples.small_base_layer()
    img = samples.build_image([base, samples.files_layer({"etc/app": b"v1\n"}), base])
    samples.push(registry.url, repo, "v1", img)
    return f"{registry.host}/{repo}:v1", img


def test_sizes_present_and_labels(tmp_path: Path, registry: RegistryProcess) -> None:
    ref, img = _image(registry, "details/app")
    root = tmp_path / "root"
    cli(root, "pull", "--snapshotter", "native", ref)
    again = json.loads(cli(root, "pull", "--snapshotter", "native", "-o", "json", ref).stdout)
    blobs = list({b.digest: b for b in [img.manifest, img.config, *img.layers]}.values())
    assert sorted(again["present"]) == sorted(str(b.digest) for b in blobs)  # each blob once
    assert again["fetched"] == []

    listed = json.loads(cli(root, "images", "ls", "-o", "json").stdout)
    assert [i["size"] for i in listed] == [sum(len(b.data) for b in blobs)]  # the image, not its manifest

    # A blob from two repositories: its source label's value holds a comma and is shown quoted.
    samples.push(registry.url, "details/other", "v1", img)
    cli(root, "pull", "--snapshotter", "native", f"{registry.host}/details/other:v1")
    table = cli(root, "content", "ls").stdout
    layer_row = next(line for line in table.splitlines() if line.startswith(str(img.layers[0].digest)))
    assert f'containerd.io/distribution.source.{registry.host}="details/app,details/other"' in layer_row


def test_copy_to_local_names_the_image_like_every_verb(tmp_path: Path, registry: RegistryProcess) -> None:
    ref, _ = _image(registry, "details/copy")
    root = tmp_path / "root"
    cli(root, "copy", ref, "local:mine")
    names = [i["name"] for i in json.loads(cli(root, "images", "ls", "-o", "json").stdout)]
    assert names == ["docker.io/library/mine:latest"]
    cli(root, "images", "tag", "mine", "yours")  # the short names of other verbs find it, by the same rule
    cli(root, "images", "rm", "docker.io/library/yours:latest")


def _commands(cmd: click.Command, path: list[str]) -> list[list[str]]:
    out = [path]
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):  # the lazily imported commands too
            sub = cmd.get_command(ctx, name)
            assert sub is not None, [*path, name]
            out += _commands(sub, [*path, name])
    return out


def test_help_has_no_markup_and_every_option_of_mount_and_rootfs_is_explained() -> None:
    runner = CliRunner()
    for path in _commands(cli_group, []):
        text = runner.invoke(cli_group, [*path, "--help"]).output
        assert "``" not in text and ":func:" not in text, path
    for name in ("mount", "rootfs"):
        command = cli_group.commands[name]
        assert all(p.help for p in command.params if isinstance(p, click.Option)), name


def test_shell_completion_as_documented(tmp_path: Path) -> None:
    env = {**os.environ, "_CARGOHOLD_COMPLETE": "bash_source"}
    script = cli(tmp_path / "root", env=env)
    assert "_cargohold_completion" in script.stdout and script.stderr == ""
    env = {**os.environ, "_CARGOHOLD_COMPLETE": "bash_complete", "COMP_WORDS": "cargohold ima", "COMP_CWORD": "1"}
    assert cli(tmp_path / "root", env=env).stdout.split() == ["plain,images"]
    assert not (tmp_path / "root").exists()
