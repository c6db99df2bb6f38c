"""``cargohold``: pull, inspect and manage images in a local content store."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from cargohold import __version__, stages
from cargohold.cli import images_extra
from cargohold.cli.common import State, output_option, pass_state, platform_option, unpack_json, with_platforms
from cargohold.cli.errors import (
    EXIT_USAGE,
    Signals,
    describe_error,
    finish_interrupted,
    install_signal_handlers,
    usage_message,
)
from cargohold.cli.lazy import LazyCommand, LazyGroup
from cargohold.cli.output import (
    emit_json,
    eprint,
    human_size,
    labels_cell,
    plural,
    profile_json,
    profile_lines,
    show_runtime,
    table,
)
from cargohold.cli.progress import QUIET_KEY, ProgressRenderer
from cargohold.client import Client, default_root
from cargohold.config import find_config, parse_size
from cargohold.diff import worker
from cargohold.errors import CargoholdError
from cargohold.events import Cancel
from cargohold.images.entries import index_entries
from cargohold.images.image import walk_required
from cargohold.metadata.images import Image
from cargohold.oci.digest import Digest
from cargohold.services.inspect import config_json
from cargohold.snapshots import available_snapshotters
from cargohold.snapshots.base import Info as SnapshotInfo
from cargohold.snapshots.base import Snapshotter


class SizeType(click.ParamType[int, object]):
    """A byte count such as ``4096``, ``512MiB`` or ``2GB``."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _lazy(module: str, attribute: str, summary: str) -> LazyCommand:
    return LazyCommand(module=f"cargohold.cli.{module}", attribute=attribute, summary=summary)


# The commands that live in their own modules (archives, push, inspect, maintenance, CRI), imported only when
# used: a command loads only what it runs (start-up is most of a second pull). Each summary is the first
# paragraph of the command's help (tests/test_cli_lazy.py holds them to it).
LAZY_COMMANDS = {
    "copy": _lazy("push", "copy", "Copy an image from SRC to DST, as `skopeo copy` does."),
    "digest": _lazy("inspect", "digest", "Print the digest REF resolves to on its registry (of the index for a "
                    "multi-platform image), as `crane digest` does. Nothing is fetched but the answer to one HEAD "
                    "(or GET) request."),
    "export": _lazy("archive", "export_cmd", "Write IMAGEs into one tar (OCI layout + docker manifest.json) at "
                    "OUT.tar, or stdout for '-'."),
    "import": _lazy("archive", "import_cmd", "Import images from ARCHIVE (a tar or tar.gz; '-' for stdin): OCI "
                    "layouts and docker save archives."),
    "inspect": _lazy("inspect", "inspect", "Show an image on its registry without pulling it, as `skopeo inspect` "
                     "does: an index with its platforms, the manifest with its layers, and the config's runtime "
                     "settings (entrypoint, cmd, env, working directory, user, labels, created). Nothing is "
                     "written to the store."),
    "leases": _lazy("maintenance", "leases", "List and remove leases (what running, or crashed, operations hold)."),
    "login": _lazy("login", "login", "Check credentials against REGISTRY (host[:port]) and store them for later "
                   "pulls and pushes."),
    "logout": _lazy("login", "logout", "Remove the stored credentials of REGISTRY (from its credential helper or "
                    "config.json)."),
    "push": _lazy("push", "push", "Push the image LOCAL (default: the image named REF) from the store to the "
                  "registry reference REF."),
    "referrers": _lazy("referrers", "referrers", "List the artifacts (signatures, SBOMs, attestations) that refer "
                       "to IMAGE on its registry, as `oras discover` does. IMAGE is a registry reference; a tag is "
                       "resolved to its manifest digest first."),
    "serve": _lazy("runtime", "serve", "Run cargohold as a service."),
    "tags": _lazy("inspect", "tags", "List the tags of the repository REPO (`host[:port]/path`) on its registry, "
                  "following its pagination."),
}
LAZY_CONTENT_COMMANDS = {
    "abort": _lazy("maintenance", "content_abort", "Remove the partial downloads REF… (an error naming the pid "
                   "while a live writer holds one)."),
    "active": _lazy("maintenance", "content_active", "List downloads in progress or left behind by a process that "
                    "died (abort them with `content abort`, or let `gc` remove the dead ones)."),
    "verify": _lazy("maintenance", "content_verify", "Rehash blobs (DIGEST…, or every one) and check their sizes; "
                    "a bad blob is moved to ROOT/content/quarantine (never deleted) so images needing it show it "
                    "missing. Exit 1 when any was bad."),
}
LAZY_SNAPSHOTS_COMMANDS = {
    "prepare": _lazy("runtime", "snapshots_prepare", "Prepare the rootfs snapshot KEY of a container from IMAGE "
                     "for a runtime handler; print its mounts."),
}


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cargohold")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), envvar="CARGOHOLD_ROOT",
              default=None, help="Data root (blobs + metadata). Default: $CARGOHOLD_ROOT, /var/lib/cargohold "
              "as root, else ~/.local/share/cargohold.")
@click.option("--namespace", "-n", default="default", show_default=True, envvar="CARGOHOLD_NAMESPACE",
              help="Namespace of images and content.")
@click.option("--hosts-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of containerd-style <host>/hosts.toml registry configs (mirrors, TLS, headers).")
@click.option("--plain-http", is_flag=True, help="Talk plain HTTP to every registry (always on for localhost).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="CARGOHOLD_CONFIG",
              default=None, help="Config file (TOML). Default: ROOT/config.toml when present.")
@click.option("--debug", is_flag=True, help="Log debug details (hosts tried, retries) to stderr.")
@click.option("--lock-timeout", type=click.FloatRange(0, 86400), default=None, metavar="SECONDS",
              help="Wait at most this long for another process's write on the metadata database "
              "(default: config lock_timeout, else 30).")
@click.option("--quiet", is_flag=True, help="No progress: print only each command's result.")
@click.option("--max-layer-size", type=SizeType(), default=None, metavar="SIZE",
              help="Refuse layer blobs larger than SIZE (e.g. 512MiB) before fetching (default: config, else off).")
@click.option("--max-unpacked-size", type=SizeType(), default=None, metavar="SIZE",
              help="Stop a layer inflating past SIZE uncompressed bytes (default: config, else off).")
@click.pass_context
def cli(ctx: click.Context, root: Path | None, namespace: str, hosts_dir: Path | None, plain_http: bool,
        config_path: Path | None, debug: bool, lock_timeout: float | None, quiet: bool, max_layer_size: int | None,
        max_unpacked_size: int | None) -> None:
    """cargohold: pull, unpack, export and import container images, without a daemon."""
    ctx.meta[QUIET_KEY] = quiet
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root = root or default_root()
    config = find_config(config_path, root)
    if lock_timeout is not None:  # the option wins over the config file
        config = dataclasses.replace(config, lock_timeout=lock_timeout)
    if max_layer_size is not None:
        config = dataclasses.replace(config, max_layer_size=max_layer_size)
    if max_unpacked_size is not None:
        config = dataclasses.replace(config, max_unpacked_size=max_unpacked_size)
    # main()'s signal state: Ctrl-C and SIGTERM cancel its token and stop the clients made.
    signals = ctx.obj if isinstance(ctx.obj, Signals) else Signals(cancel=Cancel())
    ctx.obj = State(root, namespace, hosts_dir, plain_http, config, cancel=signals.cancel, stoppers=signals.stoppers,
                    closers=signals.closers)


# -- pull ----------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("ref")
@with_platforms
@click.option("--user", "-u", metavar="USER[:PASSWORD]", help="Registry credentials (else ~/.docker/config.json).")
@click.option("--max-concurrent-downloads", type=click.IntRange(1, 64), default=None,
              help="Blobs fetched at once (default: the config's max_concurrent_downloads, else 3).")
@click.option("--no-unpack", is_flag=True, help="Fetch content only; do not unpack layers.")
@click.option("--snapshotter", default=None, help="Snapshotter to unpack into (overlayfs, native). "
              "Default: overlayfs when the kernel supports it, else native.")
@click.option("--profile", is_flag=True, help="Print the time spent per stage (resolve, fetch, prepare, inflate, "
              "hash, extract, wait, commit) on stderr; with --output json also under \"profile\".")
@output_option
@pass_state
def pull(state: State, ref: str, platforms: tuple[str, ...], all_platforms: bool, user: str | None,
         max_concurrent_downloads: int | None, no_unpack: bool, snapshotter: str | None, profile: bool,
         output: str) -> None:
    """Fetch an image and its blobs for the platform(s), and unpack it into a snapshotter.

    An OCI artifact (an SBOM, a signature: a manifest whose config is no image config) is not a runnable
    image: pull refuses to unpack it with exit status 2 (as for other unsupported media types), before
    fetching its blobs and recording anything; `pull --no-unpack` fetches it.
    """
    with contextlib.ExitStack() as stack:
        clock = stack.enter_context(stages.profiling()) if profile else None
        with ProgressRenderer(quiet=output == "json") as progress:
            client = state.client(user=user, on_event=progress, max_concurrent_downloads=max_concurrent_downloads)
            result = client.pull(ref, platforms=platforms, all_platforms=all_platforms, unpack=not no_unpack,
                                 snapshotter=snapshotter)
    unpacked = result.unpack
    if clock is not None and output != "json":
        for line in profile_lines(clock):
            click.echo(line, err=True)
    if output == "json":
        emit_json({
            **({"profile": profile_json(clock)} if clock is not None else {}),
            "unpack": None if unpacked is None else unpack_json(unpacked),
            "name": result.image.name,
            "digest": str(result.image.target.digest),
            "media_type": result.image.target.media_type,
            "manifests": [str(d.digest) for d in result.manifests],
            "fetched": [str(d.digest) for d in result.fetched],
            "present": [str(d.digest) for d in result.present],
            "fetched_bytes": result.fetched_bytes,
        })
    else:
        click.echo(f"{result.image.name}: {result.image.target.digest} "
                   f"({len(result.fetched)} fetched, {human_size(result.fetched_bytes)}; "
                   f"{len(result.present)} already present)")
        if unpacked is not None:
            click.echo(f"unpacked into {unpacked.snapshotter}: {unpacked.chain_id} "
                       f"({plural(unpacked.unpacked, 'layer')} applied, "
                       f"{len(unpacked.layers) - unpacked.unpacked} reused)")


@cli.command()
@click.argument("image")
@click.option("--snapshotter", default=None, help="Snapshotter to unpack into.")
@platform_option
@click.option("--offline", is_flag=True, help="Never contact a registry; a missing blob is an error.")
@output_option
@pass_state
def unpack(state: State, image: str, snapshotter: str | None, platform: str | None, offline: bool,
           output: str) -> None:
    """Unpack an image already in the store into a snapshotter (fetching missing blobs from its registry)."""
    with ProgressRenderer(quiet=output == "json") as progress:
        client = state.client(on_event=progress)
        result = client.unpack(image, snapshotter=snapshotter, platform=platform, fetch_missing=not offline)
    if output == "json":
        emit_json(unpack_json(result))
    else:
        click.echo(f"{client.image(image).name}: unpacked into {result.snapshotter}: {result.chain_id} "
                   f"({plural(result.unpacked, 'layer')} applied, {len(result.layers) - result.unpacked} reused, "
                   f"{plural(len(result.fetched), 'blob')} fetched)")


@cli.command()
@click.argument("image")
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@click.option("--snapshotter", default=None, help="Snapshotter to unpack into and mount from (overlayfs, "
              "native, a configured proxy). Default: the root's default.")
@platform_option
@click.option("--rw", is_flag=True, help="Mount a writable snapshot instead of a read-only view.")
@pass_state
def mount(state: State, image: str, target: Path, snapshotter: str | None, platform: str | None, rw: bool
          ) -> None:
    """Mount an image's root filesystem at TARGET (read-only overlay or bind)."""
    client = state.client()
    client.mount(image, target, snapshotter=snapshotter, platform=platform, writable=rw)
    click.echo(str(target))


@cli.command()
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@pass_state
def unmount(state: State, target: Path) -> None:
    """Unmount a directory mounted by 'cargohold mount' and remove its snapshot; fails when nothing is mounted
    there."""
    state.client().unmount(target)
    click.echo(str(target))


@cli.command()
@click.argument("image")
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@platform_option
@pass_state
def rootfs(state: State, image: str, target: Path, platform: str | None) -> None:
    """Write IMAGE's flattened filesystem (whiteouts applied) into the empty directory TARGET."""
    with ProgressRenderer() as progress:
        client = state.client(on_event=progress)
        client.rootfs(image, target, platform=platform)
    click.echo(str(target))


@cli.command("rm-rootfs")
@click.argument("target", type=click.Path(path_type=Path))
@pass_state
def rm_rootfs(state: State, target: Path) -> None:
    """Remove a directory written by 'rootfs', read-only directories included (where 'rm -rf' fails for
    an ordinary user). Symlinks are not followed; a tree with a mount inside is refused."""
    state.client().remove_rootfs(target)


# -- images --------------------------------------------------------------------------------------------------


@cli.group()
def images() -> None:
    """List, inspect, tag, remove and check images."""


def _image_json(client: Client, image: Image) -> dict[str, Any]:
    return {
        "name": image.name,
        "digest": str(image.target.digest),
        "media_type": image.target.media_type,
        "size": _image_size(client, image),
        "labels": dict(image.labels),
        "created_at": image.created_at,
        "updated_at": image.updated_at,
    }


def _image_size(client: Client, image: Image) -> int:
    """The bytes of the image's blobs in the store (target, manifests, configs, layers of every platform
    present; each blob once), not the size of its target manifest or index alone."""
    walked = walk_required(client.content, image.target, None)
    missing = {d.digest for d in walked.missing}
    return sum({d.digest: d.size for d in walked.required if d.digest not in missing}.values())


@images.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="Names only.")
@click.option("--filter", "filters", multiple=True, metavar="FILTER",
              help="Only images matching, in containerd's syntax (repeatable: any may match): name==REF, "
              'name~=REGEX, labels."KEY"==VALUE, target.digest==DIGEST, target.mediatype==TYPE; '
              "comma-separated selectors must all match.")
@click.option("--snapshotter", default=None, help="Snapshotter whose unpacked size is shown. Default: the "
              "root's default.")
@output_option
@pass_state
def images_ls(state: State, quiet: bool, filters: tuple[str, ...], snapshotter: str | None, output: str) -> None:
    """List images: kind, digest, platforms, size of the host platform's blobs (compressed) and unpacked
    snapshots, and when the image was created (its config's date)."""
    client = state.client(create=False)
    imgs = client.find_images(filters)
    if quiet and output != "json":
        for i in imgs:
            click.echo(i.name)
        return
    rows = [client.image_row(i, snapshotter) for i in imgs]
    if output == "json":
        emit_json([{**_image_json(client, r.image), **images_extra.row_json(r)} for r in rows])
        return
    table(["REF", "TYPE", "DIGEST", "PLATFORMS", "SIZE", "UNPACKED", "CREATED"],
          [[r.image.name, _kind(r.image.target.media_type), str(r.image.target.digest),
            *images_extra.row_cells(r)] for r in rows])


def _kind(media_type: str) -> str:
    if "index" in media_type or "list" in media_type:
        return "index"
    return "manifest"


@images.command("inspect")
@click.argument("name")
@platform_option
@output_option
@pass_state
def images_inspect(state: State, name: str, platform: str | None, output: str) -> None:
    """Show an image: target, manifest for the platform, config, layers with diffIDs and chainIDs."""
    client = state.client(create=False)
    image = client.image(name)
    resolved = client.resolve_manifest(name, platform)
    info = _image_json(client, image)
    entries = index_entries(client.content, image.target)
    if entries:
        info["entries"] = [e.to_json() for e in entries]
    info["manifest"] = {
        "digest": str(resolved.descriptor.digest),
        "media_type": resolved.manifest.media_type,
        "platform": str(resolved.config.platform),
        "config": {"digest": str(resolved.manifest.config.digest),
                   "media_type": resolved.manifest.config.media_type},
        "layers": [
            {"digest": str(layer.digest), "media_type": layer.media_type, "size": layer.size,
             "diff_id": str(diff_id), "chain_id": str(chain_id)}
            for layer, diff_id, chain_id in zip(resolved.manifest.layers, resolved.diff_ids, resolved.chain_ids,
                                                strict=True)
        ],
        "size": resolved.size,
    }
    info["config"] = config_json(resolved.config)
    if output == "json":
        emit_json(info)
        return
    click.echo(f"name:      {image.name}")
    click.echo(f"digest:    {image.target.digest} ({image.target.media_type})")
    for e in entries:
        click.echo(f"{'entry:':<11}{'  ' * e.depth}{e.descriptor.digest} {e.describe()}")
    click.echo(f"manifest:  {resolved.descriptor.digest} ({resolved.config.platform})")
    click.echo(f"config:    {resolved.manifest.config.digest} ({resolved.manifest.config.media_type})")
    click.echo(f"size:      {human_size(resolved.size)}")
    for i, layer in enumerate(info["manifest"]["layers"]):
        click.echo(f"layer {i}:   {layer['digest']} {human_size(layer['size'])} {layer['media_type']}")
        click.echo(f"  diff_id:  {layer['diff_id']}")
        click.echo(f"  chain_id: {layer['chain_id']}")
    show_runtime(info["config"])


@images.command("tag")
@click.argument("source")
@click.argument("target", nargs=-1, required=True)
@output_option
@pass_state
def images_tag(state: State, source: str, target: tuple[str, ...], output: str) -> None:
    """Give an image more names."""
    client = state.client()
    tagged = [client.tag(source, t) for t in target]
    if output == "json":
        emit_json([_image_json(client, i) for i in tagged])
        return
    for img in tagged:
        click.echo(img.name)


@images.command("rm")
@click.argument("names", nargs=-1, required=True)
@output_option
@pass_state
def images_rm(state: State, names: tuple[str, ...], output: str) -> None:
    """Remove image records (content stays until garbage collection)."""
    client = state.client()
    removed = []
    for n in names:
        name = client.image(n).name
        client.remove_image(name)
        removed.append(name)
    if output == "json":
        emit_json(removed)
        return
    for n in removed:
        click.echo(n)


@images.command("check")
@click.argument("names", nargs=-1)
@with_platforms
@click.option("--repair", is_flag=True,
              help="First fetch every missing (or quarantined) blob from the image's registry or the "
                   "repositories its blobs came from, and unpack again what sits on a snapshot whose directory "
                   "was damaged or removed.")
@output_option
@pass_state
def images_check(state: State, names: tuple[str, ...], platforms: tuple[str, ...], all_platforms: bool,
                 repair: bool, output: str) -> None:
    """Say whether each image has every blob it needs and whether a snapshot directory was damaged or removed
    from under us; exit 1 when one is incomplete or damaged. The layer blobs of an image unpacked lazily by a
    remote snapshotter are remote, not missing (status "complete (lazy)")."""
    client = state.client(create=False)
    targets = list(names) or [i.name for i in client.list_images()]
    results: list[dict[str, Any]] = []
    for n in targets if repair else ():
        fixed = client.repair(n)
        for d in fixed.fetched:
            eprint(f"{fixed.name}: repaired {d}")
        for d, why in fixed.failed:
            eprint(f"{fixed.name}: cannot repair {d}: {why}")
    if repair:
        damaged, again = client.repair_snapshots(targets)
        for snap in damaged:
            eprint(f"snapshot {snap.key} ({snap.snapshotter}) damaged, removed: {snap.reason}")
        for n, sn in again:
            eprint(f"{n}: unpacked again into {sn}")
    still_damaged = client.damaged_snapshots()
    for snap in still_damaged:
        eprint(f"snapshot {snap.key} ({snap.snapshotter}) damaged: {snap.reason} (images check --repair)")
    for n in targets:
        res = client.check(n, platforms=platforms, all_platforms=all_platforms)
        plat = platforms[0] if platforms else None
        results.append({
            "name": client.image(n).name,
            "status": "complete" if res.complete else "incomplete",
            "required": len(res.required),
            "missing": [str(d.digest) for d in res.missing],
            # Layer blobs of a lazily unpacked image: at its source, fetched on demand; not missing.
            "remote": [str(d.digest) for d in res.remote],
            "unpacked": {sn: client.unpacked(n, sn, plat) if res.complete or res.manifests else False
                         for sn in available_snapshotters(client.root)},
        })
    if output == "json":
        emit_json(results)
    else:
        table(["REF", "STATUS", "BLOBS", "MISSING", "UNPACKED"],
              [[r["name"], r["status"] + (" (lazy)" if r["remote"] else ""),
                f"{r['required'] - len(r['missing']) - len(r['remote'])}/{r['required']}",
                ",".join(r["missing"]) or "-",
                ",".join(sn for sn, ok in r["unpacked"].items() if ok) or "-"] for r in results])
    if still_damaged or any(r["status"] != "complete" for r in results):
        sys.exit(1)


# -- snapshots -----------------------------------------------------------------------------------------------


@cli.group(cls=LazyGroup, lazy=LAZY_SNAPSHOTS_COMMANDS)
@click.option("--snapshotter", default=None, help="Snapshotter (overlayfs, native). Default: the root's default.")
@click.pass_context
def snapshots(ctx: click.Context, snapshotter: str | None) -> None:
    """Inspect and remove snapshots."""
    ctx.meta["snapshotter"] = snapshotter


def _sn(ctx: click.Context, state: State, *, create: bool = False) -> tuple[Client, Snapshotter]:
    client = state.client(create=create)
    return client, client.snapshotter(ctx.meta.get("snapshotter"))


def _info_json(info: SnapshotInfo) -> dict[str, Any]:
    return {"key": info.key, "parent": info.parent, "kind": info.kind.value, "labels": dict(info.labels),
            "created_at": info.created_at, "updated_at": info.updated_at}


@snapshots.command("ls")
@click.argument("filters", nargs=-1)
@output_option
@pass_state
@click.pass_context
def snapshots_ls(ctx: click.Context, state: State, filters: tuple[str, ...], output: str) -> None:
    """List snapshots (optionally filtered, containerd syntax: labels."KEY"==VALUE, kind==committed)."""
    _, sn = _sn(ctx, state)
    infos = sorted(sn.walk(*filters), key=lambda i: i.key)
    if output == "json":
        emit_json([_info_json(i) for i in infos])
        return
    table(["KEY", "PARENT", "KIND"], [[i.key, i.parent or "-", i.kind.value] for i in infos])


@snapshots.command("tree")
@pass_state
@click.pass_context
def snapshots_tree(ctx: click.Context, state: State) -> None:
    """Show snapshots as a tree of parents and children."""
    _, sn = _sn(ctx, state)
    infos = list(sn.walk())
    kids: dict[str, list[str]] = {}
    for i in infos:
        kids.setdefault(i.parent, []).append(i.key)

    def show(key: str, depth: int) -> None:
        for k in sorted(kids.get(key, [])):
            click.echo("  " * depth + ("\\_ " if depth else "") + k)
            show(k, depth + 1)

    show("", 0)


@snapshots.command("rm")
@click.argument("keys", nargs=-1, required=True)
@pass_state
@click.pass_context
def snapshots_rm(ctx: click.Context, state: State, keys: tuple[str, ...]) -> None:
    """Remove snapshots (leaves first)."""
    _, sn = _sn(ctx, state)
    for k in keys:
        sn.remove(k)
        click.echo(k)


@snapshots.command("usage")
@click.argument("keys", nargs=-1)
@output_option
@pass_state
@click.pass_context
def snapshots_usage(ctx: click.Context, state: State, keys: tuple[str, ...], output: str) -> None:
    """Disk usage of snapshots (all when no KEY)."""
    _, sn = _sn(ctx, state)
    names = list(keys) or sorted(i.key for i in sn.walk())
    rows = [(k, sn.usage(k)) for k in names]
    if output == "json":
        emit_json([{"key": k, "size": u.size, "inodes": u.inodes} for k, u in rows])
        return
    table(["KEY", "SIZE", "INODES"], [[k, human_size(u.size), u.inodes] for k, u in rows])


@snapshots.command("mounts")
@click.argument("key")
@output_option
@pass_state
@click.pass_context
def snapshots_mounts(ctx: click.Context, state: State, key: str, output: str) -> None:
    """Print the mounts of an active snapshot or view (as mount(8) commands in table mode)."""
    _, sn = _sn(ctx, state)
    mounts = sn.mounts(key)
    if output == "json":
        emit_json([{"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}
                   for m in mounts])
        return
    for m in mounts:
        opts = ",".join(m.options)
        click.echo(f"mount -t {m.type} {m.source} <target>{'/' + m.target if m.target else ''}"
                   + (f" -o {opts}" if opts else ""))


# -- content -------------------------------------------------------------------------------------------------


@cli.group(cls=LazyGroup, lazy=LAZY_CONTENT_COMMANDS)
def content() -> None:
    """List, read and remove blobs in the content store."""


@content.command("ls")
@output_option
@pass_state
def content_ls(state: State, output: str) -> None:
    """List blobs with sizes and labels."""
    client = state.client(create=False)
    infos = sorted(client.content.walk(), key=lambda i: str(i.digest))
    if output == "json":
        emit_json([{"digest": str(i.digest), "size": i.size, "created_at": i.created_at,
                    "updated_at": i.updated_at, "labels": dict(i.labels)} for i in infos])
        return
    table(["DIGEST", "SIZE", "LABELS"],
          [[str(i.digest), human_size(i.size), labels_cell(i.labels)]
           for i in infos])


@content.command("get")
@click.argument("digest")
@pass_state
def content_get(state: State, digest: str) -> None:
    """Write a blob's bytes to stdout."""
    client = state.client(create=False)
    d = Digest.parse(digest)
    out = sys.stdout.buffer
    with client.content.open(d) as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
    out.flush()


@content.command("rm")
@click.argument("digests", nargs=-1, required=True)
@output_option
@pass_state
def content_rm(state: State, digests: tuple[str, ...], output: str) -> None:
    """Remove blobs from this namespace."""
    client = state.client()
    for d in digests:
        client.content.delete(Digest.parse(d))
    if output == "json":
        emit_json(list(digests))
        return
    for d in digests:
        click.echo(d)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@output_option
@pass_state
def gc(state: State, dry_run: bool, output: str) -> None:
    """Remove content, blob files and snapshots that no image, lease or gc.root references, and what crashed
    pulls left (ingests, lock files, unpacks' snapshots). Safe to run while pulling."""
    client = state.client()
    result, snaps = client.gc(dry_run=dry_run)
    report: dict[str, Any] = {
        "dry_run": dry_run,
        "content": [str(d) for d in result.removed_content],
        "blobs": [str(d) for d in result.removed_blobs],
        "snapshots": [{"snapshotter": sn, "namespace": ns, "key": key} for sn, ns, key in snaps],
        "expired_leases": [lease for _, lease in result.expired_leases],
        "ingests": list(result.removed_ingests),
        "locks": list(result.removed_locks),
        "unreachable": [{"snapshotter": sn, "error": err} for sn, err in result.unreachable],
    }
    if output == "json":
        emit_json(report)
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb}: {len(report['content'])} content records, {len(report['blobs'])} blob files, "
               f"{len(snaps)} snapshots, {len(report['expired_leases'])} expired leases, "
               f"{len(report['ingests'])} stale ingests, {len(report['locks'])} stale lock files")
    for sn, err in result.unreachable:
        # Not an error of this gc: the proxy's snapshots are tried again by the next one.
        click.echo(f"snapshotter {sn} unreachable, its snapshots not collected: {err}")


images_extra.register(images)


def main() -> None:
    """The ``cargohold`` entry point: run the command, turn every failure into one line and an exit status
    (README, "Exit status"): 1 the operation failed, 2 bad input, 130 interrupted (143 on SIGTERM)."""
    signals = install_signal_handlers(Cancel())
    status: list[int] = []
    # Registered first, so it runs last: after the worker threads were joined and every other exit handler ran.
    atexit.register(_skip_teardown, status)
    code: object = None
    ended = False
    try:
        _main(signals)
        ended = True
    except SystemExit as exc:
        code, ended = exc.code, True
        raise
    finally:
        # An interrupted command ends as it always has.
        if ended and not signals.received and _close_clients(signals):
            status.append(code if isinstance(code, int) else 0 if code is None else 1)


def _close_clients(signals: Signals) -> bool:
    """Close the clients the command made (pools, registry connections, database: SQLite checkpoints and removes
    its -wal and -shm files as at any clean close); False when one could not be closed."""
    closed = True
    for close in signals.closers:
        try:
            close()
        except (CargoholdError, OSError, sqlite3.Error):  # the command's outcome stands; teardown retries
            closed = False
    return closed


def _skip_teardown(status: list[int]) -> None:
    """End the process with the command's exit status once it is done, skipping the interpreter's teardown of
    every loaded module: that alone takes longer than a second pull's whole work (tens of milliseconds). Only
    memory is left unreleased: the clients are closed, threads joined, exit handlers run, and stdout and stderr
    are flushed here."""
    if not status:  # interrupted, or main() did not finish: the interpreter ends as usual
        return
    # The layer apply workers (started only when layers were applied) end and are reaped here, so that their
    # CPU time counts as this command's, as it would for threads.
    worker.close_pools()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: let Python report it as it does
        return
    os._exit(status[0])


def _main(signals: Signals) -> None:
    try:
        cli.main(prog_name="cargohold", standalone_mode=False, obj=signals)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, or an operation's CancelledError
        eprint("cargohold: interrupted")
        finish_interrupted(signals)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors and the like: our prefix, exit 2 (click's own status)
        eprint(f"cargohold: error: {usage_message(exc)}")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:  # click's wrapping of a KeyboardInterrupt, or of a prompt's EOF
        if isinstance(exc.__cause__, KeyboardInterrupt) or signals.received:
            eprint("cargohold: interrupted")
            finish_interrupted(signals)
        eprint("cargohold: error: no input: stdin ended at a prompt (pass the value as an option)")
        sys.exit(EXIT_USAGE)
    except BrokenPipeError:
        sys.exit(141)
    except Exception as exc:  # noqa: BLE001 - nothing but the one line reaches the user
        message, status = describe_error(exc)
        eprint(f"cargohold: error: {message}")
        sys.exit(status)


if __name__ == "__main__":
    main()
