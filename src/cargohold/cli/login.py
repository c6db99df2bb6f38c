"""``login`` and ``logout``: credentials kept where docker keeps them, never on the command line."""

from __future__ import annotations

import sys

import click

from cargohold.cli.common import State, pass_state
from cargohold.errors import InvalidArgumentError
from cargohold.remotes.credentials import Credentials, StaticCredentials
from cargohold.remotes.login import erase, save, server_key, verify
from cargohold.remotes.resolver import Resolver


@click.command()
@click.argument("registry")
@click.option("--username", "-u", default=None, help="User name (asked for on a terminal when not given).")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from stdin (e.g. printf %s \"$TOKEN\" | cargohold login ...).")
@pass_state
def login(state: State, registry: str, username: str | None, password_stdin: bool) -> None:
    """Check credentials against REGISTRY (host[:port]) and store them for later pulls and pushes.

    They go where docker keeps them: the credential helper configured for the registry (credHelpers, or
    credsStore) in $DOCKER_CONFIG/config.json (default ~/.docker/config.json), else that file (mode 0600).
    """
    server = server_key(registry)
    creds = Credentials(username=_username(username, server), password=_password(password_stdin, server))
    resolver = Resolver(hosts_dir=state.hosts_dir, credentials=StaticCredentials(creds, (registry,)),
                        plain_http=state.plain_http)
    try:
        verify(resolver, registry)
    finally:
        resolver.close()
    saved = save(registry, creds)
    click.echo(f"Login succeeded: credentials for {server} stored in {saved.describe()}")


@click.command()
@click.argument("registry")
def logout(registry: str) -> None:
    """Remove the stored credentials of REGISTRY (from its credential helper or config.json)."""
    saved = erase(registry)
    click.echo(f"Removed credentials for {saved.server} from {saved.describe()}")


def _username(username: str | None, server: str) -> str:
    if username:
        return username
    if not sys.stdin.isatty():
        raise InvalidArgumentError(f"login {server}: no --username, and stdin is not a terminal to ask for one")
    return str(click.prompt(f"Username for {server}", err=True))


def _password(from_stdin: bool, server: str) -> str:
    if from_stdin:
        password = sys.stdin.read().rstrip("\r\n")
        if not password:
            raise InvalidArgumentError(f"login {server}: --password-stdin: stdin held no password")
        return password
    if not sys.stdin.isatty():
        raise InvalidArgumentError(
            f"login {server}: stdin is not a terminal to ask for the password: use --password-stdin")
    return str(click.prompt(f"Password for {server}", hide_input=True, err=True))
