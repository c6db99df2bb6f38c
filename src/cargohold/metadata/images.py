"""Image records, as containerd's image store: a name pointing at a target descriptor, per namespace.

The target keeps its media type, digest, size and annotations; its platform, urls and artifact type are not
stored (an image's target is the top of its graph and needs none of them).
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cargohold.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cargohold.metadata.content import apply_label_update, labels_match, validate_labels
from cargohold.metadata.db import (
    DEFAULT_NAMESPACE,
    MetadataDB,
    dump_labels,
    from_text,
    load_labels,
    to_text,
    utcnow,
)
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """A named image. ``created_at``/``updated_at`` are set by the store; what callers pass is ignored."""

    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


def _image(row: sqlite3.Row) -> Image:
    return Image(
        name=row["name"],
        target=Descriptor(
            media_type=row["media_type"],
            digest=Digest.parse(row["digest"]),
            size=row["size"],
            annotations=load_labels(row["target_annotations"]),
        ),
        labels=load_labels(row["labels"]),
        created_at=from_text(row["created_at"]),
        updated_at=from_text(row["updated_at"]),
    )


def _check(image: Image) -> dict[str, str]:
    if not image.name:
        raise InvalidArgumentError("image: empty name")
    if not image.target.media_type:
        raise InvalidArgumentError(f"image {image.name}: target {image.target.digest} has no media type")
    if image.target.size < 0:
        raise InvalidArgumentError(f"image {image.name}: target {image.target.digest} has a negative size")
    return validate_labels(image.labels, f"image {image.name}")


def _annotations(target: Descriptor) -> str:
    return json.dumps(dict(sorted(target.annotations.items())), separators=(",", ":"))


class ImageStore:
    """The images of one namespace. Writes are single transactions; reads see committed state."""

    def __init__(self, db: MetadataDB, namespace: str = DEFAULT_NAMESPACE) -> None:
        if not namespace:
            raise InvalidArgumentError("images: empty namespace")
        self.db = db
        self.namespace = namespace
        db.ensure_namespace(namespace)

    def _find(self, name: str) -> Image | None:
        row = self.db.conn.execute(
            "SELECT * FROM images WHERE namespace = ? AND name = ?", (self.namespace, name)
        ).fetchone()
        return _image(row) if row else None

    def _not_found(self, name: str) -> NotFoundError:
        return NotFoundError(f"image {name}: not found")

    def get(self, name: str) -> Image:
        image = self._find(name)
        if image is None:
            raise self._not_found(name)
        return image

    def list(
        self, *, name_prefix: str | None = None, label_filters: Mapping[str, str | None] | None = None
    ) -> builtins.list[Image]:
        """Images sorted by name, optionally those whose name starts with ``name_prefix`` and whose labels
        match ``label_filters`` (a value of None: the label is present)."""
        rows = self.db.query("SELECT * FROM images WHERE namespace = ? ORDER BY name", (self.namespace,))
        images = [_image(r) for r in rows]
        return [
            i for i in images
            if (not name_prefix or i.name.startswith(name_prefix)) and labels_match(i.labels, label_filters)
        ]

    def by_digest(self, digest: Digest) -> builtins.list[Image]:
        """Images whose target is ``digest``, sorted by name."""
        rows = self.db.query(
            "SELECT * FROM images WHERE namespace = ? AND digest = ? ORDER BY name",
            (self.namespace, str(digest)),
        )
        return [_image(r) for r in rows]

    def create(self, image: Image) -> Image:
        """Record a new image. AlreadyExistsError when the name is taken."""
        labels = _check(image)
        now = to_text(utcnow())
        with self.db.transaction() as conn:
            if self._find(image.name) is not None:
                raise AlreadyExistsError(f"image {image.name}: already exists")
            t = image.target
            conn.execute(
                "INSERT INTO images (namespace, name, media_type, digest, size, target_annotations, labels, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.namespace, image.name, t.media_type, str(t.digest), t.size, _annotations(t),
                 dump_labels(labels), now, now),
            )
            return self.get(image.name)

    def update(self, image: Image, fields: Sequence[str] = ()) -> Image:
        """Change an existing image; ``created_at`` is kept, ``updated_at`` set to now.

        Without ``fields`` the target and labels are replaced. Otherwise only the named ones, containerd's
        field paths: ``target``, ``labels`` (all labels), ``labels.<key>`` (one label; absent or empty in
        ``image`` deletes it), ``annotations`` (the target's annotations only).
        """
        with self.db.transaction() as conn:
            have = self._find(image.name)
            if have is None:
                raise self._not_found(image.name)
            target, labels = have.target, dict(have.labels)
            for f in fields or ("target", "labels"):
                if f == "target":
                    _check(image)
                    target = image.target
                elif f == "annotations":
                    target = Descriptor(media_type=target.media_type, digest=target.digest, size=target.size,
                                        annotations=dict(image.target.annotations))
                elif f == "labels":
                    labels = validate_labels(image.labels, f"image {image.name}")
                elif f.startswith("labels.") and len(f) > len("labels."):
                    key = f[len("labels."):]
                    labels = apply_label_update(labels, {key: image.labels.get(key)}, f"image {image.name}")
                else:
                    raise InvalidArgumentError(f"image {image.name}: cannot update field {f!r}")
            conn.execute(
                "UPDATE images SET media_type = ?, digest = ?, size = ?, target_annotations = ?, labels = ?, "
                "updated_at = ? WHERE namespace = ? AND name = ?",
                (target.media_type, str(target.digest), target.size, _annotations(target),
                 dump_labels(labels), to_text(utcnow()), self.namespace, image.name),
            )
            return self.get(image.name)

    def put(self, image: Image) -> Image:
        """Create the image, or replace an existing one's target and labels keeping its ``created_at``."""
        _check(image)
        with self.db.transaction():
            if self._find(image.name) is None:
                return self.create(image)
            return self.update(image)

    def delete(self, name: str) -> None:
        """Remove the record (its content stays until garbage collection)."""
        with self.db.transaction(frees_space=True) as conn:
            cur = conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (self.namespace, name))
            if cur.rowcount == 0:
                raise self._not_found(name)
