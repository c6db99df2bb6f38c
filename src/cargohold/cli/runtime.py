"""`cargohold` commands: runtime."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
