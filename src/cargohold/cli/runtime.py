"""`cargohold` commands: runtime. Never import ``cargohold.cli.main`` here (it runs as __main__).

``serve cri`` runs the CRI image service on a unix socket; ``serve snapshots`` serves a local snapshotter to
containerd as a proxy plugin; ``snapshots prepare`` makes a container rootfs for a runtime handler (unpacking the
image into that handler's snapshotter first when needed).
"""

from __future__ import annotations

from pathlib import Path

import click

from cargohold.cli.common import State, output_option, pass_state, validate_socket_path
from cargohold.cli.output import emit_json, eprint
from cargohold.errors import InvalidArgumentError
from cargohold.snapshots.base import Mount


@click.group()
def serve() -> None:
    """Run cargohold as a service."""


@serve.command("cri")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              callback=validate_socket_path, help="Unix socket to listen on (created with mode 0660; removed on exit).")
@click.option("--namespace", default="k8s.io", show_default=True, help="Namespace of the images served.")
@pass_state
def serve_cri(state: State, socket_path: Path, namespace: str) -> None:
    """Serve Kubernetes' CRI image service (runtime.v1) until SIGTERM or SIGINT.

    Runtime handlers' snapshotters, the sandbox image and disable_snapshot_annotations come from the config.
    """
    from cargohold.cri.server import serve as serve_socket  # grpc is loaded only for the service

    client = state.client(namespace=namespace)
    try:
        serve_socket(client, socket_path,
                     ready=lambda server: eprint(f"cargohold: CRI image service on {server.address} "
                                                 f"(namespace {namespace}, root {client.root})"))
    finally:
        client.close()
    eprint("cargohold: CRI image service stopped")


@serve.command("snapshots")
@click.option("--snapshotter", "snapshotter", required=True, type=click.Choice(["overlayfs", "native"]),
              help="The local snapshotter to serve.")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              callback=validate_socket_path, help="Unix socket to listen on (created with mode 0660; removed on exit).")
@click.option("--store-namespace", default="containerd", show_default=True,
              help="cargohold namespace holding every snapshot containerd makes (containerd's namespaces are in "
                   "its keys). Keep it apart from namespaces with cargohold's own images: containerd's garbage "
                   "collector removes every snapshot there that its database lacks.")
@click.option("--grace", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds calls in flight get to finish after SIGTERM/SIGINT.")
@pass_state
def serve_snapshots(state: State, snapshotter: str, socket_path: Path, store_namespace: str, grace: float) -> None:
    """Serve a snapshotter to containerd (snapshots.v1 gRPC API, a proxy plugin) until SIGTERM or SIGINT.

    containerd's config: [proxy_plugins.cargohold] type = "snapshot" address = SOCKET. Snapshots live in
    the same store the CLI uses, in namespace --store-namespace: `cargohold -n containerd snapshots ls` shows them.
    """
    from cargohold.snapshots.server import serve as serve_socket  # grpc is loaded only for the service

    # No Client: the server needs only the snapshotter and the metadata DB under the root.
    serve_socket(snapshotter, state.root, socket_path, namespace=store_namespace, grace=grace,
                 ready=lambda server: eprint(f"cargohold: snapshotter {snapshotter} on {server.address} "
                                             f"(root {server.root}, namespace {server.namespace})"))
    eprint("cargohold: snapshotter service stopped")


def _mounts_json(mounts: list[Mount]) -> list[dict[str, object]]:
    return [{"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)} for m in mounts]


@click.command("prepare")
@click.argument("key")
@click.option("--image", required=True, help="Image name, digest reference or id (already in the store).")
@click.option("--runtime-handler", default="", help="Runtime handler whose snapshotter to use (config "
              "[runtimes.NAME]); default: the default snapshotter.")
@click.option("--readonly", is_flag=True, help="A read-only view instead of a writable snapshot.")
@output_option
@pass_state
@click.pass_context
def snapshots_prepare(ctx: click.Context, state: State, key: str, image: str, runtime_handler: str, readonly: bool,
                      output: str) -> None:
    """Prepare the rootfs snapshot KEY of a container from IMAGE for a runtime handler; print its mounts.

    The image is unpacked into the handler's snapshotter first when it is not there yet (never pulled: blobs
    missing from the store are an error naming them).
    """
    client = state.client()
    try:
        wanted = ctx.meta.get("snapshotter")
        snapshotter = client.snapshotter_for(runtime_handler)
        if wanted and wanted != snapshotter:
            raise InvalidArgumentError(
                f"--snapshotter {wanted}: runtime handler {runtime_handler or '(default)'} uses snapshotter "
                f"{snapshotter}")
        mounts = client.prepare_rootfs(key, image, runtime_handler, readonly=readonly)
    finally:
        client.close()
    if output == "json":
        emit_json({"key": key, "snapshotter": snapshotter, "mounts": _mounts_json(mounts)})
        return
    for m in mounts:
        opts = ",".join(m.options)
        click.echo(f"mount -t {m.type} {m.source} <target>{'/' + m.target if m.target else ''}"
                   + (f" -o {opts}" if opts else ""))
