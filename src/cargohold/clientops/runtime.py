"""Runtime handlers: each may use its own snapshotter; images as a container runtime sees them; container rootfs.

A runtime handler (kubelet's RuntimeClass handler, e.g. ``runc`` or ``kata``) names a snapshotter in the
config (``[runtimes.NAME] snapshotter = ...``). An image pulled for one handler is unpacked into that handler's
snapshotter; when a container of another handler needs it, ``ensure_unpacked`` unpacks it into the other
snapshotter through the same unpacker a pull uses, with the same per-layer CRI labels (containerd PR #12835),
so a remote snapshotter finds what it needs to fetch lazily.

``ensure_unpacked`` and ``prepare_rootfs`` never contact a registry, as containerd's CRI plugin does not when
it unpacks at container creation: an image imported offline (air-gapped nodes) works, and an image whose blobs
were garbage-collected fails with an error naming the image and every missing digest, to be repaired by pulling
it again (``pull_for_runtime``), which is the only path here that talks to a registry.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from cargohold.clientbase import ClientBase, PullResult
from cargohold.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnauthorizedError,
)
from cargohold.images.image import ResolvedManifest, resolve_manifest
from cargohold.metadata.db import utcnow
from cargohold.metadata.gc import LABEL_GC_ROOT
from cargohold.metadata.images import Image
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.platform import default_matcher
from cargohold.oci.reference import Reference
from cargohold.remotes.auth import Authorizer
from cargohold.remotes.credentials import (
    ChainCredentials,
    Credentials,
    CredentialStore,
    StaticCredentials,
    normalize_server,
)
from cargohold.remotes.hosts import RegistryHost
from cargohold.remotes.http import Response, Transport, discard_response
from cargohold.remotes.resolver import Resolver
from cargohold.snapshots.base import Kind, Mount
from cargohold.unpack.unpacker import UnpackResult

CONTAINER_LABEL = "cargohold.io/container"
"""Label on a container's rootfs snapshot: the container id."""
IMAGE_LABEL = "cargohold.io/image"
"""Label on a container's rootfs snapshot: the image name it was prepared from."""
RUNTIME_HANDLER_LABEL = "cargohold.io/runtime-handler"
"""Label on a container's rootfs snapshot: the runtime handler it was prepared for."""

_ID = re.compile(r"^(?:sha256:)?([0-9a-f]{1,64})$")


@dataclass(frozen=True, slots=True, kw_only=True)
class PullAuth:
    """Credentials for one pull, as CRI's AuthConfig carries them.

    ``username``/``password`` (Basic, or the token server's password grant), ``identity_token`` (a refresh
    token for the token server) or ``registry_token`` (sent to the registry as ``Bearer`` as it is).
    ``server`` (``host[:port]`` or a URL) limits them to that registry; "" means any host of the pull.
    """

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""
    server: str = ""

    def __repr__(self) -> str:  # never print secrets
        return f"PullAuth(username={self.username!r}, server={self.server!r}, secrets=***)"

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeImage:
    """One image as a container runtime sees it: all the names whose platform manifest has the same config.

    ``id`` is the config digest (containerd's CRI image id); ``names`` are the image records pointing at it,
    sorted; ``targets`` what each name points at (manifest or index); ``resolved`` is the host platform's
    manifest and config.
    """

    id: Digest
    names: tuple[str, ...]
    resolved: ResolvedManifest
    targets: Mapping[str, Descriptor]

    @property
    def repo_tags(self) -> tuple[str, ...]:
        """Names with a tag and no digest (``registry/repo:tag``)."""
        return tuple(n for n in self.names if (r := _parse(n)) is not None and r.digest is None)

    @property
    def repo_digests(self) -> tuple[str, ...]:
        """``registry/repo@digest`` for every name, with the digest of what that name points at (manifest or
        index), as containerd reports them; unique, sorted."""
        out: set[str] = set()
        for name in self.names:
            reference = _parse(name)
            if reference is None:
                continue
            digest = reference.digest or self.targets[name].digest
            out.add(f"{reference.name}@{digest}")
        return tuple(sorted(out))

    @property
    def name(self) -> str:
        """The name to use for this image: its first tag, else its first digest name, else its first name."""
        return (self.repo_tags or self.names)[0]

    @property
    def size(self) -> int:
        """The platform manifest's config and layers, compressed, in bytes."""
        manifest = self.resolved.manifest
        return manifest.config.size + sum(layer.size for layer in manifest.layers)

    @property
    def user(self) -> str:
        """The config's ``User`` ("" when unset)."""
        value = self.resolved.config.config.get("User", "")
        return value if isinstance(value, str) else ""


class BearerTokenAuthorizer(Authorizer):
    """Sends a fixed bearer token (CRI's ``registry_token``) to the registries ``hosts`` (all when empty); other
    hosts are left to ``fallback``. A 401 is an UnauthorizedError naming the host: the token is not renewable."""

    def __init__(self, transport: Transport, token: str, *, fallback: Authorizer, hosts: Sequence[str] = ()
                 ) -> None:
        super().__init__(transport, None)
        self.token = token
        self.hosts = frozenset(normalize_server(h) for h in hosts)
        self.fallback = fallback

    def send(self, host: RegistryHost, scopes: Iterable[str], do: Callable[[Mapping[str, str]], Response], *,
             repository: str) -> Response:
        mine = not self.hosts or normalize_server(host.host) in self.hosts or (
            bool(host.namespace) and normalize_server(host.namespace) in self.hosts)
        if not mine:
            return self.fallback.send(host, scopes, do, repository=repository)
        resp = do({"Authorization": f"Bearer {self.token}"})
        if resp.status == 401:
            discard_response(resp)
            where = f"{host.namespace or host.host}/{repository}" if repository else host.host
            raise UnauthorizedError(f"{where}: unauthorized: {host.host} rejected the registry token")
        return resp


class RuntimeOps(ClientBase):
    """``snapshotter_for``, ``pull_for_runtime``, ``runtime_images``, ``runtime_image``,
    ``remove_runtime_image``, ``ensure_unpacked``, ``prepare_rootfs``."""

    # -- runtime handlers --------------------------------------------------------------------------------

    def snapshotter_for(self, runtime_handler: str = "") -> str:
        """The snapshotter of ``runtime_handler`` from the config; the default snapshotter for "" or a handler
        the config does not name (as containerd, the image service does not refuse unknown handlers)."""
        return self.config.snapshotter_for(runtime_handler) or self.default_snapshotter

    def pull_for_runtime(self, ref: str, runtime_handler: str = "", *, auth: PullAuth | None = None
                         ) -> PullResult:
        """Pull ``ref`` for a runtime handler, as CRI's PullImage: always resolved at the registry again (a
        moved tag is picked up), unpacked into the handler's snapshotter with the CRI per-layer labels unless
        ``disable_snapshot_annotations``; ``auth`` is used for this pull only. The image is also named
        ``repository@digest`` (as containerd), so it stays reachable when its tag moves."""
        snapshotter = self.snapshotter(self.snapshotter_for(runtime_handler)).name  # unknown: fail before fetching
        with self._pull_resolver(auth) as resolver:
            result = self.pull(ref, snapshotter=snapshotter,
                               layer_labels=not self.config.disable_snapshot_annotations, resolver=resolver)
        reference = Reference.parse(result.image.name)
        by_digest = f"{reference.name}@{result.image.target.digest}"
        if by_digest != result.image.name:
            self.tag(result.image.name, by_digest)
        return result

    @contextlib.contextmanager
    def _pull_resolver(self, auth: PullAuth | None) -> Iterator[Resolver]:
        """The client's resolver; with ``auth``, a fresh one (its own token cache) so credentials given for
        one pull never leak into other pulls through cached tokens."""
        if auth is None or auth.empty:
            yield self.resolver
            return
        hosts = (auth.server,) if auth.server else ()
        stores: list[CredentialStore] = []
        if auth.username or auth.password or auth.identity_token:
            creds = Credentials(username=auth.username, password=auth.password,
                                identity_token=auth.identity_token)
            stores.append(StaticCredentials(creds, hosts))
        if self.credentials is not None:
            stores.append(self.credentials)
        resolver = Resolver(hosts_dir=self.hosts_dir, credentials=ChainCredentials(*stores),
                            plain_http=self.plain_http, on_event=self.on_event)
        if auth.registry_token:
            resolver.authorizer = BearerTokenAuthorizer(resolver.transport, auth.registry_token, hosts=hosts,
                                                        fallback=resolver.authorizer)
        try:
            yield resolver
        finally:
            resolver.close()

    # -- images by id ------------------------------------------------------------------------------------

    def runtime_images(self) -> list[RuntimeImage]:
        """Every image of the namespace, grouped by image id (config digest), by id. Images whose manifest or
        config cannot be read (blobs gone, no manifest for this platform) are left out, as containerd's CRI
        image store does."""
        groups: dict[Digest, tuple[ResolvedManifest, dict[str, Descriptor]]] = {}
        for image in self.list_images():
            resolved = self._resolve_quiet(image)
            if resolved is None:
                continue
            entry = groups.setdefault(resolved.manifest.config.digest, (resolved, {}))
            entry[1][image.name] = image.target
        return [RuntimeImage(id=digest, names=tuple(sorted(targets)), resolved=resolved, targets=targets)
                for digest, (resolved, targets) in sorted(groups.items(), key=lambda kv: str(kv[0]))]

    def runtime_image(self, ref_or_id: str) -> RuntimeImage:
        """The image named ``ref_or_id`` (a name or one of its repo digests, normalised as docker does) or with
        that image id (the full ``sha256:<hex>``, or a unique prefix of the hex as containerd's CRI accepts).
        NotFoundError else."""
        images = self.runtime_images()
        reference = _parse(ref_or_id)
        if reference is not None and not _is_full_id(ref_or_id):
            name = str(reference)
            for img in images:
                if name in img.names or name in img.repo_digests:
                    return img
        match = _ID.match(ref_or_id)
        if match is not None:
            hexpart = match.group(1)
            full = ref_or_id.startswith("sha256:") and len(hexpart) == 64
            found = [img for img in images if img.id.hex == hexpart or (not full and img.id.hex.startswith(hexpart))]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise InvalidArgumentError(f"image id prefix {ref_or_id!r} is ambiguous: "
                                           f"{', '.join(str(i.id) for i in found)}")
        raise NotFoundError(f"image {ref_or_id}: not found in namespace {self.namespace}")

    def remove_runtime_image(self, ref_or_id: str) -> tuple[str, ...]:
        """Remove every name of the image ``ref_or_id`` stands for (CRI's RemoveImage); the names removed.
        An unknown image removes nothing. Content and snapshots go at the next ``gc``."""
        try:
            img = self.runtime_image(ref_or_id)
        except NotFoundError:
            return ()
        removed = []
        for name in img.names:
            with contextlib.suppress(NotFoundError):
                self.remove_image(name)
                removed.append(name)
        return tuple(removed)

    def _resolve_quiet(self, image: Image) -> ResolvedManifest | None:
        try:
            return resolve_manifest(self.content, image.target, default_matcher())
        except (NotFoundError, InvalidArgumentError):
            return None

    def _record_name(self, image: str) -> str:
        """The image record ``image`` stands for: itself (normalised) when such a record exists, else the
        preferred name of the image with that id."""
        try:
            return self.image(image).name
        except NotFoundError:
            pass
        return self.runtime_image(image).name

    # -- unpack for a handler, rootfs -------------------------------------------------------------------

    def committed_in(self, resolved: ResolvedManifest, snapshotter: str) -> bool:
        """Whether the top layer of ``resolved`` is a committed snapshot of ``snapshotter``."""
        chain_ids = resolved.chain_ids
        if not chain_ids:
            return False
        try:
            return self.snapshotter(snapshotter).stat(str(chain_ids[-1])).kind == Kind.COMMITTED
        except NotFoundError:
            return False

    def ensure_unpacked(self, image: str, runtime_handler: str = "") -> UnpackResult | None:
        """Unpack an image already in the store into the handler's snapshotter, as a pull for that handler
        would (same unpacker, same CRI labels unless ``disable_snapshot_annotations``). None when it is
        unpacked there already. Never pulls: blobs missing from the store are a FailedPreconditionError that
        names the image and every missing digest."""
        return self._ensure_unpacked(self._record_name(image), self.snapshotter_for(runtime_handler))[1]

    def _ensure_unpacked(self, name: str, snapshotter: str) -> tuple[Digest, UnpackResult | None]:
        """``ensure_unpacked`` of the image record ``name``; also returns the image's top chainID."""
        try:
            resolved: ResolvedManifest | None = self.resolve_manifest(name)
        except NotFoundError:
            resolved = None  # its manifest or config is gone (or no manifest for this platform): named below
        if resolved is not None and self.committed_in(resolved, snapshotter):
            return resolved.chain_ids[-1], None
        missing = self.check(name).missing
        if missing:
            raise FailedPreconditionError(
                f"image {name}: cannot unpack into snapshotter {snapshotter}: {len(missing)} blob(s) missing "
                f"from the content store (garbage-collected?): {', '.join(str(d.digest) for d in missing)}; "
                "pull the image again"
            )
        result = self.unpack(name, snapshotter=snapshotter, fetch_missing=False,
                             layer_labels=not self.config.disable_snapshot_annotations)
        return result.chain_id, result

    def prepare_rootfs(self, container_id: str, image: str, runtime_handler: str = "", *,
                       readonly: bool = False) -> list[Mount]:
        """The rootfs of a container: ``ensure_unpacked``, then an active snapshot (a view when ``readonly``)
        keyed ``container_id`` on the image's top layer in the handler's snapshotter. Returns its mounts.

        The snapshot is a GC root (nothing else references it); remove it with the snapshotter's ``remove``.
        AlreadyExistsError names the key when the container has a rootfs already.
        """
        if not container_id:
            raise InvalidArgumentError("prepare rootfs: empty container id")
        name = self._record_name(image)
        snapshotter = self.snapshotter_for(runtime_handler)
        top, _ = self._ensure_unpacked(name, snapshotter)
        sn = self.snapshotter(snapshotter)
        parent = str(top)
        labels = {LABEL_GC_ROOT: utcnow().isoformat(), CONTAINER_LABEL: container_id, IMAGE_LABEL: name}
        if runtime_handler:
            labels[RUNTIME_HANDLER_LABEL] = runtime_handler
        try:
            return sn.view(container_id, parent, labels) if readonly else sn.prepare(container_id, parent, labels)
        except AlreadyExistsError:
            raise AlreadyExistsError(
                f"container {container_id}: snapshot key {container_id!r} already exists in snapshotter "
                f"{sn.name}") from None


def _parse(name: str) -> Reference | None:
    try:
        return Reference.parse(name)
    except InvalidArgumentError:
        return None


def _is_full_id(text: str) -> bool:
    match = _ID.match(text)
    return match is not None and text.startswith("sha256:") and len(match.group(1)) == 64
