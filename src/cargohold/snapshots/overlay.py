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


# A root where the probe succeeded keeps a note of it, so that later processes skip the probe's mount and
# unmount (an unmount waits for the kernel's RCU grace period: milliseconds, tens of them on a busy machine, in
# every command that names no snapshotter). The note holds what the answer depends on; when that changed (a new
# kernel, another user or capabilities, the root on another filesystem), the probe runs again. A failed probe is
# never noted: it is cheap (the mount fails at once), and support may come later (modprobe overlay).
PROBE_NOTE = ".overlay-supported"


def _probe_conditions(path: Path) -> str:
    """The kernel release, effective uid and capabilities, and the root's device: what the probe depends on."""
    caps = ""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            caps = next((line.split()[1] for line in status if line.startswith("CapEff:")), "")
    except OSError:  # no /proc: the note still names the kernel, the user and the filesystem
        pass
    return f"kernel={os.uname().release} euid={os.geteuid()} capeff={caps} dev={path.stat().st_dev}\n"


def _noted(note: Path, conditions: str) -> bool:
    try:
        return note.read_text(encoding="utf-8") == conditions
    except (OSError, UnicodeDecodeError):
        return False


def _note(note: Path, conditions: str) -> None:
    """Write the note atomically (a reader sees the old one or the new one); a root it cannot be written
    to just probes again next time."""
    tmp = note.with_name(f"{note.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(conditions, encoding="utf-8")
        os.replace(tmp, note)
    except OSError:
        tmp.unlink(missing_ok=True)


def overlay_supported(root: Path | str) -> bool:
    """Whether an overlay with its upper dir under ``root`` mounts here (probed once per root, then cached:
    in this process, and in the root's ``PROBE_NOTE`` once the probe succeeded).

    False when not root, without the overlay module, or when ``root`` is on a filesystem overlay cannot use
    as upper layer (e.g. overlayfs itself).
    """
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _support_lock:
        if key not in _support:
            try:
                note, conditions = path / PROBE_NOTE, _probe_conditions(path)
                if _noted(note, conditions):
                    _support[key] = True
                else:
                    _support[key] = _probe(path)
                    if _support[key]:
                        _note(note, conditions)
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
