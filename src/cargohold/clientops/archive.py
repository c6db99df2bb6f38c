"""Export and import of image archives (OCI layout + docker manifest.json tars)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cargohold.clientbase import ClientBase
from cargohold.content.namespaced import NamespacedStore
from cargohold.errors import CargoholdError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from cargohold.events import Event
from cargohold.images.archive import (
    LABEL_IMPORTED,
    ExportedImage,
    ExportResult,
    Selection,
    missing_blobs,
    missing_message,
    normalize_name,
    require_complete,
    select,
    wanted_platforms,
)
from cargohold.images.archive_export import atomic_output, write_archive
from cargohold.images.archive_import import load_archive, put_blob
from cargohold.images.handlers import children, read_manifest_or_index, set_children_labels
from cargohold.images.image import manifest_for, resolve_manifest
from cargohold.metadata.db import utcnow
from cargohold.metadata.images import Image
from cargohold.metadata.leases import LeaseStore, snapshot_kind
from cargohold.oci import mediatypes as mt
from cargohold.oci.artifact import artifact_type, is_image
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import Manifest
from cargohold.oci.platform import Platform, PlatformMatcher
from cargohold.remotes.fetch import DISTRIBUTION_SOURCE
from cargohold.unpack.unpacker import FetchFn, UnpackResult

__all__ = ["ArchiveOps", "ExportResult", "ImportResult"]


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


class ArchiveOps(ClientBase):
    """``export`` and ``import_archive``."""

    # -- export ------------------------------------------------------------------------------------------

    def export(
        self,
        out: Path | str | BinaryIO,
        images: Sequence[str],
        *,
        platforms: Sequence[Platform | str] = (),
        all_platforms: bool = False,
        fetch_missing: bool = False,
    ) -> ExportResult:
        """Write ``images`` into one archive: an OCI layout plus Docker's ``manifest.json``.

        ``out`` is a path (written whole or not at all: a temporary file beside it, fsynced, renamed) or a
        binary stream (flushed). Without ``platforms`` an index contributes its host-platform manifest;
        ``all_platforms`` takes every one. An index blob is always written whole, so the image digest
        survives a round trip. Missing blobs are an error listing every one; with ``fetch_missing`` they are
        first fetched from the image's registry (and the registries its blobs came from).
        """
        if not images:
            raise InvalidArgumentError("export: name at least one image")
        records = list({img.name: img for img in (self.image(n) for n in images)}.values())
        wanted = wanted_platforms(platforms)
        fetched: list[Descriptor] = []
        failures: list[str] = []
        for _ in range(8):  # each round may reveal children of the manifests it fetched
            selections = [select(self.content, img.target, wanted, all_platforms) for img in records]
            missing = missing_blobs(zip(records, selections, strict=True))
            if not missing or not fetch_missing:
                break
            got = self._fetch_missing(missing, failures)
            fetched += got
            if not got:
                break
        if missing:
            message = missing_message(f"export of {', '.join(i.name for i in records)}",
                                      [(f"image {img.name}", d) for img, d in missing])
            if fetch_missing:
                message += "; fetching failed: " + ("; ".join(failures) or "no registry to fetch from")
            else:
                message += " (--fetch-missing fetches them from the image's registry)"
            raise FailedPreconditionError(message)
        if fetched:
            self._label_children(self.content, selections)
        if isinstance(out, (str, Path)):
            path = Path(out)
            with atomic_output(path) as f:
                blobs, size = write_archive(self.content, records, selections, wanted, f, on_event=self.on_event)
            where = str(path)
        else:
            blobs, size = write_archive(self.content, records, selections, wanted, out, on_event=self.on_event)
            with contextlib.suppress(OSError, AttributeError, ValueError):
                os.fsync(out.fileno())  # stdout redirected to a file; a pipe cannot be synced
            where = "-"
        exported = tuple(ExportedImage(name=img.name, target=img.target, manifests=sel.manifests)
                         for img, sel in zip(records, selections, strict=True))
        for img in records:
            self.on_event(Event(action="export", status="info", item=img.name, message=str(img.target.digest)))
        return ExportResult(path=where, images=exported, blobs=tuple(blobs), size=size, fetched=tuple(fetched))

    def _fetch_missing(self, missing: Sequence[tuple[Image, Descriptor]], failures: list[str]
                       ) -> list[Descriptor]:
        got: list[Descriptor] = []
        done: set[Digest] = set()
        for image, desc in missing:
            if desc.digest in done:
                continue
            for fetch in self._fetchers_for(image):
                try:
                    fetch(desc)
                except CargoholdError as exc:
                    failures.append(f"{desc.digest}: {exc}")
                    continue
                got.append(desc)
                done.add(desc.digest)
                break
        return got

    def _fetchers_for(self, image: Image) -> list[FetchFn]:
        """Fetch functions to try: the image name's registry, then the repositories its target came from
        (``containerd.io/distribution.source.<host>`` labels)."""
        names = [image.name]
        with contextlib.suppress(NotFoundError):
            labels = self.content.info(image.target.digest).labels
            for key, repos in sorted(labels.items()):
                if key.startswith(DISTRIBUTION_SOURCE + "."):
                    host = key[len(DISTRIBUTION_SOURCE) + 1:]
                    names += [f"{host}/{repo}" for repo in repos.split(",") if repo]
        fns = [self._registry_fetch_fn(n) for n in dict.fromkeys(names)]
        return [fn for fn in fns if fn is not None]

    @staticmethod
    def _label_children(store: NamespacedStore, selections: Sequence[Selection]) -> None:
        """GC reference labels on every index and manifest, so what they reference stays."""
        label = set_children_labels(store, children(store))
        for sel in selections:
            for desc in sel.required:
                if mt.is_index(desc.media_type) or mt.is_manifest(desc.media_type):
                    label(desc)

    # -- import ------------------------------------------------------------------------------------------

    def import_archive(
        self,
        source: Path | str | BinaryIO,
        *,
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
        ``snapshotter``. Names follow ``ctr images import``: ``io.containerd.image.name``, else the
        ``org.opencontainers.image.ref.name`` tag joined to ``base_name`` (default ``import-<date>``);
        ``digests`` adds ``<base>@<digest>`` names; ``index_name`` records the whole index under that name.
        """
        wanted = wanted_platforms(platforms)
        leases = LeaseStore(self.db, self.namespace)
        where = str(source) if isinstance(source, (str, Path)) else "-"
        with leases.hold(labels={"cargohold.io/import": where[-200:]}) as lease:
            store = self.content.with_lease(lease.id)
            archive = load_archive(store, source, base_name=base_name, digests=digests, today=utcnow().date(),
                                   on_event=self.on_event)
            selections = [select(store, img.target, wanted, all_platforms) for img in archive.images]
            require_complete(f"archive {where} is incomplete",
                             [(f"image {img.names[0]}", sel) for img, sel in zip(archive.images, selections,
                                                                                strict=True)])
            self._label_children(store, selections)
            named: list[tuple[str, Descriptor]] = [(n, img.target) for img in archive.images for n in img.names]
            if index_name:
                put_blob(store, archive.index_raw)
                set_children_labels(store, children(store))(archive.index)
                named.append((normalize_name(index_name), archive.index))

            unpacked: list[UnpackResult] = []
            if unpack:
                unpacked = self._unpack_imported(store, lease.id, [img.target for img in archive.images],
                                                 wanted, all_platforms, snapshotter)

            now = utcnow()
            labels = {LABEL_IMPORTED: now.strftime("%Y-%m-%dT%H:%M:%SZ")}
            recorded: list[Image] = []
            with self.db.transaction():  # every name or none
                for name, target in named:
                    try:
                        kept = dict(self.images.get(name).labels)  # re-importing a name keeps its other labels
                    except NotFoundError:
                        kept = {}
                    recorded.append(self.images.put(Image(name=name, target=target, labels={**kept, **labels},
                                                          created_at=now, updated_at=now)))
        for image in recorded:
            self.on_event(Event(action="import", status="info", item=image.name, message=str(image.target.digest)))
        return ImportResult(images=tuple(recorded), format=archive.format, index=archive.index,
                            committed=archive.committed, present=archive.present, reused=archive.reused,
                            unpack=tuple(unpacked))

    def _unpack_imported(self, store: NamespacedStore, lease_id: str, targets: Sequence[Descriptor],
                         wanted: Sequence[Platform], all_platforms: bool, snapshotter: str | None
                         ) -> list[UnpackResult]:
        """Unpack each distinct target's best manifest for the first platform, offline (nothing fetched)."""
        matcher = PlatformMatcher(list(wanted)[:1])
        leases = LeaseStore(self.db, self.namespace)
        kind = snapshot_kind(self.snapshotter(snapshotter).name)
        hold: Callable[[str], None] = lambda key: leases.add_resource(lease_id, kind, key)  # noqa: E731
        results: list[UnpackResult] = []
        done: set[Digest] = set()
        for target in targets:
            try:
                chosen = manifest_for(store, target, matcher)
            except NotFoundError:
                if not all_platforms:
                    raise
                self.on_event(Event(action="apply", status="skipped", item=str(target.digest),
                                    message=f"no manifest for {matcher}: not unpacked"))
                continue
            if chosen.digest in done:
                continue
            done.add(chosen.digest)
            doc = read_manifest_or_index(store, chosen)
            if isinstance(doc, Manifest) and not is_image(doc):
                # Artifacts (SBOMs, signatures) travel in archives beside images; they have nothing to unpack.
                self.on_event(Event(action="apply", status="skipped", item=str(chosen.digest),
                                    message=f"an artifact of type {artifact_type(doc)}: not unpacked"))
                continue
            resolved = resolve_manifest(store, chosen, matcher)
            if not resolved.manifest.layers:
                continue
            unpacker = self._unpacker(snapshotter, None, store)
            unpacker.hold = hold
            results.append(unpacker.unpack(resolved))
        return results

