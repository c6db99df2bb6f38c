"""The overlayfs snapshotter: each snapshot stores only its own changes (``fs``, the upper dir) plus a
``work`` dir; parents are stacked as overlay lower dirs at mount time.

Mounts, as containerd's overlay snapshotter:

* no parent: a bind of ``fs`` ("rw", or "ro" for a view);
* active with parents: ``overlay`` with ``lowerdir=<parent fs>:<grandparent fs>:...``, ``upperdir``,
  ``workdir``;
* view of one committed parent: a read-only bind of the parent's ``fs``;
* view of a longer chain: ``overlay`` with ``lowerdir`` only (read-only by construction).

Deletions in a child show up in its upper dir as overlay whiteouts (0/0 character devices) and opaque
directories (``trusted.overlay.opaque``), which is what the differ turns into OCI whiteouts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from cargohold.errors import CargoholdError, InvalidArgumentError, is_no_space
from cargohold.metadata.db import DEFAULT_NAMESPACE, MetadataDB
from cargohold.snapshots.base import Kind, Mount
from cargohold.snapshots.dirs import Scratch
from cargohold.snapshots.local import LocalSnapshotter
from cargohold.snapshots.mount import mount_one, unmount
from cargohold.snapshots.storage import Record

_support: dict[str, bool] = {}
_support_lock = threading.Lock()


def _probe(root: Path) -> bool:
    probe = Path(tempfile.mkdtemp(prefix="overlay-check-", dir=root))
    try:
        for name in ("lower", "upper", "work", "merged"):
            (probe / name).mkdir()
        m = Mount(
            type="overlay",
            source="overlay",
            options=(
                f"lowerdir={probe / 'lower'}",
                f"upperdir={probe / 'upper'}",
                f"workdir={probe / 'work'}",
            ),
        )
        try:
            mount_one(m, probe / "merged")
        except (CargoholdError, OSError):
            return False
        unmount(probe / "merged", lazy=True)
        return True
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def overlay_supported(root: Path | str) -> bool:
    """Whether an overlay with its upper dir under ``root`` mounts here (probed once per root, then cached).

    False when not root, without the overlay module, or when ``root`` is on a filesystem overlay cannot use
    as upper layer (e.g. overlayfs itself).
    """
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _support_lock:
        if key not in _support:
            try:
                _support[key] = _probe(path)
            except OSError as exc:
                if not is_no_space(exc):
                    raise
                # A full (or read-only) disk leaves no room for the probe's directories. A root that holds
                # overlayfs snapshots was probed when they were made: keep its default, so the commands that
                # free space (snapshots rm, gc) still find them.
                return (path / "snapshots" / OverlaySnapshotter.name).is_dir()
        return _support[key]


def default_snapshotter_name(root: Path | str) -> str:
    """ "overlayfs" where overlay mounts work under ``root``, else "native"."""
    return OverlaySnapshotter.name if overlay_supported(root) else "native"


class OverlaySnapshotter(LocalSnapshotter):
    """containerd's "overlayfs" snapshotter. Needs root and overlay support (see ``overlay_supported``)."""

    name = "overlayfs"
    # An upper dir holds only its layer's changes, so a snapshot prepared without parent can be committed
    # on top of any parent (the unpacker applies layers in parallel this way).
    capabilities = frozenset({"rebase"})

    def __init__(
        self, root: Path | str, db: MetadataDB, namespace: str = DEFAULT_NAMESPACE, *, remote: bool = False
    ) -> None:
        base = os.path.abspath(root)
        # Overlay's option syntax has no quoting we can rely on for these.
        if any(ch in base for ch in ",:"):
            raise InvalidArgumentError(f"overlayfs snapshotter root {base} must not contain ',' or ':'")
        super().__init__(base, db, namespace, remote=remote)
        # As containerd: index=off where the kernel knows the option, so lower dirs may be shared freely.
        self._options: tuple[str, ...] = (
            ("index=off",) if os.path.exists("/sys/module/overlay/parameters/index") else ()
        )

    def upper_dir(self, key: str) -> Path:
        """The upper dir of ``key``; the unpacker writes layers (with overlay whiteouts) straight here."""
        return self.fs_path(self._open().get(key))

    def _populate(self, scratch: Scratch, kind: Kind, parents: list[Record]) -> None:
        fs = scratch.path / "fs"
        fs.mkdir()
        (scratch.path / "work").mkdir()
        os.chmod(scratch.path / "work", 0o711)
        # The merged root takes its attributes from the upper dir; start it like the parent's root.
        if parents:
            st = os.stat(self.fs_path(parents[0]))
            os.chown(fs, st.st_uid, st.st_gid)
            os.chmod(fs, st.st_mode & 0o7777)
        else:
            os.chmod(fs, 0o755)

    def _mounts(self, rec: Record, parents: list[Record]) -> list[Mount]:
        own = self.fs_path(rec)
        if not parents:
            mode = "ro" if rec.info.kind is Kind.VIEW else "rw"
            return [Mount(type="bind", source=str(own), options=("rbind", mode))]
        options = list(self._options)
        if rec.info.kind is Kind.ACTIVE:
            work = self.store.path(rec.id) / "work"
            options += [f"workdir={work}", f"upperdir={own}"]
        elif len(parents) == 1:
            return [Mount(type="bind", source=str(self.fs_path(parents[0])), options=("rbind", "ro"))]
        options.append("lowerdir=" + ":".join(str(self.fs_path(p)) for p in parents))
        return [Mount(type="overlay", source="overlay", options=tuple(options))]
