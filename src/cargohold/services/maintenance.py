"""Looking after a data root: ingests in progress (list, abort), leases (list, remove), blob verification
with quarantine, and repair of incomplete images.

Needs: a ``Store``; repair also a resolver (to fetch from registries).

A blob that fails verification is never deleted: its file is moved to ``ROOT/content/quarantine/<alg>/<hex>``
and its content rows (every namespace) are dropped in one transaction, so the images that need it show it
missing and a later fetch writes it again. The rows' labels (their ``containerd.io/distribution.source.*``
repositories) are kept beside the quarantined file in ``<hex>.json``: repair fetches from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cargohold.content.locks import lock_holder
from cargohold.content.writer import read_status
from cargohold.errors import CargoholdError, InvalidArgumentError, NotFoundError
from cargohold.events import Event, EventSink, discard
from cargohold.metadata.db import load_labels, utcnow
from cargohold.metadata.labels import DISTRIBUTION_SOURCE, LEASE_PROCESS
from cargohold.metadata.leases import LeaseStore, process_alive
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.reference import Reference
from cargohold.remotes.resolver import Resolver
from cargohold.remotes.sources import fetch_one, registry_fetch_fn
from cargohold.services import images
from cargohold.snapshots import known_snapshotters
from cargohold.snapshots.base import Kind
from cargohold.snapshots.storage import top_level_damage
from cargohold.store import Store

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


# -- ingests -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ActiveIngest:
    """An unfinished download: ``ref`` (in this namespace), bytes so far, ``total`` (0 when unknown), when it
    started and was last written, and ``holder`` (e.g. ``pid 123``) when a live writer holds it."""

    ref: str
    offset: int
    total: int
    expected: Digest | None
    started_at: datetime
    updated_at: datetime
    holder: str | None


def active_ingests(store: Store) -> list[ActiveIngest]:
    """The ingests of this namespace in progress or left behind (a writer that died holds no lock)."""
    prefix = f"{store.namespace}/"
    out: list[ActiveIngest] = []
    try:
        entries = sorted(store.local.ingest_dir.iterdir())
    except FileNotFoundError:
        return out
    for entry in entries:
        try:
            status = read_status(entry)
        except NotFoundError:
            continue  # starting, or being removed
        if not status.ref.startswith(prefix):
            continue
        out.append(ActiveIngest(ref=status.ref[len(prefix):], offset=status.offset, total=status.total,
                                expected=status.expected, started_at=status.started_at,
                                updated_at=status.updated_at, holder=lock_holder(entry)))
    return sorted(out, key=lambda i: i.ref)


def abort_ingest(store: Store, ref: str) -> None:
    """Remove the ingest ``ref`` of this namespace. NotFoundError when there is none; LockedError naming the
    holder while a live writer has it."""
    store.content.abort(ref)


# -- leases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseInfo:
    """A lease with what it holds: ``process`` is the ``cargohold.io/pid`` token (empty when none) and
    ``alive`` whether that process still runs (a dead one's lease is removed by the next gc)."""

    id: str
    labels: dict[str, str]
    created_at: datetime
    expires_at: datetime | None
    resources: int
    process: str
    alive: bool


def list_leases(store: Store) -> list[LeaseInfo]:
    leases = LeaseStore(store.db, store.namespace)
    out: list[LeaseInfo] = []
    for lease in leases.list():
        process = lease.labels.get(LEASE_PROCESS, "")
        try:
            count = len(leases.resources(lease.id))
        except NotFoundError:
            continue  # removed meanwhile
        out.append(LeaseInfo(id=lease.id, labels=dict(lease.labels), created_at=lease.created_at,
                             expires_at=lease.expires_at, resources=count, process=process,
                             alive=(not process or process_alive(process)) and not lease.expired()))
    return out


def remove_leases(store: Store, ids: Sequence[str]) -> None:
    """Delete the leases (what they held stays until gc). NotFoundError naming the first unknown id, before
    any is removed."""
    leases = LeaseStore(store.db, store.namespace)
    for lease_id in ids:
        leases.get(lease_id)
    for lease_id in ids:
        try:
            leases.delete(lease_id)
        except NotFoundError:
            continue  # a concurrent rm or gc got it first


# -- verify ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BadBlob:
    """A blob whose bytes do not match: what was expected and found, and where it was moved."""

    digest: Digest
    reason: str
    quarantined: Path | None


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    checked: list[Digest] = field(default_factory=list)
    bad: list[BadBlob] = field(default_factory=list)


def quarantine_dir(store: Store) -> Path:
    return store.root / "content" / "quarantine"


def _recorded_sizes(store: Store, digest: Digest) -> set[int]:
    return {int(r["size"]) for r in store.db.query("SELECT size FROM content WHERE digest = ?", (str(digest),))}


def _rehash(path: Path, digest: Digest) -> tuple[str, int]:
    """The file's digest (in ``digest``'s algorithm) and size; hashlib lets go of the GIL on big updates."""
    h = hashlib.new(digest.algorithm)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _check_one(store: Store, digest: Digest) -> str | None:
    """Why the blob file is bad, or None when it is good."""
    path = store.local.blob_path(digest)
    try:
        actual, size = _rehash(path, digest)
    except FileNotFoundError:
        return None  # removed by gc meanwhile: nothing to verify
    if actual != digest.hex:
        return f"content hashes to {digest.algorithm}:{actual}"
    sizes = _recorded_sizes(store, digest)
    if sizes and sizes != {size}:
        return f"size {size}, recorded {', '.join(str(s) for s in sorted(sizes))}"
    return None


def _quarantine(store: Store, digest: Digest) -> Path | None:
    """Move the blob file aside and drop its rows in every namespace (one transaction), keeping their
    labels in ``<hex>.json`` beside it. None when the file was gone already."""
    target_dir = quarantine_dir(store) / digest.algorithm
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / digest.hex
    n = 0
    while target.exists():  # quarantined before (a second bad copy): keep both
        n += 1
        target = target_dir / f"{digest.hex}.{n}"
    with store.db.transaction() as conn:
        rows = conn.execute("SELECT namespace, labels FROM content WHERE digest = ?", (str(digest),)).fetchall()
        try:
            # Inside the transaction, so no commit or claim of this digest sees a row without its file.
            os.replace(store.local.blob_path(digest), target)
        except FileNotFoundError:
            return None
        conn.execute("DELETE FROM content WHERE digest = ?", (str(digest),))
    record = {r["namespace"]: load_labels(r["labels"]) for r in rows}
    (target_dir / f"{target.name}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    log.warning("content %s quarantined to %s", digest, target)
    return target


def verify(store: Store, digests: Sequence[Digest] = (), *, workers: int = 4,
           on_event: EventSink = discard) -> VerifyResult:
    """Rehash the blob files (``digests``, or every one) in a pool of ``workers`` threads; move each that does
    not match its digest or recorded size to the quarantine. Progress as ``verify`` events (message
    ``<done>/<total>``). A digest given
    that has no blob file is a NotFoundError."""
    if digests:
        for d in digests:
            if not store.local.exists(d):
                raise NotFoundError(f"content {d}: no blob file in {store.local.blobs_dir}")
        todo = list(dict.fromkeys(digests))
    else:
        todo = list(store.local.blob_digests())
    total = len(todo)
    bad: list[BadBlob] = []
    done = 0
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="verify") as pool:
        for digest, reason in zip(todo, pool.map(lambda d: _check_one(store, d), todo), strict=True):
            done += 1
            if reason is None:
                on_event(Event(action="verify", status="done", item=str(digest), message=f"{done}/{total}"))
                continue
            where = _quarantine(store, digest)
            on_event(Event(action="verify", status="error", item=str(digest),
                           message=f"{done}/{total}: {reason}"))
            bad.append(BadBlob(digest=digest, reason=reason, quarantined=where))
    return VerifyResult(checked=todo, bad=bad)


# -- check and repair --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Repair:
    """What repair did for one image: blobs fetched, and those it could not get (digest, why)."""

    name: str
    fetched: list[Digest] = field(default_factory=list)
    failed: list[tuple[Digest, str]] = field(default_factory=list)


def _quarantined_sources(store: Store, digest: Digest) -> dict[str, str]:
    """The distribution-source labels the blob's rows had when it was quarantined (this namespace's first)."""
    path = quarantine_dir(store) / digest.algorithm / f"{digest.hex}.json"
    try:
        record: dict[str, dict[str, str]] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, str] = {}
    for namespace in sorted(record, key=lambda ns: ns != store.namespace):
        for key, value in record[namespace].items():
            if key.startswith(DISTRIBUTION_SOURCE + ".") and key not in out:
                out[key] = value
    return out


def _source_fetch(resolver: Callable[[], Resolver], store: Store, desc: Descriptor,
                  on_event: EventSink) -> bool:
    """Fetch ``desc`` from the repositories its quarantine record names; True when one had it."""
    for key, repos in sorted(_quarantined_sources(store, desc.digest).items()):
        host = key[len(DISTRIBUTION_SOURCE) + 1:]
        for repo in (r for r in repos.split(",") if r):
            try:
                reference = Reference.parse(f"{host}/{repo}@{desc.digest}")
                fetch_one(resolver().fetcher(reference), desc, store.content, {key: repo}, on_event)
            except CargoholdError as exc:
                log.info("repair: %s from %s/%s: %s", desc.digest, host, repo, exc)
                continue
            return True
    return False


def repair(store: Store, name: str, resolver: Callable[[], Resolver], *, on_event: EventSink = discard
           ) -> Repair:
    """Fetch every blob image ``name`` lacks (all platforms it has) from its registry, else from the
    repositories recorded for it; manifests first, so their children are found in turn."""
    fetch = registry_fetch_fn(resolver, images.image(store, name).name, store.content, on_event)
    fetched: list[Digest] = []
    failed: dict[Digest, str] = {}
    while True:
        missing = [d for d in images.check(store, name, all_platforms=True).missing if d.digest not in failed]
        if not missing:
            break
        for desc in missing:
            why = "no registry to fetch it from"
            try:
                got = fetch(desc) if fetch is not None else False
            except CargoholdError as exc:
                got, why = False, str(exc)
            if not got and not store.content.exists(desc.digest):
                got = _source_fetch(resolver, store, desc, on_event)
            if store.content.exists(desc.digest):
                fetched.append(desc.digest)
            else:
                failed[desc.digest] = why
    return Repair(name=name, fetched=fetched, failed=sorted(failed.items(), key=lambda kv: str(kv[0])))


@dataclass(frozen=True, slots=True, kw_only=True)
class DamagedSnapshot:
    """A committed snapshot whose directory is gone or no longer matches its commit-time record."""

    snapshotter: str
    key: str
    reason: str


def damaged_snapshots(store: Store) -> list[DamagedSnapshot]:
    """The committed snapshots of this namespace's local snapshotters whose directory was removed or whose
    top-level listing differs from the one recorded at commit (a cheap check: no file is read)."""
    out: list[DamagedSnapshot] = []
    for name in known_snapshotters():
        if name in store.config.snapshotters:
            continue
        rows = store.db.query(
            "SELECT key, id FROM snapshots WHERE snapshotter = ? AND namespace = ? AND kind = ?",
            (name, store.namespace, Kind.COMMITTED.value))
        base = store.root / "snapshots" / name / "snapshots"
        for row in rows:
            reason = top_level_damage(base / str(row["id"]))
            if reason is not None:
                out.append(DamagedSnapshot(snapshotter=name, key=row["key"], reason=reason))
    return sorted(out, key=lambda d: (d.snapshotter, d.key))


def remove_damaged(store: Store, damaged: Sequence[DamagedSnapshot]) -> list[tuple[str, str]]:
    """Remove the damaged snapshots and every snapshot built on them (children first); returns (snapshotter,
    key) of all removed. The unpacks that need them make them again."""
    removed: list[tuple[str, str]] = []
    for name in sorted({d.snapshotter for d in damaged}):
        rows = store.db.query("SELECT key, parent FROM snapshots WHERE snapshotter = ? AND namespace = ?",
                              (name, store.namespace))
        children: dict[str, list[str]] = {}
        for row in rows:
            children.setdefault(row["parent"], []).append(row["key"])
        order: list[str] = []
        for d in damaged:
            if d.snapshotter == name:
                _post_order(d.key, children, order)
        sn = store.snapshotter(name)
        for key in order:  # descendants before their parents
            try:
                sn.remove(key)
            except NotFoundError:
                continue
            removed.append((name, key))
    return removed


def _post_order(key: str, children: dict[str, list[str]], order: list[str]) -> None:
    for kid in children.get(key, []):
        _post_order(kid, children, order)
    if key not in order:
        order.append(key)


def parse_digests(texts: Sequence[str]) -> list[Digest]:
    """Digests from the command line; InvalidArgumentError naming a bad one."""
    out: list[Digest] = []
    for text in texts:
        try:
            out.append(Digest.parse(text))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"digest {text!r}: {exc}") from None
    return out


def lease_age(created: datetime) -> float:
    """Seconds since ``created``."""
    return (utcnow() - created).total_seconds()


__all__ = ["ActiveIngest", "BadBlob", "DamagedSnapshot", "LeaseInfo", "Repair", "VerifyResult", "abort_ingest",
           "active_ingests", "damaged_snapshots", "lease_age", "list_leases", "parse_digests", "quarantine_dir",
           "remove_damaged", "remove_leases", "repair", "verify"]
