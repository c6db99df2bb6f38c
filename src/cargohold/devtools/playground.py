"""``cargohold-registry``: a local registry to try cargohold on, seeded with the images the README tour uses.

Starts Debian's ``docker-registry`` on ``127.0.0.1:PORT`` (default 5000), optionally with basic auth, pushes
the deterministic sample images under ``demo/…`` and serves until Ctrl-C (or SIGTERM), then stops the registry
and exits 0. ``--data DIR`` keeps the registry's storage across runs; without it a temporary directory is
used and removed.

    cargohold-registry [--port 5000] [--user USER:PASSWORD] [--data DIR]
    python -m cargohold.devtools.playground …
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import shutil
import signal
import socket
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from cargohold.devtools import artifacts, demo
from cargohold.devtools.registry import RegistryProcess, free_port, make_htpasswd, start_registry
from cargohold.errors import CargoholdError
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest

DEFAULT_PORT = 5000


def seed(base_url: str) -> dict[str, str]:
    """Push every image the README tour uses: ``demo/app:v1`` (gzip), ``demo/app-zstd:v1`` (same layers,
    zstd), ``demo/multi:v1`` (amd64, arm64, arm/v7), ``demo/legacy:v1`` (docker ≤ 1.10 config) and
    ``demo/app:sbom`` (an SPDX artifact whose subject is ``demo/app:v1``). Returns name -> reference."""
    refs = demo.seed(base_url)
    subject = _manifest_descriptor(base_url, "demo/app", "v1")
    artifacts.push_artifact(base_url, "demo/app", "sbom", artifacts.sbom_artifact(subject))
    refs["sbom"] = f"{base_url.split('://', 1)[1]}/demo/app:sbom"
    return refs


def _manifest_descriptor(base_url: str, repo: str, tag: str) -> Descriptor:
    req = urllib.request.Request(f"{base_url}/v2/{repo}/manifests/{tag}", method="HEAD",
                                 headers={"Accept": mt.MANIFEST_ACCEPT})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - a loopback URL we just started
        return Descriptor(media_type=resp.headers["Content-Type"],
                          digest=Digest.parse(resp.headers["Docker-Content-Digest"]),
                          size=int(resp.headers["Content-Length"]))


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the registry (Go) binds: connections of a previous run in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


@contextlib.contextmanager
def _data_dir(given: str | None) -> Iterator[Path]:
    if given:
        path = Path(given).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="cargohold-registry-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _serve(data: Path, port: int, user: str | None) -> RegistryProcess:
    """Seed the registry in ``data`` and return it serving on ``port`` (with basic auth for ``user``)."""
    if user is None:
        reg = start_registry(data, port=port)
        try:
            seed(reg.url)
        except BaseException:
            reg.stop()
            raise
        return reg
    # Seed anonymously on a port nobody knows, then serve the same storage with auth on the chosen port.
    with start_registry(data, port=free_port()) as seeding:
        seed(seeding.url)
    name, _, password = user.partition(":")
    htpasswd = data / "htpasswd"
    htpasswd.unlink(missing_ok=True)
    make_htpasswd(htpasswd, name, password)
    return start_registry(data, port=port, htpasswd=htpasswd)


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cargohold-registry", description=(
        "Start a local docker-registry on 127.0.0.1 seeded with the sample images of the README tour; "
        "Ctrl-C stops it."))
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1 (default %(default)s)")
    parser.add_argument("--user", metavar="USER:PASSWORD", default=None,
                        help="require basic auth with these credentials (cargohold --user / login)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="keep the registry's storage here (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port}: not a TCP port")
    if args.user is not None and (":" not in args.user or not args.user.split(":", 1)[0]
                                  or not args.user.split(":", 1)[1]):
        parser.error(f"--user {args.user!r}: expected USER:PASSWORD")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not _port_free(args.port):
        print(f"cargohold-registry: error: 127.0.0.1:{args.port} is in use (choose another with --port)",
              file=sys.stderr)
        return 1
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and `kill -INT` must still stop us.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    try:
        with _data_dir(args.data) as data:
            reg = _serve(data, args.port, args.user)
            try:
                print(f"registry: {reg.url} (data {data})", flush=True)
                for ref in ("demo/app:v1", "demo/app-zstd:v1", "demo/multi:v1", "demo/legacy:v1", "demo/app:sbom"):
                    print(f"  {reg.host}/{ref}", flush=True)
                if args.user:
                    print(f"basic auth: cargohold --user {args.user} …", flush=True)
                print("serving; Ctrl-C stops", flush=True)
                code = reg.process.wait()
                print(f"cargohold-registry: error: docker-registry exited with status {code}; log "
                      f"{reg.log_path}:\n{reg.log_text()[-2000:]}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("stopping", flush=True)
                return 0
            finally:
                reg.stop()
    except KeyboardInterrupt:  # Ctrl-C while starting or seeding: what was started is stopped above
        print("stopped before serving", file=sys.stderr)
        return 130
    except (CargoholdError, OSError) as exc:
        print(f"cargohold-registry: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
