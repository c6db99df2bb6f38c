"""Rows of the ``content`` table: which blobs a namespace sees, with their labels.

Blob files are shared by every namespace (``content.local.LocalStore``); a blob is visible in a namespace
only while it has a row here, as in containerd's metadata layer. Label helpers shared by the metadata
stores live here too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cargohold.errors import InvalidArgumentError, NotFoundError
from cargohold.metadata.db import MetadataDB, dump_labels, from_text, load_labels, to_text, utcnow
from cargohold.oci.digest import Digest

MAX_LABEL_SIZE = 4096  # bytes of key + value, as containerd's labels.Validate


def validate_labels(labels: Mapping[str, str], what: str) -> dict[str, str]:
    """Checked copy of ``labels``: keys non-empty, key + value within containerd's 4096 bytes; empty values
    are dropped (containerd does not store them)."""
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise InvalidArgumentError(f"{what}: invalid label {key!r}={value!r}")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgumentError(f"{what}: label {key!r} is longer than {MAX_LABEL_SIZE} bytes")
        if value:
            out[key] = value
    return out


def apply_label_update(
    current: Mapping[str, str], update: Mapping[str, str | None], what: str
) -> dict[str, str]:
    """``current`` with ``update`` applied: a None or "" value deletes the key, any other value sets it."""
    merged = dict(current)
    sets: dict[str, str] = {}
    for key, value in update.items():
        if value is None or value == "":
            merged.pop(key, None)
        else:
            sets[key] = value
    merged.update(validate_labels(sets, what))
    return merged


def labels_match(labels: Mapping[str, str], filters: Mapping[str, str | None] | None) -> bool:
    """Whether ``labels`` satisfy ``filters``: each key equals its value, or is present when it is None."""
    for key, want in (filters or {}).items():
        have = labels.get(key)
        if have is None or (want is not None and have != want):
            return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class ContentRecord:
    """One row: ``digest`` is visible in ``namespace``."""

    namespace: str
    digest: Digest
    size: int
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime
    updated_at: datetime


def _record(row: sqlite3.Row) -> ContentRecord:
    return ContentRecord(
        namespace=row["namespace"],
        digest=Digest.parse(row["digest"]),
        size=row["size"],
        labels=load_labels(row["labels"]),
        created_at=from_text(row["created_at"]),
        updated_at=from_text(row["updated_at"]),
    )


class ContentRecords:
    """The content rows of one namespace. Methods join an enclosing ``db.transaction()``."""

    def __init__(self, db: MetadataDB, namespace: str) -> None:
        if not namespace:
            raise InvalidArgumentError("content: empty namespace")
        self.db = db
        self.namespace = namespace

    def get(self, digest: Digest) -> ContentRecord | None:
        row = self.db.conn.execute(
            "SELECT * FROM content WHERE namespace = ? AND digest = ?", (self.namespace, str(digest))
        ).fetchone()
        return _record(row) if row else None

    def list(self) -> list[ContentRecord]:
        rows = self.db.query("SELECT * FROM content WHERE namespace = ? ORDER BY digest", (self.namespace,))
        return [_record(r) for r in rows]

    def add(self, digest: Digest, size: int, labels: Mapping[str, str] | None = None) -> ContentRecord:
        """Insert the row; if it exists, set ``labels`` on it (other labels are kept)."""
        what = f"content {digest}"
        wanted = validate_labels(labels or {}, what)
        now = to_text(utcnow())
        with self.db.transaction() as conn:
            have = self.get(digest)
            if have is None:
                conn.execute(
                    "INSERT INTO content (namespace, digest, size, labels, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (self.namespace, str(digest), size, dump_labels(wanted), now, now),
                )
            elif wanted:
                merged = {**have.labels, **wanted}
                if merged != dict(have.labels):
                    conn.execute(
                        "UPDATE content SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                        (dump_labels(merged), now, self.namespace, str(digest)),
                    )
            record = self.get(digest)
        assert record is not None
        return record

    def update_labels(self, digest: Digest, update: Mapping[str, str | None]) -> ContentRecord:
        """Apply a label update (None deletes) to the row. NotFoundError names the digest and namespace."""
        with self.db.transaction() as conn:
            have = self.get(digest)
            if have is None:
                raise NotFoundError(f"content {digest}: not found in namespace {self.namespace}")
            merged = apply_label_update(have.labels, update, f"content {digest}")
            if merged != dict(have.labels):
                conn.execute(
                    "UPDATE content SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                    (dump_labels(merged), to_text(utcnow()), self.namespace, str(digest)),
                )
            record = self.get(digest)
        assert record is not None
        return record

    def remove(self, digest: Digest) -> bool:
        """Delete the row; False when there was none."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM content WHERE namespace = ? AND digest = ?", (self.namespace, str(digest))
            )
            return cur.rowcount > 0


def referenced_anywhere(db: MetadataDB, digest: Digest) -> bool:
    """Whether any namespace still has a row for ``digest`` (then its blob file must stay)."""
    row = db.conn.execute("SELECT 1 FROM content WHERE digest = ? LIMIT 1", (str(digest),)).fetchone()
    return row is not None
