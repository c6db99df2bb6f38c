"""Every label name cargohold reads or writes, in one place.

containerd's names (``containerd.io/...``) keep containerd's spelling, so a data root's labels mean the same
to both; cargohold's own live under ``cargohold.io/``.
"""

from __future__ import annotations

# -- garbage collection (read by ``metadata.gc``) -----------------------------------------------------------
LABEL_GC_ROOT = "containerd.io/gc.root"
"""On content or a snapshot: keep it whatever references it (mounts, container rootfs)."""
LABEL_GC_REF_CONTENT = "containerd.io/gc.ref.content"
"""Prefix on a blob: ``.m.<i>``, ``.config``, ``.l.<i>`` name the children garbage collection keeps."""
LABEL_GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot"
"""Prefix on a config: ``.<snapshotter>`` names the image's top snapshot, kept with it."""

# -- content -------------------------------------------------------------------------------------------------
UNCOMPRESSED = "containerd.io/uncompressed"
"""On a compressed layer blob: its diff ID (the digest of the uncompressed tar)."""
DISTRIBUTION_SOURCE = "containerd.io/distribution.source"
"""Label prefix on blobs: ``<prefix>.<registry host>`` = comma-separated repositories the blob came from (or
was pushed to), as containerd writes it; pushes use it to mount blobs across repositories."""
LABEL_IMPORTED = "cargohold.io/imported"
"""On an image record: when it was imported from an archive."""

# -- snapshots -----------------------------------------------------------------------------------------------
SNAPSHOT_REF = "containerd.io/snapshot.ref"
"""On a layer snapshot being prepared: the chain ID it will be committed as (remote snapshotters read it)."""
INHERITED_PREFIX = "containerd.io/snapshot/"
"""Layer descriptor annotations under this prefix are passed on to the layer's snapshot, as containerd's
unpacker does (snapshots.FilterInheritedLabels): e.g. stargz's containerd.io/snapshot/stargz/toc.digest."""
LABEL_LAZY = "cargohold.io/lazy"
"""Prefix on a config: ``.<snapshotter>`` = "true" when the image was unpacked lazily into that remote
snapshotter, some layer blobs living only at the image's source (``images check`` calls them remote; export,
push and copy fetch them on demand)."""
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
MOUNT_LABEL = "cargohold.io/mount-point"
"""On a snapshot made by ``mount``: the mount point."""
CONTAINER_LABEL = "cargohold.io/container"
"""On a container's rootfs snapshot: the container id."""
IMAGE_LABEL = "cargohold.io/image"
"""On a container's rootfs snapshot: the image name it was prepared from."""
RUNTIME_HANDLER_LABEL = "cargohold.io/runtime-handler"
"""On a container's rootfs snapshot: the runtime handler it was prepared for."""

# -- leases (what an operation in progress holds) ------------------------------------------------------------
LEASE_PULL = "cargohold.io/pull"
LEASE_UNPACK = "cargohold.io/unpack"
LEASE_IMPORT = "cargohold.io/import"
LEASE_COPY = "cargohold.io/copy"
LEASE_PUSH = "cargohold.io/push"
LEASE_PROCESS = "cargohold.io/pid"
"""On a lease: ``<pid>:<start time>:<pid namespace>`` of the process that holds it; gc drops the lease once
that process is gone (a crash, a kill -9), so what it held does not wait for the lease to expire."""
