"""Image records: look up, list, tag, remove, resolve to a platform's manifest, check completeness.

Needs: a ``Store``. Names are stored normalised; ``alpine`` finds ``docker.io/library/alpine:latest``.
"""

from __future__ import annotations

from collections.abc import Sequence

from cargohold.images.image import CheckResult, ResolvedManifest, walk_required
from cargohold.images.image import resolve_manifest as resolve_target
from cargohold.metadata.db import utcnow
from cargohold.metadata.images import Image
from cargohold.oci.platform import Platform, PlatformMatcher, default_matcher
from cargohold.oci.reference import normalize_name
from cargohold.services.lazy import with_remote
from cargohold.store import Store


def image_name(name: str) -> str:
    """The stored form of an image name: a reference normalised, anything else as it is (the one rule every
    verb uses, ``oci.reference.normalize_name``)."""
    return normalize_name(name)


def matcher(platforms: Sequence[Platform | str | None]) -> PlatformMatcher:
    """A matcher for ``platforms`` (parsed), the host's when none is given."""
    wanted = [p if isinstance(p, Platform) else Platform.parse(p) for p in platforms if p]
    return PlatformMatcher(wanted) if wanted else default_matcher()


def image(store: Store, name: str) -> Image:
    return store.images.get(image_name(name))


def list_images(store: Store) -> list[Image]:
    return store.images.list()


def tag(store: Store, source: str, target: str) -> Image:
    src = image(store, source)
    now = utcnow()
    return store.images.put(Image(name=image_name(target), target=src.target, labels=dict(src.labels),
                                  created_at=now, updated_at=now))


def remove_image(store: Store, name: str) -> None:
    store.images.delete(image_name(name))


def resolve_manifest(store: Store, name: str, platform: Platform | str | None = None) -> ResolvedManifest:
    """The image's manifest and config for ``platform`` (the host's by default)."""
    img = image(store, name)
    return resolve_target(store.content, img.target, matcher([platform] if platform else []), name=img.name)


def check(store: Store, name: str, *, platforms: Sequence[Platform | str] = (), all_platforms: bool = False
          ) -> CheckResult:
    """Which blobs of the image (for the platforms, or all) the store has and lacks; the layer blobs of a
    lazily unpacked image are ``remote``, not missing."""
    img = image(store, name)
    return with_remote(store, walk_required(store.content, img.target, None if all_platforms else matcher(platforms)))
