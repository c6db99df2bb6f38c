"""The facade: one data root (blob files + SQLite metadata) and the operations users run on it."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cargohold.content.local import LocalStore
from cargohold.content.namespaced import NamespacedStore
from cargohold.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cargohold.events import Event, EventSink, discard
from cargohold.images.handlers import (
    Handler,
    children,
    compose,
    dispatch,
    filter_platforms,
    limit_manifests,
    set_children_labels,
)
from cargohold.images.image import CheckResult, ResolvedManifest, resolve_manifest, walk_required
from cargohold.metadata.db import DEFAULT_NAMESPACE, MetadataDB, utcnow
from cargohold.metadata.images import Image, ImageStore
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.platform import Platform, PlatformMatcher, default_matcher
from cargohold.oci.reference import Reference
from cargohold.remotes.auth import CredentialStore
from cargohold.remotes.fetch import fetch_blob
from cargohold.remotes.resolver import Fetcher, Resolver

log = logging.getLogger(__name__)

DISTRIBUTION_SOURCE = "containerd.io/distribution.source"


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

    @property
    def fetched_bytes(self) -> int:
        return sum(d.size for d in self.fetched)


class Client:
    """Everything cargohold does, on one data root and namespace.

    >>> client = Client(Path("/tmp/root"))
    >>> client.pull("127.0.0.1:5000/app:v1")  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        hosts_dir: Path | str | None = None,
        credentials: CredentialStore | None = None,
        plain_http: bool = False,
        max_concurrent_downloads: int = 3,
        on_event: EventSink | None = None,
    ) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace
        self.hosts_dir = Path(hosts_dir) if hosts_dir else None
        self.credentials = credentials
        self.plain_http = plain_http
        self.max_concurrent_downloads = max(1, max_concurrent_downloads)
        self.on_event: EventSink = on_event or discard
        self.db = MetadataDB(self.root / "metadata.db")
        self.db.ensure_namespace(namespace)
        self.local = LocalStore(self.root)
        self.content = NamespacedStore(self.local, self.db, namespace)
        self.images = ImageStore(self.db, namespace)
        self._resolver: Resolver | None = None
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
                )
            return self._resolver

    def pull(
        self,
        ref: str,
        *,
        platforms: Sequence[Platform | str] = (),
        all_platforms: bool = False,
    ) -> PullResult:
        """Resolve ``ref``, fetch the image's blobs for the platforms into the store, record the image.

        Without ``platforms`` the host platform's best match is fetched; ``all_platforms`` fetches every one.
        """
        reference = Reference.parse(ref)
        self.on_event(Event(action="resolve", status="running", item=str(reference)))
        name, target = self.resolver.resolve(reference)
        self.on_event(Event(action="resolve", status="done", item=str(reference), message=str(target.digest)))
        fetcher = self.resolver.fetcher(reference)
        matcher = _matcher(platforms)
        fetched: list[Descriptor] = []
        present: list[Descriptor] = []
        manifests: list[Descriptor] = []
        record = threading.Lock()
        source = {f"{DISTRIBUTION_SOURCE}.{reference.domain}": reference.path}

        def fetch(desc: Descriptor) -> Sequence[Descriptor]:
            was_fetched = self._fetch_one(fetcher, desc, source)
            with record:
                (fetched if was_fetched else present).append(desc)
                if mt.is_manifest(desc.media_type):
                    manifests.append(desc)
            return []

        walk: Handler = set_children_labels(self.content, children(self.content))
        if not all_platforms:
            walk = limit_manifests(filter_platforms(walk, matcher), matcher, 1)
        dispatch(compose(fetch, walk), [target], concurrency=self.max_concurrent_downloads)

        image_name = str(reference)
        now = utcnow()
        image = self.images.put(Image(name=image_name, target=target, labels={}, created_at=now, updated_at=now))
        self.on_event(Event(action="pull", status="done", item=image_name, message=str(target.digest)))
        return PullResult(image=image, manifests=tuple(manifests), fetched=tuple(fetched), present=tuple(present))

    def _fetch_one(self, fetcher: Fetcher, desc: Descriptor, source: dict[str, str]) -> bool:
        """Fetch one blob unless present; label it with its distribution source. True when fetched."""
        item = str(desc.digest)
        if self.content.exists(desc.digest):
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
            fetch_blob(fetcher, self.content, desc, labels=dict(source), progress=progress)
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
        return resolve_manifest(self.content, image.target, _matcher([platform] if platform else []))

    def check(self, name: str, *, platforms: Sequence[Platform | str] = (), all_platforms: bool = False
              ) -> CheckResult:
        image = self.image(name)
        return walk_required(self.content, image.target, None if all_platforms else _matcher(platforms))

    def close(self) -> None:
        self.db.close()




def _matcher(platforms: Sequence[Platform | str | None]) -> PlatformMatcher:
    wanted = [p if isinstance(p, Platform) else Platform.parse(p) for p in platforms if p]
    return PlatformMatcher(wanted) if wanted else default_matcher()


def _image_name(name: str) -> str:
    """Image names are stored normalised; ``alpine`` finds ``docker.io/library/alpine:latest``."""
    try:
        return str(Reference.parse(name))
    except InvalidArgumentError:
        return name
