"""Click groups whose commands from other modules are imported only when one of them is used.

Start-up is most of a short command's time: importing every command module (and through them every service,
archives, push, the CRI server's helpers) costs more than a second ``pull`` does. A ``LazyGroup`` names each
such command's module and keeps its one-line summary, so ``--help`` and shell completion list it without
importing it; running it (or asking for its own help) imports its module. tests/test_cli_lazy.py checks that
every summary is the one its command shows.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from gettext import gettext as _
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem


@dataclass(frozen=True, slots=True, kw_only=True)
class LazyCommand:
    """A command living in ``module`` as the click command ``attribute``."""

    module: str
    attribute: str
    summary: str
    """The first paragraph of the command's help: what ``--help`` and completion show (shortened as click
    shortens it)."""

    def load(self) -> click.Command:
        command = getattr(importlib.import_module(self.module), self.attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"cargohold: {self.module}.{self.attribute} is not a click command")
        return command


class LazyGroup(click.Group):
    """A group of commands defined here (``add_command``, ``@group.command``) and commands imported on first
    use (``lazy``: name -> ``LazyCommand``). Listed in name order, as click lists a group's commands."""

    def __init__(self, *args: Any, lazy: Mapping[str, LazyCommand] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, LazyCommand] = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = self.commands.get(cmd_name)
        if command is None and cmd_name in self.lazy:
            command = self.lazy[cmd_name].load()
            self.commands[cmd_name] = command
        return command

    def _summary(self, name: str, limit: int) -> str | None:
        """The short help of a command not imported yet; None when it is (its own answer then)."""
        if name in self.commands or name not in self.lazy:
            return None
        # A stand-in with the summary as its help shortens it as click shortens the command's own.
        return click.Command(name, help=self.lazy[name].summary).get_short_help_str(limit)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click.Group.format_commands, without importing the commands not loaded yet.
        names = [n for n in self.list_commands(ctx) if n not in self.commands or not self.commands[n].hidden]
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            text = self._summary(name, limit)
            rows.append((name, self.commands[name].get_short_help_str(limit) if text is None else text))
        with formatter.section(_("Commands")):
            formatter.write_dl(rows)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        # click.Group.shell_complete, without importing the commands not loaded yet.
        from click.shell_completion import CompletionItem

        results = []
        for name in self.list_commands(ctx):
            if not name.startswith(incomplete):
                continue
            text = self._summary(name, 45)  # click's default limit of a short help
            if text is None:
                command = self.commands[name]
                if command.hidden:
                    continue
                text = command.get_short_help_str()
            results.append(CompletionItem(name, help=text))
        results.extend(click.Command.shell_complete(self, ctx, incomplete))
        return results
