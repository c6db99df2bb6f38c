"""The facade: one data root (blob files + SQLite metadata) and every operation users run on it.

``Client`` opens a ``Store``, owns the registry resolver and the worker pools, and delegates each operation
to its service in ``cargohold.services``.

>>> client = Client("/tmp/root")  # doctest: +SKIP
>>> client.pull("127.0.0.1:5000/app:v1")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cargohold.config import Config, find_config
from cargohold.content.local import LocalStore
from cargohold.content.namespaced import NamespacedStore
from cargohold.events import Cancel, EventSink, cancellable, discard
from cargohold.images.image import CheckResult, ResolvedManifest
from cargohold.metadata.db import DEFAULT_NAMESPACE, MetadataDB
from cargohold.metadata.gc import GCResult
from cargohold.metadata.images import Image, ImageStore
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.platform import Platform
from cargohold.remotes.credentials import CredentialStore
from cargohold.remotes.pullauth import PullAuth, pull_resolver
from cargohold.remotes.push import DEFAULT_CHUNK_THRESHOLD, DEFAULT_CONCURRENCY
from cargohold.remotes.resolver import Resolver

# What a pull loads anyway. The other services are imported by the methods that use them (tests/test_layering.py
# allows exactly these lazy loads): a command loads only its own, which keeps a second pull's start-up short.
from cargohold.services import gc, images, pull, unpack
from cargohold.services.pull import PullResult
from cargohold.snapshots.base import Mount, Snapshotter
from cargohold.store import Store, default_root, open_root
from cargohold.unpack.unpacker import UnpackResult

if TYPE_CHECKING:
    from cargohold.images.archive import ExportResult
    from cargohold.services.archive import ImportResult
    from cargohold.services.copy import CopyResult
    from cargohold.services.imagelist import ImageRow, PruneResult
    from cargohold.services.inspect import RemoteImage
    from cargohold.services.maintenance import ActiveIngest, DamagedSnapshot, LeaseInfo, Repair, VerifyResult
    from cargohold.services.push import PushResult
    from cargohold.services.runtime import RuntimeImage

__all__ = ["Client", "CopyResult", "ExportResult", "ImageRow", "ImportResult", "PruneResult", "PullAuth",
           "PullResult", "PushResult", "RemoteImage", "RuntimeImage", "UnpackResult", "default_root"]

# The result types of the services loaded on first use, still importable from here: loaded when asked for.
_LAZY_NAMES = {
    "CopyResult": "cargohold.services.copy",
    "ExportResult": "cargohold.images.archive",
    "ImageRow": "cargohold.services.imagelist",
    "ImportResult": "cargohold.services.archive",
    "PruneResult": "cargohold.services.imagelist",
    "PushResult": "cargohold.services.push",
    "RemoteImage": "cargohold.services.inspect",
    "RuntimeImage": "cargohold.services.runtime",
}


def __getattr__(name: str) -> Any:
    """``from cargohold.client import RuntimeImage`` (and the other names of ``_LAZY_NAMES``) as before."""
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


class Client:
    """Everything cargohold does, on one data root and namespace.

    Owns a ``Store``, the resolver (made on first use) and two worker pools of ``max_concurrent_downloads``
    threads (made on first use): one walks image graphs (fetches), one runs layer tasks (unpacks). They are
    separate because a pull waits for its walk and then for its unpack, and a task never waits on work of
    its own pool. ``close()`` shuts them down and closes the store.
    """

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
        cancel: Cancel | None = None,
        create: bool = True,
    ) -> None:
        path = Path(root) if root is not None else default_root()
        open_root(path, create=create)
        # Arguments win over the config file, which wins over built-in defaults.
        config = config if config is not None else find_config(None, path)
        self.store = Store(path, namespace=namespace, config=config, default_snapshotter=default_snapshotter)
        hosts_dir = hosts_dir or config.registry_config_path or None
        self.hosts_dir = Path(hosts_dir) if hosts_dir else None
        self.credentials = credentials
        self.plain_http = plain_http
        self.max_concurrent_downloads = max(1, max_concurrent_downloads or config.max_concurrent_downloads)
        # Every operation's progress reports are its cancellation points (see ``events.cancellable``).
        self.cancel = cancel or Cancel()
        self.on_event: EventSink = cancellable(on_event or discard, self.cancel)
        self._resolver: Resolver | None = None
        self._walk_pool: ThreadPoolExecutor | None = None
        self._unpack_pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- what the store holds ----------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def namespace(self) -> str:
        return self.store.namespace

    @property
    def config(self) -> Config:
        return self.store.config

    @property
    def db(self) -> MetadataDB:
        return self.store.db

    @property
    def local(self) -> LocalStore:
        return self.store.local

    @property
    def content(self) -> NamespacedStore:
        return self.store.content

    @property
    def images(self) -> ImageStore:
        return self.store.images

    @property
    def default_snapshotter(self) -> str:
        return self.store.default_snapshotter

    def snapshotter(self, name: str | None = None) -> Snapshotter:
        """The named snapshotter of this root (``native``, ``overlayfs``, a configured proxy), or the default."""
        return self.store.snapshotter(name)

    # -- what the client owns ----------------------------------------------------------------------------

    @property
    def resolver(self) -> Resolver:
        with self._lock:
            if self._resolver is None:
                self._resolver = Resolver(hosts_dir=self.hosts_dir, credentials=self.credentials,
                                          plain_http=self.plain_http, on_event=self.on_event,
                                          stall_timeout=self.config.stall_timeout,
                                          fetch_timeout=self.config.fetch_timeout)
            return self._resolver

    def _get_resolver(self) -> Resolver:
        return self.resolver

    @property
    def _walk(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._walk_pool is None:
                self._walk_pool = ThreadPoolExecutor(self.max_concurrent_downloads, thread_name_prefix="walk")
            return self._walk_pool

    @property
    def _unpack(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._unpack_pool is None:
                self._unpack_pool = ThreadPoolExecutor(self.max_concurrent_downloads, thread_name_prefix="unpack")
            return self._unpack_pool

    def stop(self) -> None:
        """Cancel the running operation: set the token, drop queued tasks, let the workers go as they notice.
        Does not wait (an interrupted command waits, bounded, for its threads); ``close()`` still follows."""
        self.cancel.cancel()
        with self._lock:
            pools = [p for p in (self._walk_pool, self._unpack_pool) if p is not None]
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Shut down the worker pools; release the registry connections, the snapshotters (a proxy's gRPC
        channel) and the database."""
        with self._lock:
            pools = [p for p in (self._walk_pool, self._unpack_pool) if p is not None]
            self._walk_pool = self._unpack_pool = None
            resolver, self._resolver = self._resolver, None
        for pool in pools:
            # After a cancellation the queued tasks are dropped; running ones stop at their next check.
            pool.shutdown(wait=True, cancel_futures=self.cancel.cancelled)
        if resolver is not None:
            resolver.close()
        self.store.close()

    def reap(self) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
        """Clean up what dead processes left (run first by pull, import and unpack); see ``services.gc.reap``."""
        return gc.reap(self.store)

    # -- pull, unpack, mount -----------------------------------------------------------------------------

    def pull(self, ref: str, *, platforms: Sequence[Platform | str] = (), all_platforms: bool = False,
             unpack: bool = True, snapshotter: str | None = None, layer_labels: bool = False,
             resolver: Resolver | None = None) -> PullResult:
        """See ``services.pull.pull``; ``resolver`` replaces the client's for this pull."""
        self.reap()
        return pull.pull(self.store, ref, resolver=resolver or self.resolver, on_event=self.on_event,
                         executor=self._walk, unpack_executor=self._unpack, platforms=platforms,
                         all_platforms=all_platforms, unpack=unpack, snapshotter=snapshotter,
                         layer_labels=layer_labels)

    def unpack(self, name: str, *, snapshotter: str | None = None, platform: Platform | str | None = None,
               layer_labels: bool = False, fetch_missing: bool = True) -> UnpackResult:
        """See ``services.unpack.unpack``."""
        self.reap()
        return unpack.unpack(self.store, name, on_event=self.on_event, executor=self._unpack,
                             resolver=self._get_resolver, snapshotter=snapshotter, platform=platform,
                             layer_labels=layer_labels, fetch_missing=fetch_missing)

    def unpacked(self, name: str, snapshotter: str | None = None, platform: Platform | str | None = None) -> bool:
        """Whether the image's top layer snapshot exists in the snapshotter."""
        return unpack.unpacked(self.store, name, snapshotter, platform)

    def rootfs(self, name: str, target: Path | str, *, platform: Platform | str | None = None) -> Path:
        """See ``services.mount.rootfs``."""
        from cargohold.services import mount
        return mount.rootfs(self.store, name, target, on_event=self.on_event, platform=platform)

    def remove_rootfs(self, target: Path | str) -> None:
        """See ``services.mount.remove_rootfs``."""
        from cargohold.services import mount
        mount.remove_rootfs(self.store, target)

    def mount(self, name: str, target: Path | str, *, snapshotter: str | None = None,
              platform: Platform | str | None = None, writable: bool = False) -> list[Mount]:
        """See ``services.mount.mount``."""
        from cargohold.services import mount
        return mount.mount(self.store, name, target, on_event=self.on_event, executor=self._unpack,
                           resolver=self._get_resolver, snapshotter=snapshotter, platform=platform,
                           writable=writable)

    def unmount(self, target: Path | str) -> None:
        """See ``services.mount.unmount``."""
        from cargohold.services import mount
        mount.unmount(self.store, target)

    # -- images ------------------------------------------------------------------------------------------

    def image(self, name: str) -> Image:
        return images.image(self.store, name)

    def list_images(self) -> list[Image]:
        return images.list_images(self.store)

    def find_images(self, filters: Sequence[str] = ()) -> list[Image]:
        """See ``services.imagelist.list_images``."""
        from cargohold.services import imagelist
        return imagelist.list_images(self.store, filters)

    def image_row(self, image: Image, snapshotter: str | None = None) -> ImageRow:
        """See ``services.imagelist.image_row``."""
        from cargohold.services import imagelist
        return imagelist.image_row(self.store, image, snapshotter)

    def prune_images(self, *, all_images: bool = False, dry_run: bool = False) -> PruneResult:
        """See ``services.imagelist.prune``."""
        from cargohold.services import imagelist
        return imagelist.prune(self.store, all_images=all_images, dry_run=dry_run)

    def tag(self, source: str, target: str) -> Image:
        return images.tag(self.store, source, target)

    def remove_image(self, name: str) -> None:
        images.remove_image(self.store, name)

    def resolve_manifest(self, name: str, platform: Platform | str | None = None) -> ResolvedManifest:
        return images.resolve_manifest(self.store, name, platform)

    def check(self, name: str, *, platforms: Sequence[Platform | str] = (), all_platforms: bool = False
              ) -> CheckResult:
        return images.check(self.store, name, platforms=platforms, all_platforms=all_platforms)

    def gc(self, *, dry_run: bool = False) -> tuple[GCResult, list[tuple[str, str, str]]]:
        """See ``services.gc.gc``."""
        return gc.gc(self.store, dry_run=dry_run)

    # -- maintenance: ingests, leases, verify, repair -------------------------------------------------------

    def active_ingests(self) -> list[ActiveIngest]:
        """See ``services.maintenance.active_ingests``."""
        from cargohold.services import maintenance
        return maintenance.active_ingests(self.store)

    def abort_ingest(self, ref: str) -> None:
        """See ``services.maintenance.abort_ingest``."""
        from cargohold.services import maintenance
        maintenance.abort_ingest(self.store, ref)

    def leases(self) -> list[LeaseInfo]:
        """See ``services.maintenance.list_leases``."""
        from cargohold.services import maintenance
        return maintenance.list_leases(self.store)

    def remove_leases(self, ids: Sequence[str]) -> None:
        """See ``services.maintenance.remove_leases``."""
        from cargohold.services import maintenance
        maintenance.remove_leases(self.store, ids)

    def verify(self, digests: Sequence[Digest] = ()) -> VerifyResult:
        """See ``services.maintenance.verify``."""
        from cargohold.services import maintenance
        return maintenance.verify(self.store, digests, workers=self.max_concurrent_downloads,
                                  on_event=self.on_event)

    def repair(self, name: str) -> Repair:
        """See ``services.maintenance.repair``."""
        from cargohold.services import maintenance
        return maintenance.repair(self.store, name, self._get_resolver, on_event=self.on_event)

    def damaged_snapshots(self) -> list[DamagedSnapshot]:
        """See ``services.maintenance.damaged_snapshots``."""
        from cargohold.services import maintenance
        return maintenance.damaged_snapshots(self.store)

    def repair_snapshots(self, names: Sequence[str]) -> tuple[list[DamagedSnapshot], list[tuple[str, str]]]:
        """Remove the damaged snapshots (and those built on them), then unpack again each of ``names`` into
        every local snapshotter it was unpacked in. Returns (damaged, (image, snapshotter) unpacked again)."""
        from cargohold.services import maintenance
        damaged = self.damaged_snapshots()
        if not damaged:
            return [], []
        hit = sorted({d.snapshotter for d in damaged})
        before = [(n, sn) for n in names for sn in hit if self.unpacked(n, sn)]
        maintenance.remove_damaged(self.store, damaged)
        again: list[tuple[str, str]] = []
        for n, sn in before:
            if not self.unpacked(n, sn):
                self.unpack(n, snapshotter=sn)
                again.append((n, sn))
        return damaged, again

    # -- archives, push, copy, referrers -----------------------------------------------------------------

    def export(self, out: Path | str | BinaryIO, images: Sequence[str], *, platforms: Sequence[Platform | str] = (),
               all_platforms: bool = False, fetch_missing: bool = False) -> ExportResult:
        """See ``services.archive.export``."""
        from cargohold.services import archive
        return archive.export(self.store, out, images, on_event=self.on_event, resolver=self._get_resolver,
                              platforms=platforms, all_platforms=all_platforms, fetch_missing=fetch_missing)

    def import_archive(self, source: Path | str | BinaryIO, *, platforms: Sequence[Platform | str] = (),
                       all_platforms: bool = False, unpack: bool = True, snapshotter: str | None = None,
                       index_name: str | None = None, base_name: str | None = None, digests: bool = False
                       ) -> ImportResult:
        """See ``services.archive.import_archive``."""
        from cargohold.services import archive
        self.reap()
        return archive.import_archive(self.store, source, on_event=self.on_event, executor=self._unpack,
                                      platforms=platforms, all_platforms=all_platforms, unpack=unpack,
                                      snapshotter=snapshotter, index_name=index_name, base_name=base_name,
                                      digests=digests)

    def push(self, ref: str, local: str | None = None, *, platforms: Sequence[Platform | str] = (),
             all_platforms: bool = False, chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD,
             chunk_size: int | None = None, concurrency: int = DEFAULT_CONCURRENCY,
             allow_nondistributable: bool = False) -> PushResult:
        """See ``services.push.push``."""
        from cargohold.services import push
        options = push.PushOptions(platforms=tuple(platforms), all_platforms=all_platforms,
                                   chunk_threshold=chunk_threshold, chunk_size=chunk_size, concurrency=concurrency,
                                   allow_nondistributable=allow_nondistributable)
        return push.push(self.store, ref, local, resolver=self.resolver, on_event=self.on_event, options=options)

    def copy(self, src: str, dst: str, *, platforms: Sequence[Platform | str] = (), all_platforms: bool = False
             ) -> CopyResult:
        """See ``services.copy``."""
        from cargohold.services import copy
        return copy.copy(self.store, src, dst, resolver=self.resolver, on_event=self.on_event,
                         executor=self._walk, platforms=platforms, all_platforms=all_platforms)

    def referrers(self, ref: str, artifact_type: str | None = None) -> list[Descriptor]:
        """See ``services.referrers.referrers``."""
        from cargohold.services import referrers
        return referrers.referrers(self.resolver, ref, artifact_type, on_event=self.on_event)

    # -- looking at a registry without pulling --------------------------------------------------------------

    def inspect_remote(self, ref: str, *, platforms: Sequence[Platform | str] = ()) -> RemoteImage:
        """See ``services.inspect.inspect_remote``."""
        from cargohold.services import inspect
        return inspect.inspect_remote(self.resolver, ref, platforms=platforms, on_event=self.on_event)

    def remote_digest(self, ref: str) -> Descriptor:
        """The descriptor (digest, media type, size) of what ``ref`` names on its registry."""
        from cargohold.services import inspect
        return inspect.resolve_digest(self.resolver, ref, on_event=self.on_event)[1]

    def list_tags(self, repo: str, *, page_size: int | None = None) -> list[str]:
        """See ``services.inspect.list_tags``."""
        from cargohold.services import inspect
        return inspect.list_tags(self.resolver, repo, page_size=page_size, on_event=self.on_event)

    # -- runtimes (CRI) ----------------------------------------------------------------------------------

    def snapshotter_for(self, runtime_handler: str = "") -> str:
        from cargohold.services import runtime
        return runtime.snapshotter_for(self.store, runtime_handler)

    def pull_for_runtime(self, ref: str, runtime_handler: str = "", *, auth: PullAuth | None = None
                         ) -> PullResult:
        """See ``services.runtime.pull_for_runtime``; ``auth`` is used for this pull only."""
        from cargohold.services import runtime
        self.snapshotter(self.snapshotter_for(runtime_handler))  # an unknown snapshotter fails before anything
        with pull_resolver(self.resolver, auth, hosts_dir=self.hosts_dir, credentials=self.credentials,
                           plain_http=self.plain_http, on_event=self.on_event) as resolver:
            return runtime.pull_for_runtime(self.store, ref, runtime_handler, resolver=resolver,
                                            on_event=self.on_event, executor=self._walk,
                                            unpack_executor=self._unpack)

    def runtime_images(self) -> list[RuntimeImage]:
        from cargohold.services import runtime
        return runtime.runtime_images(self.store)

    def runtime_image(self, ref_or_id: str) -> RuntimeImage:
        from cargohold.services import runtime
        return runtime.runtime_image(self.store, ref_or_id)

    def remove_runtime_image(self, ref_or_id: str) -> tuple[str, ...]:
        from cargohold.services import runtime
        return runtime.remove_runtime_image(self.store, ref_or_id)

    def committed_in(self, resolved: ResolvedManifest, snapshotter: str) -> bool:
        """Whether the top layer of ``resolved`` is a committed snapshot of ``snapshotter``."""
        return unpack.committed_in(self.store, resolved, snapshotter)

    def ensure_unpacked(self, image: str, runtime_handler: str = "") -> UnpackResult | None:
        """See ``services.runtime.ensure_unpacked``."""
        from cargohold.services import runtime
        return runtime.ensure_unpacked(self.store, image, runtime_handler, on_event=self.on_event,
                                       executor=self._unpack)

    def prepare_rootfs(self, container_id: str, image: str, runtime_handler: str = "", *,
                       readonly: bool = False) -> list[Mount]:
        """See ``services.runtime.prepare_rootfs``."""
        from cargohold.services import runtime
        return runtime.prepare_rootfs(self.store, container_id, image, runtime_handler, on_event=self.on_event,
                                      executor=self._unpack, readonly=readonly)
