"""Metadata stores on a real SQLite file: images, leases, content rows, and garbage collection over real
blobs (a real image built by the sample builder) and real snapshots of the native snapshotter."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from cargohold.content.local import LocalStore
from cargohold.content.namespaced import NamespacedStore
from cargohold.devtools import samples
from cargohold.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cargohold.images.handlers import manifest_children_labels
from cargohold.metadata.db import MetadataDB, utcnow
from cargohold.metadata.gc import collect
from cargohold.metadata.images import Image, ImageStore
from cargohold.metadata.leases import LeaseStore, Resource, snapshot_kind
from cargohold.oci import mediatypes as mt
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.snapshots.native import NativeSnapshotter


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def db(root: Path) -> MetadataDB:
    return MetadataDB(root / "metadata.db")


def target(data: bytes, media_type: str = mt.OCI_MANIFEST, **annotations: str) -> Descriptor:
    return Descriptor(media_type=media_type, digest=Digest.from_bytes(data), size=len(data),
                      annotations=annotations)


# -- images -------------------------------------------------------------------------------------------------


def test_image_create_get_list_delete(db: MetadataDB) -> None:
    images = ImageStore(db, "default")
    t1 = target(b"manifest-1", **{"org.opencontainers.image.ref.name": "v1"})
    created = images.create(Image(name="registry.test/app:v1", target=t1, labels={"tier": "web"}))
    assert created.name == "registry.test/app:v1"
    assert created.target == t1 and created.target.annotations == {"org.opencontainers.image.ref.name": "v1"}
    assert created.labels == {"tier": "web"}
    assert created.created_at == created.updated_at
    assert images.get("registry.test/app:v1") == created
    with pytest.raises(AlreadyExistsError, match=r"image registry.test/app:v1: already exists"):
        images.create(Image(name="registry.test/app:v1", target=t1))
    images.create(Image(name="registry.test/app:v2", target=target(b"manifest-2")))
    images.create(Image(name="other.test/db:1", target=t1, labels={"tier": "db"}))
    assert [i.name for i in images.list()] == [
        "other.test/db:1", "registry.test/app:v1", "registry.test/app:v2"]
    assert [i.name for i in images.list(name_prefix="registry.test/")] == [
        "registry.test/app:v1", "registry.test/app:v2"]
    assert [i.name for i in images.list(label_filters={"tier": "db"})] == ["other.test/db:1"]
    assert [i.name for i in images.list(label_filters={"tier": None})] == [
        "other.test/db:1", "registry.test/app:v1"]
    assert [i.name for i in images.by_digest(t1.digest)] == ["other.test/db:1", "registry.test/app:v1"]
    images.delete("registry.test/app:v1")
    with pytest.raises(NotFoundError, match=r"^image registry.test/app:v1: not found$"):
        images.get("registry.test/app:v1")
    with pytest.raises(NotFoundError, match=r"image registry.test/app:v1: not found"):
        images.delete("registry.test/app:v1")


def test_image_put_keeps_created_at_and_update_fields(db: MetadataDB) -> None:
    images = ImageStore(db)
    first = images.put(Image(name="app:latest", target=target(b"one"), labels={"a": "1", "b": "2"}))
    time.sleep(0.01)
    second = images.put(Image(name="app:latest", target=target(b"two", mt.OCI_INDEX), labels={"c": "3"}))
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    assert second.target.digest == Digest.from_bytes(b"two") and second.target.media_type == mt.OCI_INDEX
    assert second.labels == {"c": "3"}
    # Field paths: one label, all labels, target annotations only.
    changed = images.update(Image(name="app:latest", target=target(b"ignored"), labels={"d": "4", "c": "x"}),
                            ["labels.d"])
    assert changed.labels == {"c": "3", "d": "4"} and changed.target.digest == Digest.from_bytes(b"two")
    dropped = images.update(Image(name="app:latest", target=target(b"ignored"), labels={}), ["labels.c"])
    assert dropped.labels == {"d": "4"}
    annotated = images.update(Image(name="app:latest", target=target(b"ignored", k="v")), ["annotations"])
    assert annotated.target.annotations == {"k": "v"} and annotated.target.digest == Digest.from_bytes(b"two")
    with pytest.raises(InvalidArgumentError, match="cannot update field 'name'"):
        images.update(Image(name="app:latest", target=target(b"x")), ["name"])
    with pytest.raises(NotFoundError, match="image missing: not found"):
        images.update(Image(name="missing", target=target(b"x")))
    with pytest.raises(InvalidArgumentError, match="empty name"):
        images.put(Image(name="", target=target(b"x")))
    with pytest.raises(InvalidArgumentError, match="longer than 4096"):
        images.put(Image(name="big", target=target(b"x"), labels={"k": "v" * 5000}))


def test_images_are_per_namespace(db: MetadataDB) -> None:
    one, two = ImageStore(db, "one"), ImageStore(db, "two")
    one.create(Image(name="app:1", target=target(b"m")))
    assert two.list() == []
    with pytest.raises(NotFoundError):
        two.get("app:1")
    two.create(Image(name="app:1", target=target(b"other")))
    assert one.get("app:1").target.digest == Digest.from_bytes(b"m")
    assert set(db.namespaces()) >= {"one", "two"}


# -- leases -------------------------------------------------------------------------------------------------


def test_leases(db: MetadataDB) -> None:
    leases = LeaseStore(db, "default")
    expires = utcnow() + timedelta(hours=1)
    lease = leases.create("pull-a", {"purpose": "pull"}, expires)
    assert lease.id == "pull-a" and lease.labels == {"purpose": "pull"} and lease.expires_at == expires
    assert not lease.expired()
    with pytest.raises(AlreadyExistsError, match="lease pull-a"):
        leases.create("pull-a")
    leases.add_resource("pull-a", "content", "sha256:" + "a" * 64)
    leases.add_resource("pull-a", "content", "sha256:" + "a" * 64)  # idempotent
    leases.add_resource("pull-a", snapshot_kind("overlayfs"), "sha256:" + "b" * 64)
    assert leases.resources("pull-a") == [
        Resource(kind="content", resource="sha256:" + "a" * 64),
        Resource(kind="snapshots/overlayfs", resource="sha256:" + "b" * 64),
    ]
    with pytest.raises(InvalidArgumentError, match="'images'"):
        leases.add_resource("pull-a", "images", "x")
    with pytest.raises(NotFoundError, match="lease nope"):
        leases.add_resource("nope", "content", "x")
    leases.remove_resource("pull-a", "content", "sha256:" + "a" * 64)
    assert [r.kind for r in leases.resources("pull-a")] == ["snapshots/overlayfs"]
    assert [lease.id for lease in leases.list()] == ["pull-a"]
    assert LeaseStore(db, "other").list() == []
    leases.delete("pull-a")
    assert leases.list() == []
    with pytest.raises(NotFoundError, match="lease pull-a"):
        leases.resources("pull-a")
    with pytest.raises(NotFoundError, match="lease pull-a"):
        leases.delete("pull-a")
    with leases.hold() as temp:
        assert temp.id.startswith("cargohold-") and temp.expires_at is not None
        assert [x.id for x in leases.list()] == [temp.id]
    assert leases.list() == []


# -- garbage collection ------------------------------------------------------------------------------------


def store_image(store: NamespacedStore, img: samples.SampleImage) -> Descriptor:
    """Write an image's blobs as a pull does: children first, the manifest labelled with GC refs."""
    for blob in img.blobs:
        _write(store, blob.data)
    kids = [img.config.descriptor, *(layer.descriptor for layer in img.layers)]
    _write(store, img.manifest.data, manifest_children_labels(img.manifest.descriptor, kids))
    return img.manifest.descriptor


def _write(store: NamespacedStore, data: bytes, labels: dict[str, str] | None = None) -> Digest:
    digest = Digest.from_bytes(data)
    try:
        with store.writer(f"w-{digest.hex}", expected=digest) as w:
            w.write(data)
            w.commit(len(data), digest, labels)
    except AlreadyExistsError:
        if labels:
            store.update(digest, dict(labels))
    return digest


def blob_file(root: Path, digest: Digest) -> Path:
    return root / "content" / "blobs" / digest.algorithm / digest.hex


def image(n: int) -> samples.SampleImage:
    return samples.build_image([samples.small_base_layer(),
                                samples.files_layer({f"file-{n}": f"content {n}".encode()})])


def test_gc_keeps_what_images_leases_and_roots_reach(root: Path, db: MetadataDB) -> None:
    local = LocalStore(root)
    store = NamespacedStore(local, db, "default")
    images = ImageStore(db, "default")
    leases = LeaseStore(db, "default")
    img = image(1)
    images.put(Image(name="registry.test/app:v1", target=store_image(store, img)))
    junk = _write(store, b"nothing points at me")
    pinned = _write(store, b"pinned", {"containerd.io/gc.root": "2024-01-01"})
    pinned_child = _write(store, b"child of pinned")
    store.update(pinned, {"containerd.io/gc.ref.content.x": str(pinned_child)})
    leases.create("live", expires_at=utcnow() + timedelta(hours=1))
    leased = _write(store.with_lease("live"), b"being pulled")
    leases.create("old", expires_at=utcnow() - timedelta(seconds=1))
    stale = _write(store.with_lease("old"), b"abandoned pull")
    orphan = Digest.from_bytes(b"orphan file")
    with local.writer("orphan") as w:  # a file with no row in any namespace
        w.write(b"orphan file")
        w.commit(0, orphan)

    dry = collect(db, local, dry_run=True)
    assert dry.removed_content == sorted([junk, stale], key=str)
    assert dry.removed_records == sorted([("default", junk), ("default", stale)], key=lambda r: str(r[1]))
    assert dry.removed_blobs == sorted([junk, stale, orphan], key=str)
    assert dry.expired_leases == [("default", "old")]
    assert store.exists(junk) and store.exists(stale) and blob_file(root, orphan).exists()
    assert [lease.id for lease in leases.list()] == ["live", "old"]

    result = collect(db, local)
    assert result == dry
    for gone in (junk, stale):
        assert not store.exists(gone) and not blob_file(root, gone).exists()
        with pytest.raises(NotFoundError, match=gone.hex):
            store.read_all(gone)
    assert not blob_file(root, orphan).exists()
    assert [lease.id for lease in leases.list()] == ["live"]
    for blob in [img.manifest, *img.blobs]:
        assert store.read_all(blob.digest) == blob.data
    assert store.read_all(pinned) == b"pinned" and store.read_all(pinned_child) == b"child of pinned"
    assert store.read_all(leased) == b"being pulled"
    assert collect(db, local).removed_blobs == []  # nothing left to do

    # Removing the image and the lease frees the image's blobs and the leased one.
    images.delete("registry.test/app:v1")
    leases.delete("live")
    after = collect(db, local)
    assert set(after.removed_content) == {
        img.digest, img.config.digest, *(x.digest for x in img.layers), leased}
    assert {i.digest for i in store.walk()} == {pinned, pinned_child}


def test_gc_across_namespaces_keeps_shared_files(root: Path, db: MetadataDB) -> None:
    local = LocalStore(root)
    one, two = NamespacedStore(local, db, "one"), NamespacedStore(local, db, "two")
    img = image(2)
    ImageStore(db, "one").put(Image(name="app:1", target=store_image(one, img)))
    layer = img.layers[1].digest
    with pytest.raises(AlreadyExistsError):
        two.writer("copy", expected=layer)  # namespace two sees the shared file, unreferenced there
    result = collect(db, local)
    assert result.removed_records == [("two", layer)] and result.removed_blobs == []
    assert not two.exists(layer) and one.read_all(layer) == img.layers[1].data
    ImageStore(db, "one").delete("app:1")
    result = collect(db, local)
    assert layer in result.removed_blobs and not blob_file(root, layer).exists()


def test_gc_follows_snapshot_labels_and_removes_unreferenced_snapshot_rows(root: Path, db: MetadataDB) -> None:
    local = LocalStore(root)
    store = NamespacedStore(local, db, "default")
    img = image(3)
    manifest = store_image(store, img)
    ImageStore(db, "default").put(Image(name="app:snap", target=manifest))
    sn = NativeSnapshotter(root, db, "default")
    sn.prepare("base-active", "")
    sn.commit("base", "base-active")
    sn.prepare("top-active", "base")
    sn.commit("top", "top-active")
    sn.prepare("stray-active", "")
    sn.commit("stray", "stray-active")
    sn.prepare("mine", "top", {"containerd.io/gc.root": "x"})
    only_from_snapshot = _write(store, b"referenced by a snapshot label")
    # An unpack's active snapshot (extract- key, snapshot.ref label): removable once nothing holds it.
    sn.prepare("extract-holder", "", {"containerd.io/gc.ref.content.blob": str(only_from_snapshot),
                                      "containerd.io/snapshot.ref": "sha256:x"})
    sn.prepare("someones-active", "")  # any other active snapshot is left alone
    # The config points at the unpacked top snapshot, as the unpacker labels it.
    store.update(img.config.digest, {"containerd.io/gc.ref.snapshot.native": "top"})

    leases = LeaseStore(db, "default")
    leases.create("keep-holder")
    leases.add_resource("keep-holder", snapshot_kind("native"), "extract-holder")

    result = collect(db, local)
    assert result.removed_snapshots == [("native", "default", "stray")]
    assert result.removed_content == []
    assert store.exists(img.config.digest) and store.exists(only_from_snapshot)
    # The rows go in the collection's transaction; the directories with the snapshot store's cleanup.
    assert {i.key for i in sn.walk()} == {"base", "top", "mine", "extract-holder", "someones-active"}

    # Without the lease the holder snapshot is unreferenced, and so is the blob only it pointed at.
    leases.delete("keep-holder")
    result = collect(db, local)
    assert result.removed_snapshots == [("native", "default", "extract-holder")]
    assert result.removed_content == [only_from_snapshot]

    # With the image gone, "top" and "base" are still reached from the gc.root snapshot "mine".
    ImageStore(db, "default").delete("app:snap")
    result = collect(db, local)
    assert ("native", "default", "top") not in result.removed_snapshots
    assert img.config.digest in result.removed_content


def test_close_closes_every_threads_connection(tmp_path: Path) -> None:
    import sqlite3
    import threading

    db = MetadataDB(tmp_path / "m.db")
    db.ensure_namespace("main")
    conns: list[sqlite3.Connection] = []
    worker = threading.Thread(target=lambda: conns.append(db.conn))
    worker.start()
    worker.join()
    conns.append(db.conn)
    assert conns[0] is not conns[1]
    db.close()
    for conn in conns:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")
    assert "main" in db.namespaces()  # this thread reconnects after close
