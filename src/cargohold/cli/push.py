"""`cargohold` commands: push, copy. Never import ``cargohold.cli.main`` here (it runs as __main__)."""

from __future__ import annotations

from typing import Any

import click

from cargohold.cli.common import State, output_option, pass_state, with_platforms_whole
from cargohold.cli.output import emit_json, human_size
from cargohold.cli.progress import ProgressRenderer
from cargohold.client import Client
from cargohold.remotes.credentials import (
    ChainCredentials,
    CredentialStore,
    StaticCredentials,
    credentials_for,
    parse_user,
)
from cargohold.services.copy import parse_location
from cargohold.services.push import PushResult

_MIB = 1 << 20


def push_json(result: PushResult) -> dict[str, Any]:
    """The ``--output json`` document of a push."""
    return {
        "name": result.name,
        "digest": str(result.target.digest),
        "media_type": result.target.media_type,
        "pushed": [str(d.digest) for d in result.pushed],
        "mounted": [str(d.digest) for d in result.mounted],
        "existing": [str(d.digest) for d in result.existing],
        "skipped": [str(d.digest) for d in result.skipped],
        "pushed_bytes": result.pushed_bytes,
    }


def push_summary(result: PushResult) -> str:
    skipped = ""
    if result.skipped:  # say which layers the registry will not have (use --allow-nondistributable)
        skipped = (f"; {len(result.skipped)} non-distributable skipped: "
                   f"{', '.join(str(d.digest) for d in result.skipped)}")
    return (f"{result.name}: {result.target.digest} ({len(result.pushed)} pushed, "
            f"{human_size(result.pushed_bytes)}; {len(result.mounted)} mounted; "
            f"{len(result.existing)} already there{skipped})")


@click.command()
@click.argument("ref")
@click.argument("local", required=False)
@with_platforms_whole
@click.option("--user", "-u", metavar="USER[:PASSWORD]", help="Registry credentials (else ~/.docker/config.json).")
@click.option("--max-concurrent-uploads", type=click.IntRange(1, 64), default=3, show_default=True,
              help="Blobs uploaded at once.")
@click.option("--chunk-size", type=click.IntRange(1, 4096), default=16, show_default=True, metavar="MIB",
              help="Blobs larger than this go up in PATCH chunks of this size.")
@click.option("--allow-nondistributable", is_flag=True, help="Upload non-distributable (foreign) layers too.")
@output_option
@pass_state
def push(state: State, ref: str, local: str | None, platforms: tuple[str, ...], all_platforms: bool,
         user: str | None, max_concurrent_uploads: int, chunk_size: int, allow_nondistributable: bool,
         output: str) -> None:
    """Push the image LOCAL (default: the image named REF) from the store to the registry reference REF.

    Without --platform the whole image goes, every manifest of an index included. With --platform, an index
    goes whole when every one of its manifests matches; otherwise only the best-matching manifest is pushed,
    under REF's tag (as `ctr push --platform` does).
    """
    with ProgressRenderer(quiet=output == "json") as progress:
        client = state.client(user=user, on_event=progress)
        try:
            result = client.push(ref, local, platforms=platforms, all_platforms=all_platforms,
                                 chunk_threshold=chunk_size * _MIB, chunk_size=chunk_size * _MIB,
                                 concurrency=max_concurrent_uploads, allow_nondistributable=allow_nondistributable)
        finally:
            client.close()
    if output == "json":
        emit_json(push_json(result))
    else:
        click.echo(push_summary(result))


@click.command()
@click.argument("src")
@click.argument("dst")
@with_platforms_whole
@click.option("--user", "-u", metavar="USER[:PASSWORD]", help="Credentials for both registries.")
@click.option("--src-user", metavar="USER[:PASSWORD]", help="Credentials for the source registry only.")
@click.option("--dest-user", metavar="USER[:PASSWORD]", help="Credentials for the destination registry only.")
@output_option
@pass_state
def copy(state: State, src: str, dst: str, platforms: tuple[str, ...], all_platforms: bool, user: str | None,
         src_user: str | None, dest_user: str | None, output: str) -> None:
    """Copy an image from SRC to DST, as `skopeo copy` does.

    Each end is a registry (`registry://REF`, `docker://REF` or a bare REF), an archive file
    (`oci-archive:PATH[:NAME]`, `docker-archive:PATH[:NAME]`), an OCI layout directory (`oci:DIR[:REF]`, as
    skopeo's) or the local store (`local:NAME`). Without --platform the whole image is copied (every platform
    of an index).
    """

    with ProgressRenderer(quiet=output == "json") as progress:
        client = _client(state, progress, user=user, src_user=src_user, dest_user=dest_user,
                         src_host=parse_location(src).registry_host,
                         dst_host=parse_location(dst).registry_host)
        try:
            result = client.copy(src, dst, platforms=platforms, all_platforms=all_platforms)
        finally:
            client.close()
    if output == "json":
        emit_json(result.to_json())
    else:
        click.echo(result.summary())


def _client(state: State, progress: ProgressRenderer, *, user: str | None, src_user: str | None,
            dest_user: str | None, src_host: str, dst_host: str) -> Client:
    if not src_user and not dest_user:
        return state.client(user=user, on_event=progress)
    stores: list[CredentialStore] = []
    # Destination first: when both ends are one registry, pushing needs the more powerful credentials.
    for who, host in ((dest_user, dst_host), (src_user, src_host)):
        if who and host:
            stores.append(StaticCredentials(parse_user(who, password_prompt=_prompt), hosts=(host,)))
    stores.append(credentials_for(user, password_prompt=_prompt))  # --user for any host, then config.json
    return Client(state.root, namespace=state.namespace, hosts_dir=state.hosts_dir,
                  credentials=ChainCredentials(*stores), plain_http=state.plain_http, on_event=progress,
                  config=state.config)


def _prompt(user: str) -> str:
    return str(click.prompt(f"Password for {user}", hide_input=True, err=True))
