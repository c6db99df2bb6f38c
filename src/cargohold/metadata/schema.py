"""The metadata schema, as an ordered list of migrations. Never edit a released step; append a new one."""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE namespaces (
            name TEXT PRIMARY KEY,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        );
        CREATE TABLE images (
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            media_type TEXT NOT NULL,
            digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            target_annotations TEXT NOT NULL DEFAULT '{}',
            labels TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (namespace, name)
        );
        CREATE INDEX images_by_digest ON images (namespace, digest);
        -- A blob is visible in a namespace only when it has a record here, blob files are shared.
        CREATE TABLE content (
            namespace TEXT NOT NULL,
            digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (namespace, digest)
        );
        CREATE INDEX content_by_digest ON content (digest);
        CREATE TABLE snapshots (
            snapshotter TEXT NOT NULL,
            namespace TEXT NOT NULL,
            key TEXT NOT NULL,
            id INTEGER NOT NULL,
            parent TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (snapshotter, namespace, key)
        );
        CREATE INDEX snapshots_by_parent ON snapshots (snapshotter, namespace, parent);
        CREATE TABLE snapshot_ids (
            snapshotter TEXT PRIMARY KEY,
            next_id INTEGER NOT NULL
        );
        CREATE TABLE leases (
            namespace TEXT NOT NULL,
            id TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            expires_at TEXT,
            PRIMARY KEY (namespace, id)
        );
        CREATE TABLE lease_resources (
            namespace TEXT NOT NULL,
            lease TEXT NOT NULL,
            kind TEXT NOT NULL,        -- 'content', 'ingest', 'snapshots/<snapshotter>'
            resource TEXT NOT NULL,
            PRIMARY KEY (namespace, lease, kind, resource)
        );
        """,
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]
