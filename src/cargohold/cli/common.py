"""What every command shares: the global state (root, namespace, config), output and platform options."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cargohold.client import Client
from cargohold.config import Config
from cargohold.errors import InvalidArgumentError
from cargohold.events import Cancel
from cargohold.oci.platform import Platform
from cargohold.remotes.credentials import credentials_for
from cargohold.unpack.unpacker import UnpackResult

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

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
                            callback=validate_platform, help=WHOLE_DEFAULT if whole_by_default else HOST_DEFAULT)(f)

    return decorate


with_platforms = _platforms(whole_by_default=False)
"""``--platform`` (repeatable) and ``--all-platforms``; without them, the host's best match (pull, export…)."""
with_platforms_whole = _platforms(whole_by_default=True)
"""The same options for commands that take the whole image without them (push, copy)."""


class State:
    """The global options, and the cancellation token of this run (set by Ctrl-C and SIGTERM)."""

    def __init__(self, root: Path, namespace: str, hosts_dir: Path | None, plain_http: bool, config: Config,
                 *, cancel: Cancel | None = None, stoppers: list[Callable[[], None]] | None = None,
                 closers: list[Callable[[], None]] | None = None) -> None:
        self.cancel = cancel or Cancel()
        self.stoppers = stoppers if stoppers is not None else []
        self.closers = closers if closers is not None else []
        self.root = root
        self.namespace = namespace
        self.hosts_dir = hosts_dir
        self.plain_http = plain_http
        self.config = config

    def client(self, *, user: str | None = None, on_event: Any = None, max_concurrent_downloads: int | None = None,
               namespace: str | None = None, create: bool = True) -> Client:
        """A client of the data root; read-only commands pass ``create=False``: a missing root is an error
        (NotFoundError), not an empty one made as a side effect."""
        client = Client(
            self.root,
            namespace=namespace or self.namespace,
            hosts_dir=self.hosts_dir,
            credentials=credentials_for(user, password_prompt=_prompt_password),
            plain_http=self.plain_http,
            max_concurrent_downloads=max_concurrent_downloads,
            on_event=on_event,
            config=self.config,
            cancel=self.cancel,
            create=create,
        )
        self.stoppers.append(client.stop)
        self.closers.append(client.close)
        return client


pass_state = click.make_pass_decorator(State)


def _prompt_password(user: str) -> str:
    if not sys.stdin.isatty():
        raise InvalidArgumentError(
            f"--user {user}: no password, and stdin is not a terminal to ask for one: store it with "
            f"'cargohold login --username {user} --password-stdin REGISTRY' (or pass --user {user}:PASSWORD)")
    return str(click.prompt(f"Password for {user}", hide_input=True, err=True))


# GOOS and GOARCH values (the OCI image spec's platform values come from Go's), and the "unknown/unknown" of
# attestation entries.
KNOWN_OS = frozenset({"unknown", "aix", "android", "darwin", "dragonfly", "freebsd", "illumos", "ios", "js",
                      "linux", "netbsd", "openbsd", "plan9", "solaris", "wasip1", "windows"})
KNOWN_ARCH = frozenset({"unknown", "386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le",
                        "mipsle", "ppc64", "ppc64le", "riscv64", "s390x", "sparc64", "wasm"})


def parse_platform(text: str) -> Platform:
    """``text`` as a platform of a known OS and architecture, else InvalidArgumentError naming it."""
    plat = Platform.parse(text)
    if plat.os not in KNOWN_OS or plat.architecture not in KNOWN_ARCH:
        raise InvalidArgumentError(f"invalid platform {text!r}: want os/arch[/variant] with a known os "
                                   "(linux, windows, darwin…) and architecture (amd64, arm64, arm…)")
    return plat


def validate_platform(_ctx: click.Context, param: click.Parameter, value: T) -> T:
    """Click callback: reject a bad ``--platform`` (one value or several) as a usage error (exit 2)."""
    for text in value if isinstance(value, tuple) else () if value is None else (value,):
        try:
            parse_platform(str(text))
        except InvalidArgumentError as exc:
            raise click.BadParameter(str(exc), param=param) from None
    return value


# sun_path of struct sockaddr_un holds 108 bytes, the last one the terminating NUL.
MAX_SOCKET_PATH = 107


def validate_socket_path(_ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Click callback: a unix socket path the kernel accepts (at most 107 bytes), else a usage error."""
    if value is not None and len(os.fsencode(str(value))) > MAX_SOCKET_PATH:
        raise click.BadParameter(
            f"socket path {value} is {len(os.fsencode(str(value)))} bytes; a unix socket path has at most "
            f"{MAX_SOCKET_PATH}: choose a shorter one (e.g. under /run)", param=param)
    return value


platform_option = click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
                               callback=validate_platform, help="Platform of an index to use.")
"""``--platform`` (one): the platform of an index a command works on."""



def unpack_json(result: UnpackResult) -> dict[str, Any]:
    """An unpack's outcome as ``--output json`` prints it."""
    return {
        "snapshotter": result.snapshotter,
        "chain_id": str(result.chain_id),
        "layers": [{"digest": str(o.digest), "chain_id": str(o.chain_id), "status": o.status,
                    "fetched": o.fetched} for o in result.layers],
    }
