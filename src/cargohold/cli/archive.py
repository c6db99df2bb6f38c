"""`cargohold` commands: archive. Never import ``cargohold.cli.main`` here (it runs as __main__)."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group (and to its subgroups, e.g. ``cli.commands["snapshots"]``)."""
