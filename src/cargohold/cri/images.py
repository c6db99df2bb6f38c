"""cargohold images, credentials and disk usage in CRI's terms, following containerd's CRI image service.

* Image identity: the id is the config digest of the host platform's manifest; every name pointing at that
  config is one image (``repo_tags``: names with a tag; ``repo_digests``: ``repository@digest`` of what each
  name points at); ``size`` is the manifest's config and layers; ``uid``/``username`` come from the config's
  ``User`` (a number is a uid, anything else a user name; a ``:group`` is dropped); ``pinned`` marks the
  config's ``sandbox_image`` (by a name or a repo digest).
* Credentials: AuthConfig's username/password, else identity token, else ``auth`` (base64 ``user:password``),
  and ``registry_token`` (a bearer token used as it is); ``server_address`` limits them to that registry.
* Usage: the bytes (allocated blocks) and inodes under each snapshotter's directory, the default snapshotter
  first (kubelet reads the first entry), then the content store's blobs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cargohold.client import Client, PullAuth, RuntimeImage
from cargohold.cri.proto import api_pb2 as pb
from cargohold.errors import CargoholdError, InvalidArgumentError
from cargohold.oci.reference import Reference
from cargohold.remotes.credentials import normalize_server
from cargohold.snapshots import known_snapshotters
from cargohold.snapshots.dirs import disk_usage

RUNTIME_HANDLER_ANNOTATION = "io.kubernetes.cri.runtime-handler"
"""Sandbox annotation older kubelets used for the runtime handler of a pull (containerd still reads it)."""

_UID = re.compile(r"[+-]?[0-9]+\Z")


def image_user(user: str) -> tuple[int | None, str]:
    """(uid, username) of a config ``User``: ``"1000"`` -> (1000, ""), ``"nginx:www"`` -> (None, "nginx").

    A uid is what Go's ``strconv.ParseInt(s, 10, 64)`` reads, as containerd: ``1_000``, `` 7`` or a number
    past int64 are user names (and never break the Int64Value of the CRI message)."""
    if not user:
        return None, ""
    name = user.split(":", 1)[0]
    if _UID.match(name) and -(1 << 63) <= (uid := int(name)) < (1 << 63):
        return uid, ""
    return None, name


def is_pinned(client: Client, image: RuntimeImage) -> bool:
    """Whether ``image`` is the config's sandbox (pause) image, which kubelet should not garbage-collect."""
    sandbox = client.config.sandbox_image
    if not sandbox:
        return False
    try:
        name = str(Reference.parse(sandbox))
    except InvalidArgumentError:
        return False
    return name in image.names or name in image.repo_digests


def to_cri_image(client: Client, image: RuntimeImage) -> pb.Image:
    """The CRI ``Image`` message of ``image``."""
    uid, username = image_user(image.user)
    msg = pb.Image(id=str(image.id), repo_tags=list(image.repo_tags), repo_digests=list(image.repo_digests),
                   size=image.size, username=username, pinned=is_pinned(client, image))
    if uid is not None:
        msg.uid.value = uid
    return msg


def unpacked_in(client: Client, image: RuntimeImage) -> list[str]:
    """The snapshotters (local, configured proxies and the runtimes') the image's top layer is committed in."""
    names = set(known_snapshotters()) | set(client.config.snapshotters)
    names |= {r.snapshotter for r in client.config.runtimes.values() if r.snapshotter}
    found = []
    for name in sorted(names):
        with contextlib.suppress(CargoholdError, OSError):  # a proxy that is down, a snapshotter unknown here
            if client.committed_in(image.resolved, name):
                found.append(name)
    return found


def verbose_info(client: Client, image: RuntimeImage) -> dict[str, str]:
    """ImageStatus's ``info`` map: ``info`` is JSON with the chain ids, the config, the manifest and where the
    image is unpacked (containerd's keys ``chainID`` and ``imageSpec``, and more)."""
    resolved = image.resolved
    chain_ids = [str(c) for c in resolved.chain_ids]
    config: Any
    try:
        config = json.loads(resolved.config.raw)
    except ValueError:
        config = {}
    doc = {
        "id": str(image.id),
        "names": list(image.names),
        "chainID": chain_ids[-1] if chain_ids else "",
        "chainIDs": chain_ids,
        "diffIDs": [str(d) for d in resolved.diff_ids],
        "manifestDigest": str(resolved.descriptor.digest),
        "layers": [str(layer.digest) for layer in resolved.manifest.layers],
        "snapshotters": unpacked_in(client, image),
        "pinned": is_pinned(client, image),
        "imageSpec": config,
    }
    return {"info": json.dumps(doc, sort_keys=True)}


def pull_auth(auth: pb.AuthConfig) -> PullAuth | None:
    """The credentials an AuthConfig carries (None when it carries none). A malformed ``auth`` field is an
    InvalidArgumentError (the password is never part of the message)."""
    server = normalize_server(auth.server_address) if auth.server_address else ""
    token = auth.registry_token
    if auth.username:
        return PullAuth(username=auth.username, password=auth.password, registry_token=token, server=server)
    if auth.identity_token:
        return PullAuth(identity_token=auth.identity_token, registry_token=token, server=server)
    if auth.auth:
        try:
            decoded = base64.b64decode(auth.auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgumentError("auth config: field auth is not base64") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise InvalidArgumentError("auth config: field auth does not decode to user:password")
        return PullAuth(username=user, password=password.strip("\x00"), registry_token=token, server=server)
    if token:
        return PullAuth(registry_token=token, server=server)
    return None


# -- image filesystem usage ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DirUsage:
    """Allocated bytes (st_blocks * 512) and distinct inodes under one directory, at ``timestamp`` (ns)."""

    path: Path
    used_bytes: int
    inodes: int
    timestamp: int


def dir_usage(path: Path) -> DirUsage:
    """Usage of the tree at ``path``, itself included (0 when it does not exist). Hardlinks count once; other
    filesystems mounted inside are not entered; entries removed while walking are skipped."""
    usage = disk_usage(path, one_filesystem=True)
    return DirUsage(path=path, used_bytes=usage.size, inodes=usage.inodes, timestamp=time.time_ns())


def image_filesystems(client: Client) -> list[DirUsage]:
    """Usage of every local snapshotter directory that exists (the default snapshotter's first, even when it
    does not exist yet), then of the content store."""
    default = client.default_snapshotter
    names = [default, *[n for n in known_snapshotters() if n != default]]
    dirs: Iterable[Path] = [client.root / "snapshots" / n for n in names]
    usages = [dir_usage(d) for i, d in enumerate(dirs) if i == 0 or d.exists()]
    usages.append(dir_usage(client.root / "content"))
    return usages


def to_fs_usage(usage: DirUsage) -> pb.FilesystemUsage:
    return pb.FilesystemUsage(timestamp=usage.timestamp, fs_id=pb.FilesystemIdentifier(mountpoint=str(usage.path)),
                              used_bytes=pb.UInt64Value(value=usage.used_bytes),
                              inodes_used=pb.UInt64Value(value=usage.inodes))
