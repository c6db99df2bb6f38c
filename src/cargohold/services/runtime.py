"""Runtime handlers: each may use its own snapshotter; images as a container runtime sees them; container rootfs.

A runtime handler (kubelet's RuntimeClass handler, e.g. ``runc`` or ``kata``) names a snapshotter in the
config (``[runtimes.NAME] snapshotter = ...``). An image pulled for one handler is unpacked into that handler's
snapshotter; when a container of another handler needs it, ``ensure_unpacked`` unpacks it into the other
snapshotter through the same unpacker a pull uses, with the same per-layer CRI labels (containerd PR #12835),
so a remote snapshotter finds what it needs to fetch lazily.

``ensure_unpacked`` and ``prepare_rootfs`` never contact a registry, as containerd's CRI plugin does not when
it unpacks at container creation: an image imported offline (air-gapped nodes) works, and an image whose blobs
were garbage-collected fails with an error naming the image and every missing digest, to be repaired by pulling
it again (``pull_for_runtime``), which is the only path here that talks to a registry. A remote snapshotter is
the exception, for layers: into one only the manifest and config must be local, the snapshotter itself
fetches the layers the target labels name.

Needs: a ``Store``, an event sink, the executors (a pull's and an unpack's) and, to pull, a resolver.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

from cargohold.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from cargohold.events import EventSink
from cargohold.images.image import ResolvedManifest, resolve_manifest
from cargohold.metadata.db import utcnow
from cargohold.metadata.images import Image
from cargohold.metadata.labels import CONTAINER_LABEL, IMAGE_LABEL, LABEL_GC_ROOT, RUNTIME_HANDLER_LABEL
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.platform import default_matcher
from cargohold.oci.reference import Reference
from cargohold.remotes.pullauth import PullAuth
from cargohold.remotes.resolver import Resolver
from cargohold.services import images
from cargohold.services.pull import PullResult, pull
from cargohold.services.unpack import committed_in, unpack
from cargohold.snapshots.base import Mount
from cargohold.store import Store
from cargohold.unpack.unpacker import UnpackResult

__all__ = ["PullAuth", "RuntimeImage", "ensure_unpacked", "prepare_rootfs", "pull_for_runtime",
           "remove_runtime_image", "runtime_image", "runtime_images", "snapshotter_for"]

_ID = re.compile(r"^(?:sha256:)?([0-9a-f]{1,64})$")


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


# -- runtime handlers ----------------------------------------------------------------------------------------


def snapshotter_for(store: Store, runtime_handler: str = "") -> str:
    """The snapshotter of ``runtime_handler`` from the config; the default snapshotter for "" or a handler
    the config does not name (as containerd, the image service does not refuse unknown handlers)."""
    return store.config.snapshotter_for(runtime_handler) or store.default_snapshotter


def pull_for_runtime(store: Store, ref: str, runtime_handler: str = "", *, resolver: Resolver, on_event: EventSink,
                     executor: Executor, unpack_executor: Executor) -> PullResult:
    """Pull ``ref`` for a runtime handler, as CRI's PullImage: always resolved at the registry again (a
    moved tag is picked up), unpacked into the handler's snapshotter with the CRI per-layer labels unless
    ``disable_snapshot_annotations``. ``resolver`` is the one for this pull (``remotes.pullauth`` builds one
    for credentials given with the pull). The image is also named ``repository@digest`` (as containerd), so
    it stays reachable when its tag moves."""
    snapshotter = store.snapshotter(snapshotter_for(store, runtime_handler)).name  # unknown: fail before fetching
    result = pull(store, ref, resolver=resolver, on_event=on_event, executor=executor,
                  unpack_executor=unpack_executor, snapshotter=snapshotter,
                  layer_labels=not store.config.disable_snapshot_annotations)
    reference = Reference.parse(result.image.name)
    by_digest = f"{reference.name}@{result.image.target.digest}"
    if by_digest != result.image.name:
        images.tag(store, result.image.name, by_digest)
    return result


# -- images by id ------------------------------------------------------------------------------------------


def runtime_images(store: Store) -> list[RuntimeImage]:
    """Every image of the namespace, grouped by image id (config digest), by id. Images whose manifest or
    config cannot be read (blobs gone, no manifest for this platform) are left out, as containerd's CRI
    image store does."""
    groups: dict[Digest, tuple[ResolvedManifest, dict[str, Descriptor]]] = {}
    for image in images.list_images(store):
        resolved = _resolve_quiet(store, image)
        if resolved is None:
            continue
        entry = groups.setdefault(resolved.manifest.config.digest, (resolved, {}))
        entry[1][image.name] = image.target
    return [RuntimeImage(id=digest, names=tuple(sorted(targets)), resolved=resolved, targets=targets)
            for digest, (resolved, targets) in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def runtime_image(store: Store, ref_or_id: str) -> RuntimeImage:
    """The image named ``ref_or_id`` (a name or one of its repo digests, normalised as docker does) or with
    that image id (the full ``sha256:<hex>``, or a unique prefix of the hex as containerd's CRI accepts).
    NotFoundError else."""
    found_images = runtime_images(store)
    reference = _parse(ref_or_id)
    if reference is not None and not _is_full_id(ref_or_id):
        name = str(reference)
        for img in found_images:
            if name in img.names or name in img.repo_digests:
                return img
    match = _ID.match(ref_or_id)
    if match is not None:
        hexpart = match.group(1)
        full = ref_or_id.startswith("sha256:") and len(hexpart) == 64
        found = [img for img in found_images
                 if img.id.hex == hexpart or (not full and img.id.hex.startswith(hexpart))]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InvalidArgumentError(f"image id prefix {ref_or_id!r} is ambiguous: "
                                       f"{', '.join(str(i.id) for i in found)}")
    raise NotFoundError(f"image {ref_or_id}: not found in namespace {store.namespace}")


def remove_runtime_image(store: Store, ref_or_id: str) -> tuple[str, ...]:
    """Remove every name of the image ``ref_or_id`` stands for (CRI's RemoveImage); the names removed.
    An unknown image removes nothing. Content and snapshots go at the next ``gc``."""
    try:
        img = runtime_image(store, ref_or_id)
    except NotFoundError:
        return ()
    removed = []
    for name in img.names:
        with contextlib.suppress(NotFoundError):
            images.remove_image(store, name)
            removed.append(name)
    return tuple(removed)


def _resolve_quiet(store: Store, image: Image) -> ResolvedManifest | None:
    try:
        return resolve_manifest(store.content, image.target, default_matcher())
    except (NotFoundError, InvalidArgumentError):
        return None


def _record_name(store: Store, image: str) -> str:
    """The image record ``image`` stands for: itself (normalised) when such a record exists, else the
    preferred name of the image with that id."""
    try:
        return images.image(store, image).name
    except NotFoundError:
        pass
    return runtime_image(store, image).name


# -- unpack for a handler, rootfs --------------------------------------------------------------------------


def ensure_unpacked(store: Store, image: str, runtime_handler: str = "", *, on_event: EventSink,
                    executor: Executor) -> UnpackResult | None:
    """Unpack an image already in the store into the handler's snapshotter, as a pull for that handler
    would (same unpacker, same CRI labels unless ``disable_snapshot_annotations``). None when it is
    unpacked there already. Never pulls: blobs missing from the store are a FailedPreconditionError that
    names the image and every missing digest."""
    return _ensure_unpacked(store, _record_name(store, image), snapshotter_for(store, runtime_handler),
                            on_event, executor)[1]


def _ensure_unpacked(store: Store, name: str, snapshotter: str, on_event: EventSink, executor: Executor
                     ) -> tuple[Digest, UnpackResult | None]:
    """``ensure_unpacked`` of the image record ``name``; also returns the image's top chainID."""
    try:
        resolved: ResolvedManifest | None = images.resolve_manifest(store, name)
    except NotFoundError:
        resolved = None  # its manifest or config is gone (or no manifest for this platform): named below
    if resolved is not None and committed_in(store, resolved, snapshotter):
        return resolved.chain_ids[-1], None
    check = images.check(store, name)
    # A lazily unpacked image's remote blobs are as missing as any for a local unpack (which never fetches).
    missing = (*check.missing, *check.remote)
    if resolved is not None and getattr(store.snapshotter(snapshotter), "remote", False):
        # A remote snapshotter fetches layers itself from the target labels: only the manifest and config
        # must be here (a layer it cannot provide lazily is then an unpack error naming the blob).
        layers = {layer.digest for layer in resolved.manifest.layers}
        missing = tuple(d for d in missing if d.digest not in layers)
    if missing:
        raise FailedPreconditionError(
            f"image {name}: cannot unpack into snapshotter {snapshotter}: {len(missing)} blob(s) missing "
            "from the content store (garbage-collected, or left remote by a lazy unpack?): "
            f"{', '.join(str(d.digest) for d in missing)}; pull the image again"
        )
    result = unpack(store, name, on_event=on_event, executor=executor, snapshotter=snapshotter, fetch_missing=False,
                    layer_labels=not store.config.disable_snapshot_annotations)
    return result.chain_id, result


def prepare_rootfs(store: Store, container_id: str, image: str, runtime_handler: str = "", *,
                   on_event: EventSink, executor: Executor, readonly: bool = False) -> list[Mount]:
    """The rootfs of a container: ``ensure_unpacked``, then an active snapshot (a view when ``readonly``)
    keyed ``container_id`` on the image's top layer in the handler's snapshotter. Returns its mounts.

    The snapshot is a GC root (nothing else references it); remove it with the snapshotter's ``remove``.
    AlreadyExistsError names the key when the container has a rootfs already.
    """
    if not container_id:
        raise InvalidArgumentError("prepare rootfs: empty container id")
    name = _record_name(store, image)
    snapshotter = snapshotter_for(store, runtime_handler)
    top, _ = _ensure_unpacked(store, name, snapshotter, on_event, executor)
    sn = store.snapshotter(snapshotter)
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
