"""The core of the facade: one data root (blob files + SQLite metadata), pull, unpack, mount, images, gc.

The operations of ``cargohold.clientops`` (archives, push, runtimes) build on it; ``cargohold.client.Client``
puts them together.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cargohold.config import Config, find_config
from cargohold.content.local import LocalStore
from cargohold.content.namespaced import NamespacedStore
from cargohold.content.store import LABEL_GC_ROOT
from cargohold.diff.apply import apply_layer
from cargohold.diff.removal import remove_tree
from cargohold.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from cargohold.events import Event, EventSink, discard
from cargohold.images.handlers import (
    Handler,
    children,
    compose,
    dispatch,
    filter_platforms,
    limit_manifests,
    read_manifest_or_index,
    set_children_labels,
)
from cargohold.images.image import (
    CheckResult,
    ResolvedManifest,
    manifest_for,
    resolve_manifest,
    walk_required,
)
from cargohold.metadata.db import DEFAULT_NAMESPACE, MetadataDB, utcnow
from cargohold.metadata.gc import GCResult, collect
from cargohold.metadata.images import Image, ImageStore
from cargohold.metadata.leases import LeaseStore, snapshot_kind
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.artifact import is_image, not_runnable_message
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.manifest import Manifest
from cargohold.oci.platform import Platform, PlatformMatcher, default_matcher
from cargohold.oci.reference import Reference
from cargohold.remotes.credentials import CredentialStore
from cargohold.remotes.fetch import DISTRIBUTION_SOURCE, fetch_blob
from cargohold.remotes.resolver import Fetcher, Resolver
from cargohold.snapshots import (
    default_snapshotter_name,
    known_snapshotters,
    open_proxy_snapshotter,
    open_snapshotter,
)
from cargohold.snapshots.base import Kind, Mount, Snapshotter
from cargohold.snapshots.mount import mount_all, mounts_at_or_below, unmount
from cargohold.unpack.labels import cri_layer_labels
from cargohold.unpack.unpacker import FetchFn, LayerLabelsFn, Unpacker, UnpackResult

log = logging.getLogger(__name__)



def default_root() -> Path:
    """``$CARGOHOLD_ROOT``, else ``/var/lib/cargohold`` as root, else ``~/.local/share/cargohold``."""
    env = os.environ.get("CARGOHOLD_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/cargohold")
    return Path.home() / ".local" / "share" / "cargohold"


@dataclass(frozen=True, slots=True, kw_only=True)
class PullResult:
    image: Image
    manifests: tuple[Descriptor, ...]
    fetched: tuple[Descriptor, ...]
    present: tuple[Descriptor, ...]
    unpack: UnpackResult | None = None

    @property
    def fetched_bytes(self) -> int:
        return sum(d.size for d in self.fetched)


class ClientBase:
    """The core operations on one data root and namespace; use ``cargohold.client.Client``."""

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        hosts_dir: Path | str | None = None,
        credentials: CredentialStore | None = None,
        plain_http: bool = False,
        max_concurrent_downloads: int | None = None,
        on_event: EventSink | None = None,
        default_snapshotter: str | None = None,
        config: Config | None = None,
    ) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        # Arguments win over the config file, which wins over built-in defaults.
        self.config = config if config is not None else find_config(None, self.root)
        self.namespace = namespace
        hosts_dir = hosts_dir or self.config.registry_config_path or None
        self.hosts_dir = Path(hosts_dir) if hosts_dir else None
        self.credentials = credentials
        self.plain_http = plain_http
        self.max_concurrent_downloads = max(1, max_concurrent_downloads or self.config.max_concurrent_downloads)
        self.on_event: EventSink = on_event or discard
        self.db = MetadataDB(self.root / "metadata.db", lock_timeout=self.config.lock_timeout)
        self.db.ensure_namespace(namespace)
        self.local = LocalStore(self.root)
        self.content = NamespacedStore(self.local, self.db, namespace)
        self.images = ImageStore(self.db, namespace)
        self._resolver: Resolver | None = None
        self._snapshotters: dict[str, Snapshotter] = {}
        self._default_snapshotter = default_snapshotter or self.config.snapshotter or None
        self._lock = threading.Lock()

    # -- registry ------------------------------------------------------------------------------------------

    @property
    def resolver(self) -> Resolver:
        with self._lock:
            if self._resolver is None:
                self._resolver = Resolver(
                    hosts_dir=self.hosts_dir,
                    credentials=self.credentials,
                    plain_http=self.plain_http,
                    on_event=self.on_event,
                    stall_timeout=self.config.stall_timeout,
                    fetch_timeout=self.config.fetch_timeout,
                )
            return self._resolver

    def pull(
        self,
        ref: str,
        *,
        platforms: Sequence[Platform | str] = (),
        all_platforms: bool = False,
        unpack: bool = True,
        snapshotter: str | None = None,
        layer_labels: bool = False,
        resolver: Resolver | None = None,
    ) -> PullResult:
        """Resolve ``ref``, fetch the image's blobs for the platforms, unpack them, record the image.

        Without ``platforms`` the host platform's best match is fetched; ``all_platforms`` fetches every
        one (only the best match for ``platforms``/the host is unpacked). With ``unpack`` (the default), layers
        stream from the registry into the snapshotter as they arrive. ``layer_labels`` adds the CRI per-layer
        target labels that remote snapshotters use. ``resolver`` replaces the client's for this pull (e.g. one
        with credentials given for this pull only).
        """
        resolver = resolver or self.resolver
        reference = Reference.parse(ref)
        self.on_event(Event(action="resolve", status="running", item=str(reference)))
        _, target = resolver.resolve(reference)
        self.on_event(Event(action="resolve", status="done", item=str(reference), message=str(target.digest)))
        # A lease keeps what this pull writes safe from garbage collection until the image record exists.
        with LeaseStore(self.db, self.namespace).hold(labels={"cargohold.io/pull": str(reference)}) as lease:
            store = self.content.with_lease(lease.id)
            fetcher = resolver.fetcher(reference)
            matcher = _matcher(platforms)
            fetched: list[Descriptor] = []
            present: list[Descriptor] = []
            manifests: list[Descriptor] = []
            deferred: dict[Descriptor, list[Descriptor]] = {}
            record = threading.Lock()
            source = {f"{DISTRIBUTION_SOURCE}.{reference.domain}": reference.path}

            def fetch_one(desc: Descriptor) -> bool:
                was_fetched = self._fetch_one(fetcher, desc, source, store)
                with record:
                    (fetched if was_fetched else present).append(desc)
                return was_fetched

            def fetch(desc: Descriptor) -> Sequence[Descriptor]:
                fetch_one(desc)
                if kinds.is_runnable(desc):  # an attestation is fetched as content, not one of the image's manifests
                    with record:
                        manifests.append(desc)
                return []

            walk: Handler = set_children_labels(store, children(store))
            if not all_platforms:
                walk = limit_manifests(filter_platforms(walk, matcher), matcher, 1)
            if unpack:
                walk = _defer_layers(_refuse_artifact(walk, store, target, str(reference)), deferred, record)
            dispatch(compose(fetch, walk), [target], concurrency=self.max_concurrent_downloads)

            unpack_result: UnpackResult | None = None
            if unpack:
                chosen = manifest_for(store, target, matcher)
                rest = [layer for m, layers in deferred.items() if m.digest != chosen.digest for layer in layers]
                if rest:  # other platforms' layers (--all-platforms): fetched, not unpacked
                    dispatch(fetch, rest, concurrency=self.max_concurrent_downloads)
                resolved = resolve_manifest(store, chosen, matcher, name=str(reference))
                leases = LeaseStore(self.db, self.namespace)
                kind = snapshot_kind(self.snapshotter(snapshotter).name)
                unpacker = self._unpacker(snapshotter, fetch_one, store)
                unpacker.hold = lambda key: leases.add_resource(lease.id, kind, key)
                unpack_result = unpacker.unpack(
                    resolved,
                    layer_labels=self._layer_labels_fn(str(reference), resolved) if layer_labels else None,
                )

            image_name = str(reference)
            now = utcnow()
            image = self.images.put(Image(name=image_name, target=target, labels={}, created_at=now, updated_at=now))
            self.on_event(Event(action="pull", status="done", item=image_name, message=str(target.digest)))
        return PullResult(image=image, manifests=tuple(manifests), fetched=tuple(fetched), present=tuple(present),
                          unpack=unpack_result)

    def _fetch_one(self, fetcher: Fetcher, desc: Descriptor, source: dict[str, str],
                   store: NamespacedStore | None = None) -> bool:
        """Fetch one blob unless present; label it with its distribution source. True when fetched."""
        store = store or self.content
        item = str(desc.digest)
        if store.exists(desc.digest):
            self._add_source_label(desc, source)
            self.on_event(Event(action="fetch", status="exists", item=item, media_type=desc.media_type,
                                current=desc.size, total=desc.size))
            return False
        self.on_event(Event(action="fetch", status="running", item=item, media_type=desc.media_type,
                            total=desc.size))

        def progress(current: int, total: int) -> None:
            self.on_event(Event(action="fetch", status="running", item=item, media_type=desc.media_type,
                                current=current, total=total))

        try:
            fetch_blob(fetcher, store, desc, labels=dict(source), progress=progress)
        except AlreadyExistsError:
            self._add_source_label(desc, source)
        except Exception as exc:
            self.on_event(Event(action="fetch", status="error", item=item, media_type=desc.media_type,
                                message=str(exc)))
            raise
        self.on_event(Event(action="fetch", status="done", item=item, media_type=desc.media_type,
                            current=desc.size, total=desc.size))
        return True

    def _add_source_label(self, desc: Descriptor, source: dict[str, str]) -> None:
        # One transaction: concurrent pulls and pushes adding repositories to the same label lose none.
        with self.db.transaction():
            try:
                info = self.content.info(desc.digest)
            except NotFoundError:
                return
            update: dict[str, str | None] = {}
            for key, repo in source.items():
                have = info.labels.get(key, "")
                repos = [r for r in have.split(",") if r]
                if repo not in repos:
                    update[key] = ",".join([*repos, repo])
            if update:
                self.content.update(desc.digest, update)

    # -- snapshotters and unpack ------------------------------------------------------------------------

    def snapshotter(self, name: str | None = None) -> Snapshotter:
        """The named snapshotter of this root (``native``, ``overlayfs``, a configured proxy), or the default."""
        name = name or self.default_snapshotter
        with self._lock:
            sn = self._snapshotters.get(name)
            if sn is None:
                proxy = self.config.snapshotters.get(name)
                if proxy is not None:
                    sn = open_proxy_snapshotter(proxy.name, proxy.address, namespace=self.namespace,
                                                remote=proxy.remote)
                else:
                    sn = open_snapshotter(name, self.root, self.db, self.namespace)
                self._snapshotters[name] = sn
            return sn

    @property
    def default_snapshotter(self) -> str:
        return self._default_snapshotter or default_snapshotter_name(self.root)

    def _unpacker(self, snapshotter: str | None, fetch: FetchFn | None, store: NamespacedStore | None = None
                  ) -> Unpacker:
        return Unpacker(
            content=store or self.content,
            snapshotter=self.snapshotter(snapshotter),
            locks_dir=self.root / "unpack" / "locks",
            fetch=fetch,
            concurrency=self.max_concurrent_downloads,
            on_event=self.on_event,
        )

    def _layer_labels_fn(self, image_ref: str, resolved: ResolvedManifest) -> LayerLabelsFn:
        layers = resolved.manifest.layers
        manifest_digest = str(resolved.descriptor.digest)
        return lambda i: cri_layer_labels(image_ref, manifest_digest, layers, i)

    def unpack(
        self,
        name: str,
        *,
        snapshotter: str | None = None,
        platform: Platform | str | None = None,
        layer_labels: bool = False,
        fetch_missing: bool = True,
    ) -> UnpackResult:
        """Unpack an image already in the store into a snapshotter.

        Blobs missing from the store are fetched from the image's registry when ``fetch_missing`` and the
        image's name is a registry reference; otherwise a missing blob is an error that names it.
        """
        image = self.image(name)
        matcher = _matcher([platform] if platform else [])
        resolved = resolve_manifest(self.content, image.target, matcher, name=image.name)
        fetch: FetchFn | None = None
        if fetch_missing:
            fetch = self._registry_fetch_fn(image.name)
        # A lease keeps the snapshots this unpack commits safe from a concurrent gc until the config's
        # gc.ref.snapshot label (set at the end) references them.
        leases = LeaseStore(self.db, self.namespace)
        with leases.hold(labels={"cargohold.io/unpack": image.name}) as lease:
            unpacker = self._unpacker(snapshotter, fetch, self.content.with_lease(lease.id))
            kind = snapshot_kind(unpacker.snapshotter.name)
            unpacker.hold = lambda key: leases.add_resource(lease.id, kind, key)
            return unpacker.unpack(
                resolved, layer_labels=self._layer_labels_fn(image.name, resolved) if layer_labels else None
            )

    def _registry_fetch_fn(self, image_name: str) -> FetchFn | None:
        try:
            reference = Reference.parse(image_name)
        except InvalidArgumentError:
            return None
        source = {f"{DISTRIBUTION_SOURCE}.{reference.domain}": reference.path}
        fetcher: list[Fetcher] = []

        def fetch(desc: Descriptor) -> bool:
            if not fetcher:
                fetcher.append(self.resolver.fetcher(reference))
            return self._fetch_one(fetcher[0], desc, source)

        return fetch

    def unpacked(self, name: str, snapshotter: str | None = None, platform: Platform | str | None = None) -> bool:
        """Whether the image's top layer snapshot exists in the snapshotter."""
        try:
            resolved = self.resolve_manifest(name, platform)
        except (NotFoundError, UnsupportedMediaTypeError):  # an artifact is never unpacked
            return False
        if not resolved.chain_ids:
            return False
        try:
            info = self.snapshotter(snapshotter).stat(str(resolved.chain_ids[-1]))
        except NotFoundError:
            return False
        return info.kind == Kind.COMMITTED

    def rootfs(self, name: str, target: Path | str, *, platform: Platform | str | None = None) -> Path:
        """Write the image's flattened filesystem (whiteouts applied) into a plain, empty directory."""
        dest = Path(target)
        if dest.exists() and any(dest.iterdir()):
            raise FailedPreconditionError(f"{dest}: directory is not empty")
        resolved = self.resolve_manifest(name, platform)
        missing = [layer for layer in resolved.manifest.layers if not self.content.exists(layer.digest)]
        if missing:
            raise FailedPreconditionError(
                f"image {name}: missing blobs: {', '.join(str(layer.digest) for layer in missing)}"
            )
        dest.mkdir(parents=True, exist_ok=True)
        for layer, diff_id in zip(resolved.manifest.layers, resolved.diff_ids, strict=True):
            self.on_event(Event(action="apply", status="running", item=str(layer.digest),
                                media_type=layer.media_type, total=layer.size))
            with self.content.open(layer.digest) as stream:
                apply_layer(dest, stream, expected_digest=layer.digest, expected_diff_id=diff_id)
            self.on_event(Event(action="apply", status="done", item=str(layer.digest),
                                media_type=layer.media_type, current=layer.size, total=layer.size))
        return dest

    def remove_rootfs(self, target: Path | str) -> None:
        """Remove a directory tree written by ``rootfs``, read-only directories included (an ordinary user's
        ``rm -rf`` cannot), never following symlinks. Refuses a path that is not a directory, a tree with
        anything mounted at or below it, one holding the data root, and one whose directory is not writable."""
        given = os.path.abspath(target)
        # The parent's real path, as /proc/self/mountinfo spells mount points; the last component stays
        # unresolved (a symlink there is refused below, not followed).
        path = os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFoundError(f"{path}: no such directory") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgumentError(f"{path}: not a directory")
        mounted = mounts_at_or_below(path)
        if mounted:
            raise FailedPreconditionError(f"{path}: {mounted[-1]} is mounted there; unmount it first")
        data_root = os.path.abspath(self.root)
        if data_root == path or data_root.startswith(path.rstrip("/") + "/"):
            raise FailedPreconditionError(f"{path}: holds the data root {data_root}; not removing it")
        parent = os.path.dirname(path)
        if not os.access(parent, os.W_OK | os.X_OK):  # checked first: nothing is removed if the top cannot be
            raise FailedPreconditionError(f"{path}: cannot remove it, its directory {parent} is not writable")
        try:
            remove_tree(path, one_filesystem=True)
        except OSError as exc:
            raise FailedPreconditionError(
                f"removing {path}: {exc.filename}: {exc.strerror or exc}") from exc

    def mount(self, name: str, target: Path | str, *, snapshotter: str | None = None,
              platform: Platform | str | None = None, writable: bool = False) -> list[Mount]:
        """Mount the image's root filesystem at ``target`` (read-only unless ``writable``), unpacking first
        when needed. The snapshot is keyed by the mount point, so ``unmount(target)`` finds it."""
        dest = Path(target).resolve()
        if not dest.is_dir():
            raise NotFoundError(f"mount point {dest}: not a directory")
        sn = self.snapshotter(snapshotter)
        if not self.unpacked(name, sn.name, platform):
            self.unpack(name, snapshotter=sn.name, platform=platform)
        resolved = self.resolve_manifest(name, platform)
        key = _mount_key(dest)
        parent = str(resolved.chain_ids[-1])
        # gc.root: a mounted snapshot is referenced by nothing else, yet must survive garbage collection.
        labels = {MOUNT_LABEL: str(dest), LABEL_GC_ROOT: utcnow().isoformat()}
        mounts = sn.prepare(key, parent, labels) if writable else sn.view(key, parent, labels)
        try:
            mount_all(mounts, dest)
        except BaseException:
            sn.remove(key)
            raise
        return mounts

    def unmount(self, target: Path | str) -> None:
        """Unmount what ``mount`` mounted at ``target`` and remove its snapshot."""
        dest = Path(target).resolve()
        key = _mount_key(dest)
        unmount(dest)
        for name in [*known_snapshotters(), *self.config.snapshotters]:
            try:
                sn = self.snapshotter(name)
                sn.stat(key)
            except (NotFoundError, FailedPreconditionError, UnavailableError):
                continue
            sn.remove(key)

    # -- images ----------------------------------------------------------------------------------------------

    def image(self, name: str) -> Image:
        return self.images.get(_image_name(name))

    def list_images(self) -> list[Image]:
        return self.images.list()

    def tag(self, source: str, target: str) -> Image:
        src = self.image(source)
        now = utcnow()
        return self.images.put(Image(name=_image_name(target), target=src.target, labels=dict(src.labels),
                                     created_at=now, updated_at=now))

    def remove_image(self, name: str) -> None:
        self.images.delete(_image_name(name))

    def resolve_manifest(self, name: str, platform: Platform | str | None = None) -> ResolvedManifest:
        image = self.image(name)
        return resolve_manifest(self.content, image.target, _matcher([platform] if platform else []),
                                name=image.name)

    def check(self, name: str, *, platforms: Sequence[Platform | str] = (), all_platforms: bool = False
              ) -> CheckResult:
        image = self.image(name)
        return walk_required(self.content, image.target, None if all_platforms else _matcher(platforms))

    def gc(self, *, dry_run: bool = False) -> tuple[GCResult, list[tuple[str, str, str]]]:
        """Collect garbage in every namespace: unreferenced content rows and blob files, expired leases, and
        committed snapshots nothing references (children first). Active snapshots and views (mounts, unpacks
        in progress) are left alone. Returns the collection and the snapshots removed (or that would be)."""
        result = collect(self.db, self.local, dry_run=dry_run)
        pending: list[tuple[str, str, str]] = []
        for node in result.removed_snapshots:
            name, namespace, key = node
            if name not in known_snapshotters():
                continue
            sn = self.snapshotter(name) if namespace == self.namespace else open_snapshotter(
                name, self.root, self.db, namespace)
            try:
                if sn.stat(key).kind == Kind.COMMITTED:
                    pending.append(node)
            except NotFoundError:
                pass
        if dry_run:
            return result, pending
        removed: list[tuple[str, str, str]] = []
        while pending:  # a dead snapshot's children are dead too: remove leaves until none is left
            progress = False
            for node in list(pending):
                name, namespace, key = node
                sn = self.snapshotter(name) if namespace == self.namespace else open_snapshotter(
                    name, self.root, self.db, namespace)
                try:
                    sn.remove(key)
                except FailedPreconditionError:
                    continue  # still has children (maybe live ones: a mount on top); retried next pass
                except NotFoundError:
                    pass
                else:
                    removed.append(node)
                pending.remove(node)
                progress = True
            if not progress:
                break
        return result, removed

    def close(self) -> None:
        """Release the snapshotters (a proxy's gRPC channel), the registry connections and the database."""
        with self._lock:
            snapshotters, self._snapshotters = list(self._snapshotters.values()), {}
            resolver, self._resolver = self._resolver, None
        for sn in snapshotters:
            sn.close()
        if resolver is not None:
            resolver.close()
        self.db.close()




MOUNT_LABEL = "cargohold.io/mount-point"


def _mount_key(path: Path) -> str:
    return f"mount:{path}"


def _defer_layers(handler: Handler, deferred: dict[Descriptor, list[Descriptor]], lock: threading.Lock) -> Handler:
    """Keep manifests' layers out of the walk (the unpacker streams them) and note them by manifest."""

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        kids = handler(desc)
        if not mt.is_manifest(desc.media_type):
            return kids
        layers = [k for k in kids if mt.is_layer(k.media_type)]
        with lock:
            deferred[desc] = layers
        return [k for k in kids if not mt.is_layer(k.media_type)]

    return handle


def _refuse_artifact(handler: Handler, store: NamespacedStore, target: Descriptor, name: str) -> Handler:
    """Before walking below the target manifest, refuse an artifact: a pull that unpacks fetches nothing more
    of it and records no image (``resolve_manifest`` says the same for an artifact chosen from an index)."""

    def handle(desc: Descriptor) -> Sequence[Descriptor]:
        if desc.digest == target.digest and mt.is_manifest(desc.media_type):
            doc = read_manifest_or_index(store, desc)
            if isinstance(doc, Manifest) and not is_image(doc):
                raise UnsupportedMediaTypeError(not_runnable_message(name, doc))
        return handler(desc)

    return handle


def _matcher(platforms: Sequence[Platform | str | None]) -> PlatformMatcher:
    wanted = [p if isinstance(p, Platform) else Platform.parse(p) for p in platforms if p]
    return PlatformMatcher(wanted) if wanted else default_matcher()


def _image_name(name: str) -> str:
    """Image names are stored normalised; ``alpine`` finds ``docker.io/library/alpine:latest``."""
    try:
        return str(Reference.parse(name))
    except InvalidArgumentError:
        return name
