"""`cargohold` commands: archive. Never import ``cargohold.cli.main`` here (it runs as __main__)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

import click

from cargohold.cli.common import State, output_option, pass_state, unpack_json, with_platforms
from cargohold.cli.output import emit_json, human_size, plural
from cargohold.cli.progress import ProgressRenderer


@click.command("export")
@click.argument("out", metavar="OUT.tar")
@click.argument("images", nargs=-1, required=True)
@with_platforms
@click.option("--fetch-missing", is_flag=True,
              help="Fetch blobs missing from the store from the image's registry first.")
@output_option
@pass_state
def export_cmd(state: State, out: str, images: tuple[str, ...], platforms: tuple[str, ...], all_platforms: bool,
               fetch_missing: bool, output: str) -> None:
    """Write IMAGEs into one tar (OCI layout + docker manifest.json) at OUT.tar, or stdout for '-'."""
    to_stdout = out == "-"
    if to_stdout and output == "json":
        raise click.UsageError("--output json needs a file: stdout carries the archive")
    if to_stdout and sys.stdout.isatty():
        raise click.UsageError("refusing to write an archive to a terminal; redirect stdout or name a file")
    with ProgressRenderer(quiet=output == "json") as progress:
        client = state.client(on_event=progress)
        target: Path | BinaryIO = sys.stdout.buffer if to_stdout else Path(out)
        result = client.export(target, images, platforms=platforms, all_platforms=all_platforms,
                               fetch_missing=fetch_missing)
    if output == "json":
        emit_json({
            "path": result.path,
            "size": result.size,
            "images": [{"name": i.name, "digest": str(i.target.digest), "media_type": i.target.media_type,
                        "manifests": [str(m.digest) for m in i.manifests]} for i in result.images],
            "blobs": [str(b.digest) for b in result.blobs],
            "fetched": [str(b.digest) for b in result.fetched],
        })
    elif not to_stdout:
        for i in result.images:
            click.echo(f"{i.name}: {i.target.digest}")
        fetched = f" ({plural(len(result.fetched), 'blob')} fetched)" if result.fetched else ""
        click.echo(f"exported {plural(len(result.images), 'image')}, {plural(len(result.blobs), 'blob')}, "
                   f"{human_size(result.size)} to {result.path}{fetched}")


@click.command("import")
@click.argument("archive")
@with_platforms
@click.option("--no-unpack", is_flag=True, help="Store the content only; do not unpack.")
@click.option("--snapshotter", default=None, help="Snapshotter to unpack into (default: the root's default).")
@click.option("--index-name", default=None, metavar="NAME", help="Also record the whole archive index as NAME.")
@click.option("--base-name", default=None, metavar="NAME",
              help="Name for images whose ref.name annotation is a bare tag (NAME:TAG). Default: import-<date>.")
@click.option("--digests", is_flag=True, help="Also record each image as <base>@<digest>.")
@output_option
@pass_state
def import_cmd(state: State, archive: str, platforms: tuple[str, ...], all_platforms: bool, no_unpack: bool,
               snapshotter: str | None, index_name: str | None, base_name: str | None, digests: bool,
               output: str) -> None:
    """Import images from ARCHIVE (a tar or tar.gz; '-' for stdin): OCI layouts and docker save archives."""
    with ProgressRenderer(quiet=output == "json") as progress:
        client = state.client(on_event=progress)
        source: Path | BinaryIO = sys.stdin.buffer if archive == "-" else Path(archive)
        result = client.import_archive(source, platforms=platforms, all_platforms=all_platforms,
                                       unpack=not no_unpack, snapshotter=snapshotter, index_name=index_name,
                                       base_name=base_name, digests=digests)
    if output == "json":
        emit_json({
            "format": result.format,
            "index": str(result.index.digest),
            "images": [{"name": i.name, "digest": str(i.target.digest), "media_type": i.target.media_type,
                        "labels": dict(i.labels)} for i in result.images],
            "committed": [str(d) for d in result.committed],
            "present": [str(d) for d in result.present],
            "reused": [str(d) for d in result.reused],
            "unpack": [unpack_json(u) for u in result.unpack],
        })
        return
    for i in result.images:
        click.echo(f"{i.name}: {i.target.digest}")
    click.echo(f"imported {plural(len(result.images), 'name')} ({result.format} archive): "
               f"{plural(len(result.committed), 'blob')} stored, {len(result.present)} already present, "
               f"{plural(len(result.reused), 'layer')} reused")
    for u in result.unpack:
        click.echo(f"unpacked into {u.snapshotter}: {u.chain_id} ({plural(u.unpacked, 'layer')} applied, "
                   f"{len(u.layers) - u.unpacked} reused)")

