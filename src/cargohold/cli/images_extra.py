"""`cargohold images prune`, and the columns `images ls` shows for each image. Never import
``cargohold.cli.main`` here (it runs as __main__)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from cargohold.cli.common import State, output_option, pass_state
from cargohold.cli.output import emit_json, human_size, plural

if TYPE_CHECKING:  # only a type here: services.imagelist is loaded by the commands that list images
    from cargohold.services.imagelist import ImageRow


def register(images: click.Group) -> None:
    """Add ``prune`` to the ``images`` group."""
    images.add_command(prune)


def row_json(row: ImageRow) -> dict[str, Any]:
    """The ``images ls --output json`` fields beyond the image record."""
    return {"platforms": list(row.platforms), "attestations": row.attestations, "blob_size": row.blob_size,
            "unpacked_size": row.unpacked_size, "snapshotter": row.snapshotter, "config_created": row.created or None}


def row_cells(row: ImageRow) -> list[str]:
    """PLATFORMS, SIZE, UNPACKED and CREATED of ``images ls``; ``-`` for what the store cannot tell."""
    plats = ",".join(row.platforms) or "-"
    if row.attestations:
        plats += f" (+{plural(row.attestations, 'attestation')})"
    return [plats,
            human_size(row.blob_size) if row.blob_size is not None else "-",
            human_size(row.unpacked_size) if row.unpacked_size is not None else "-",
            row.created or "-"]


@click.command()
@click.option("--all", "-a", "all_images", is_flag=True,
              help="Remove every image no container's rootfs was prepared from, not only dangling ones.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@output_option
@pass_state
def prune(state: State, all_images: bool, dry_run: bool, output: str) -> None:
    """Remove dangling images: those known only by digest (`REPO@sha256:…`, no tag), as `nerdctl image
    prune` does; with --all, every image no container rootfs snapshot uses. Content and snapshots stay until
    `cargohold gc`."""
    client = state.client()
    try:
        result = client.prune_images(all_images=all_images, dry_run=dry_run)
    finally:
        client.close()
    if output == "json":
        emit_json({"dry_run": dry_run, "removed": list(result.removed), "in_use": list(result.in_use)})
        return
    for name in result.removed:
        click.echo(name)
    verb = "would remove" if dry_run else "removed"
    kept = f"; {len(result.in_use)} kept (used by a container)" if result.in_use else ""
    tail = "; run `cargohold gc` to free their content" if result.removed and not dry_run else ""
    click.echo(f"{verb} {plural(len(result.removed), 'image')}{kept}{tail}", err=True)
