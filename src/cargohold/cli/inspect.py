"""`cargohold inspect`, `tags`, `digest`: look at a registry without pulling. Never import
``cargohold.cli.main`` here (it runs as __main__)."""

from __future__ import annotations

import sys

import click

from cargohold.cli.common import State, output_option, pass_state
from cargohold.cli.output import emit_json, human_size, show_runtime
from cargohold.errors import FailedPreconditionError
from cargohold.services.inspect import RemoteImage, config_json, entry_json, image_size

_user_option = click.option("--user", "-u", metavar="USER[:PASSWORD]",
                            help="Registry credentials (else ~/.docker/config.json).")


@click.command()
@click.argument("ref")
@click.option("--platform", "platforms", multiple=True, metavar="OS/ARCH[/VARIANT]",
              help="Which manifest of an index to show with its config (default: the host's best match).")
@click.option("--raw", is_flag=True, help="Print the exact bytes of the manifest or index REF names.")
@click.option("--config", "show_config", is_flag=True, help="Print the config JSON (of --platform's manifest "
              "for an index).")
@_user_option
@output_option
@pass_state
def inspect(state: State, ref: str, platforms: tuple[str, ...], raw: bool, show_config: bool, user: str | None,
            output: str) -> None:
    """Show an image on its registry without pulling it, as `skopeo inspect` does: an index with its
    platforms, the manifest with its layers, and the config's runtime settings (entrypoint, cmd, env, working
    directory, user, labels, created). Nothing is written to the store."""
    if raw and show_config:
        raise click.UsageError("--raw and --config print different documents: choose one")
    client = state.client(user=user)
    try:
        image = client.inspect_remote(ref, platforms=platforms)
    finally:
        client.close()
    if raw:
        sys.stdout.buffer.write(image.raw)
        sys.stdout.buffer.flush()
        return
    if show_config:
        if image.config is None:
            raise FailedPreconditionError(f"{image.name}: {_why_no_config(image, platforms)}")
        sys.stdout.buffer.write(image.config_raw)
        sys.stdout.buffer.flush()
        return
    if output == "json":
        emit_json(image.to_json())
        return
    _show(image, platforms)


def _why_no_config(image: RemoteImage, platforms: tuple[str, ...]) -> str:
    if image.manifest is None:
        wanted = ", ".join(platforms) or "this host's platform"
        return f"no manifest of the index matches {wanted}"
    return f"config media type {image.manifest.config.media_type!r} is not an image config"


def _show(image: RemoteImage, platforms: tuple[str, ...]) -> None:
    click.echo(f"name:      {image.name}")
    click.echo(f"digest:    {image.target.digest}")
    click.echo(f"type:      {image.target.media_type}")
    if image.is_index:
        click.echo(f"manifests: {len(image.entries)}")
        for e in image.entries:
            info = entry_json(e)
            what = info.get("platform") or info["kind"]
            if "attests" in info:
                what = f"attestation for {info['attests'] or '(unknown manifest)'}"
            click.echo(f"  {e.digest} {human_size(e.size):>10}  {what}")
        if image.manifest_descriptor is None:
            click.echo(f"(no manifest matches {', '.join(platforms) or 'this host'}; use --platform)")
            return
    manifest, desc = image.manifest, image.manifest_descriptor
    assert manifest is not None and desc is not None
    if image.is_index:
        click.echo(f"manifest:  {desc.digest} ({desc.platform})")
    click.echo(f"config:    {manifest.config.digest} ({manifest.config.media_type})")
    click.echo(f"size:      {human_size(image_size(manifest, desc))}")
    click.echo(f"layers:    {len(manifest.layers)}")
    for i, layer in enumerate(manifest.layers):
        click.echo(f"  {i}: {layer.digest} {human_size(layer.size):>10}  {layer.media_type}")
    if image.config is not None:
        show_runtime(config_json(image.config))


@click.command()
@click.argument("repo")
@click.option("--page-size", type=click.IntRange(1, 10000), default=None, metavar="N",
              help="Tags asked for per request (the whole list is always printed).")
@_user_option
@output_option
@pass_state
def tags(state: State, repo: str, page_size: int | None, user: str | None, output: str) -> None:
    """List the tags of the repository REPO (`host[:port]/path`) on its registry, following its pagination."""
    client = state.client(user=user)
    try:
        found = client.list_tags(repo, page_size=page_size)
    finally:
        client.close()
    if output == "json":
        emit_json(found)
        return
    for tag in found:
        click.echo(tag)


@click.command()
@click.argument("ref")
@_user_option
@output_option
@pass_state
def digest(state: State, ref: str, user: str | None, output: str) -> None:
    """Print the digest REF resolves to on its registry (of the index for a multi-platform image), as
    `crane digest` does. Nothing is fetched but the answer to one HEAD (or GET) request."""
    client = state.client(user=user)
    try:
        desc = client.remote_digest(ref)
    finally:
        client.close()
    if output == "json":
        emit_json({"digest": str(desc.digest), "media_type": desc.media_type, "size": desc.size})
        return
    click.echo(str(desc.digest))
