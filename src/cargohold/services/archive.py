"""Export and import of image archives (OCI layout + docker manifest.json tars).

Needs: a ``Store`` and an event sink; ``export --fetch-missing`` a way to get the resolver; ``import`` the
executor for layer tasks (it unpacks offline).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cargohold.content.namespaced import NamespacedStore
from cargohold.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cargohold.events import Event, EventSink
from cargohold.images.archive import (
    ExportedImage,
    ExportResult,
    missing_blobs,
    missing_message,
    normalize_name,
    require_complete,
    select,
    wanted_platforms,
)
from cargohold.images.archive_export import atomic_output, write_archive
from cargohold.images.archive_import import put_blob
from cargohold.images.archive_load import load_archive
from cargohold.images.handlers import children, label_children, read_manifest_or_index, set_children_labels
from cargohold.images.image import manifest_for, resolve_manifest
from cargohold.metadata.db import utcnow
from cargohold.metadata.images import Image
from cargohold.metadata.labels import LABEL_IMPORTED, LEASE_IMPORT
from cargohold.oci.artifact import artifact_type, is_image
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import Manifest
from cargohold.oci.platform import Platform, PlatformMatcher
from cargohold.remotes.resolver import Resolver
from cargohold.services import images
from cargohold.services.lazy import fetch_blobs, lazy_layers
from cargohold.services.unpack import new_unpacker
from cargohold.store import Store
from cargohold.unpack.unpacker import UnpackResult

__all__ = ["ExportResult", "ImportResult", "export", "import_archive"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportResult:
    """What ``import_archive`` recorded: the images (every name), the archive's format (``oci``/``docker``)
    and index, the blobs newly stored, already present, and docker layer tars replaced by a stored
    compressed blob (by the tar's digest), and the unpacks done."""

    images: tuple[Image, ...]
    format: str
    index: Descriptor
    committed: tuple[Digest, ...]
    present: tuple[Digest, ...]
    reused: tuple[Digest, ...]
    unpack: tuple[UnpackResult, ...] = ()


# -- export ------------------------------------------------------------------------------------------------


def export(
    store: Store,
    out: Path | str | BinaryIO,
    names: Sequence[str],
    *,
    on_event: EventSink,
    resolver: Callable[[], Resolver],
    platforms: Sequence[Platform | str] = (),
    all_platforms: bool = False,
    fetch_missing: bool = False,
) -> ExportResult:
    """Write the images ``names`` into one archive: an OCI layout plus Docker's ``manifest.json``.

    ``out`` is a path (written whole or not at all: a temporary file beside it, fsynced, renamed) or a
    binary stream (flushed). Without ``platforms`` an index contributes its host-platform manifest;
    ``all_platforms`` takes every one. An index blob is always written whole, so the image digest
    survives a round trip. Missing blobs are an error listing every one; with ``fetch_missing`` they are
    first fetched from the image's registry (and the registries its blobs came from), as the remote blobs of
    a lazily unpacked image always are.
    """
    if not names:
        raise InvalidArgumentError("export: name at least one image")
    records = list({img.name: img for img in (images.image(store, n) for n in names)}.values())
    wanted = wanted_platforms(platforms)
    fetched: list[Descriptor] = []
    failures: list[str] = []
    for _ in range(8):  # each round may reveal children of the manifests it fetched
        selections = [select(store.content, img.target, wanted, all_platforms) for img in records]
        missing = missing_blobs(zip(records, selections, strict=True))
        # A lazily unpacked image's remote layer blobs are fetched whatever ``fetch_missing`` says.
        lazy = set().union(*(lazy_layers(store, sel.manifests) for sel in selections))
        wanted_blobs = missing if fetch_missing else [(img, d) for img, d in missing if d.digest in lazy]
        if not wanted_blobs:
            break
        got = fetch_blobs(store, wanted_blobs, failures, resolver, on_event)
        fetched += got
        if not got:
            break
    if missing:
        message = missing_message(f"export of {', '.join(i.name for i in records)}",
                                  [(f"image {img.name}", d) for img, d in missing])
        if fetch_missing or failures:
            message += "; fetching failed: " + ("; ".join(failures) or "no registry to fetch from")
        else:
            message += " (--fetch-missing fetches them from the image's registry)"
        raise FailedPreconditionError(message)
    if fetched:
        label_children(store.content, (d for sel in selections for d in sel.required))
    if isinstance(out, (str, Path)):
        path = Path(out)
        with atomic_output(path) as f:
            blobs, size = write_archive(store.content, records, selections, wanted, f, on_event=on_event)
        where = str(path)
    else:
        blobs, size = write_archive(store.content, records, selections, wanted, out, on_event=on_event)
        with contextlib.suppress(OSError, AttributeError, ValueError):
            os.fsync(out.fileno())  # stdout redirected to a file; a pipe cannot be synced
        where = "-"
    exported = tuple(ExportedImage(name=img.name, target=img.target, manifests=sel.manifests)
                     for img, sel in zip(records, selections, strict=True))
    for img in records:
        on_event(Event(action="export", status="info", item=img.name, message=str(img.target.digest)))
    return ExportResult(path=where, images=exported, blobs=tuple(blobs), size=size, fetched=tuple(fetched))


# -- import ------------------------------------------------------------------------------------------------


def import_archive(
    store: Store,
    source: Path | str | BinaryIO,
    *,
    on_event: EventSink,
    executor: Executor,
    platforms: Sequence[Platform | str] = (),
    all_platforms: bool = False,
    unpack: bool = True,
    snapshotter: str | None = None,
    index_name: str | None = None,
    base_name: str | None = None,
    digests: bool = False,
) -> ImportResult:
    """Import an archive (OCI layout, ``docker save``, or both; plain, gzip or zstd) from a path or a
    binary stream read once, in order.

    Every blob is verified as it streams into the store. Images are recorded (labelled
    ``cargohold.io/imported``) only once each has every blob it needs for the platforms (host by default,
    ``all_platforms``: every one) and, unless ``unpack`` is false, has been unpacked offline into
    ``snapshotter`` (layer tasks on ``executor``). Names follow ``ctr images import``:
    ``io.containerd.image.name``, else the ``org.opencontainers.image.ref.name`` tag joined to ``base_name``
    (default ``import-<date>``); ``digests`` adds ``<base>@<digest>`` names; ``index_name`` records the whole
    index under that name.
    """
    wanted = wanted_platforms(platforms)
    where = str(source) if isinstance(source, (str, Path)) else "-"
    with store.leases.hold(labels={LEASE_IMPORT: where[-200:]}) as lease:
        content = store.content.with_lease(lease.id)
        archive = load_archive(content, source, base_name=base_name, digests=digests, today=utcnow().date(),
                               on_event=on_event)
        selections = [select(content, img.target, wanted, all_platforms) for img in archive.images]
        require_complete(f"archive {where} is incomplete",
                         [(f"image {img.names[0]}", sel) for img, sel in zip(archive.images, selections,
                                                                            strict=True)])
        label_children(content, (d for sel in selections for d in sel.required))
        named: list[tuple[str, Descriptor]] = [(n, img.target) for img in archive.images for n in img.names]
        if index_name:
            put_blob(content, archive.index_raw)
            set_children_labels(content, children(content))(archive.index)
            named.append((normalize_name(index_name), archive.index))

        unpacked: list[UnpackResult] = []
        if unpack:
            unpacked = _unpack_imported(store, content, lease.id, [img.target for img in archive.images], wanted,
                                        all_platforms, snapshotter, on_event, executor)

        now = utcnow()
        labels = {LABEL_IMPORTED: now.strftime("%Y-%m-%dT%H:%M:%SZ")}
        recorded: list[Image] = []
        with store.db.transaction():  # every name or none
            for name, target in named:
                try:
                    kept = dict(store.images.get(name).labels)  # re-importing a name keeps its other labels
                except NotFoundError:
                    kept = {}
                recorded.append(store.images.put(Image(name=name, target=target, labels={**kept, **labels},
                                                       created_at=now, updated_at=now)))
    for image in recorded:
        on_event(Event(action="import", status="info", item=image.name, message=str(image.target.digest)))
    return ImportResult(images=tuple(recorded), format=archive.format, index=archive.index,
                        committed=archive.committed, present=archive.present, reused=archive.reused,
                        unpack=tuple(unpacked))


def _unpack_imported(store: Store, content: NamespacedStore, lease_id: str, targets: Sequence[Descriptor],
                     wanted: Sequence[Platform], all_platforms: bool, snapshotter: str | None,
                     on_event: EventSink, executor: Executor) -> list[UnpackResult]:
    """Unpack each distinct target's best manifest for the first platform, offline (nothing fetched)."""
    matcher = PlatformMatcher(list(wanted)[:1])
    store.snapshotter(snapshotter)  # an unknown snapshotter fails before anything is unpacked
    results: list[UnpackResult] = []
    done: set[Digest] = set()
    for target in targets:
        try:
            chosen = manifest_for(content, target, matcher)
        except NotFoundError:
            if not all_platforms:
                raise
            on_event(Event(action="apply", status="skipped", item=str(target.digest),
                           message=f"no manifest for {matcher}: not unpacked"))
            continue
        if chosen.digest in done:
            continue
        done.add(chosen.digest)
        doc = read_manifest_or_index(content, chosen)
        if isinstance(doc, Manifest) and not is_image(doc):
            # Artifacts (SBOMs, signatures) travel in archives beside images; they have nothing to unpack.
            on_event(Event(action="apply", status="skipped", item=str(chosen.digest),
                           message=f"an artifact of type {artifact_type(doc)}: not unpacked"))
            continue
        resolved = resolve_manifest(content, chosen, matcher)
        if not resolved.manifest.layers:
            continue
        unpacker = new_unpacker(store, snapshotter, None, content, on_event=on_event, executor=executor,
                                lease=lease_id)
        results.append(unpacker.unpack(resolved))
    return results
