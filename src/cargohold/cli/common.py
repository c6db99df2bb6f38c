"""What every command shares: the global state (root, namespace, config), output and platform options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cargohold.client import Client
from cargohold.config import Config
from cargohold.remotes.credentials import credentials_for
from cargohold.unpack.unpacker import UnpackResult

F = TypeVar("F", bound=Callable[..., Any])

output_option = click.option(
    "--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="json: machine-readable output on stdout (no progress).",
)
HOST_DEFAULT = "Platform to use (repeatable). Default: the host's best match."
WHOLE_DEFAULT = ("Only this platform of an index (repeatable): the index goes whole when all of its manifests "
                 "match, else just the best-matching manifest. Default: the whole image.")


def _platforms(whole_by_default: bool) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        f = click.option("--all-platforms", is_flag=True, help="Every platform of an index" + (
            " (the default)." if whole_by_default else "."))(f)
        return click.option("--platform", "platforms", multiple=True, metavar="OS/ARCH[/VARIANT]",
                            help=WHOLE_DEFAULT if whole_by_default else HOST_DEFAULT)(f)

    return decorate


with_platforms = _platforms(whole_by_default=False)
"""``--platform`` (repeatable) and ``--all-platforms``; without them, the host's best match (pull, export…)."""
with_platforms_whole = _platforms(whole_by_default=True)
"""The same options for commands that take the whole image without them (push, copy)."""


class State:
    def __init__(self, root: Path, namespace: str, hosts_dir: Path | None, plain_http: bool, config: Config
                 ) -> None:
        self.root = root
        self.namespace = namespace
        self.hosts_dir = hosts_dir
        self.plain_http = plain_http
        self.config = config

    def client(self, *, user: str | None = None, on_event: Any = None, max_concurrent_downloads: int | None = None,
               namespace: str | None = None) -> Client:
        return Client(
            self.root,
            namespace=namespace or self.namespace,
            hosts_dir=self.hosts_dir,
            credentials=credentials_for(user, password_prompt=_prompt_password),
            plain_http=self.plain_http,
            max_concurrent_downloads=max_concurrent_downloads,
            on_event=on_event,
            config=self.config,
        )


pass_state = click.make_pass_decorator(State)


def _prompt_password(user: str) -> str:
    return str(click.prompt(f"Password for {user}", hide_input=True, err=True))




def unpack_json(result: UnpackResult) -> dict[str, Any]:
    """An unpack's outcome as ``--output json`` prints it."""
    return {
        "snapshotter": result.snapshotter,
        "chain_id": str(result.chain_id),
        "layers": [{"digest": str(o.digest), "chain_id": str(o.chain_id), "status": o.status,
                    "fetched": o.fetched} for o in result.layers],
    }
