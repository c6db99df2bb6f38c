"""Writes tar entries into a root: files, dirs, links, FIFOs, devices, owners, modes, xattrs, times,
whiteouts.

Normal mode applies a layer onto a directory holding its parents' merged tree (``native`` snapshotter): an OCI
whiteout ``.wh.NAME`` deletes NAME, an opaque marker ``.wh..wh..opq`` empties its directory of everything this
layer did not write. Overlay mode applies a layer alone into an empty overlayfs upper directory: whiteouts
become 0/0 character devices and opaque markers the ``trusted.overlay.opaque=y`` xattr; nothing is deleted.

Metadata follows ``diff.attrs``; directory times are set at the very end, after their contents were written.
Not root, read-only directories (``usr/bin`` 0555) could not receive their children: they are opened up (u+rwx)
while the layer applies and given their final mode — the entry's, else the one they had — at the very end too.
Device nodes that cannot be made then are skipped with one warning per layer.
Small new files are written by ``diff.writers`` threads; ``_flush`` is the barrier before anything whose
outcome depends on entry order.

Few system calls per entry: an inode this layer creates is already ours — our uid, and our gid unless its
directory is setgid (then the directory's gid) — so its ``chown`` is skipped when the entry asks for exactly
that; which directories are setgid is known from this layer's directory entries, or from one ``lstat`` per
other directory (cached, forgotten when directories are removed). A create already gives the mode when the
umask keeps all its bits (and, for a directory, no setgid is inherited); an existing directory is chowned and
chmodded only when its ``lstat`` shows other values. Times are always set: a new inode has the current time.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable

from cargohold.diff import sparse
from cargohold.diff.attrs import Owners, create_owner_rule, drop_stale_xattrs, entry_times, read_umask, set_xattrs
from cargohold.diff.paths import Resolver, clean_name
from cargohold.diff.removal import remove_tree
from cargohold.diff.tarstream import BLK, CHR, DIR, FIFO, LNK, REG, SYM, TarEntry, TarReader
from cargohold.diff.writers import FileWriters
from cargohold.errors import InvalidArgumentError, NeedsParentsError, NotFoundError, UnsafePathError

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SMALL = 1 << 20  # files up to this size are written from one buffer view
_EMPTY = memoryview(b"")


def _has_meta_component(path: str) -> bool:
    """Whether a component starts with ``.wh..wh.`` (aufs bookkeeping such as ``.wh..wh.plnk``, not files)."""
    return any(c.startswith(WHITEOUT_META_PREFIX) for c in path.split("/"))


def _write_all(fd: int, view: memoryview) -> None:
    n = os.write(fd, view)
    while n < len(view):
        view = view[n:]
        n = os.write(fd, view)


class Extractor:
    """Applies the entries of one layer under ``root``. Call ``apply`` per entry, then ``finish`` once.

    Not thread-safe; one instance per layer. It assumes nothing else writes under ``root`` meanwhile.
    """

    def __init__(self, root: str, *, overlay: bool, write_threads: int | None = None, isolated: bool = False
                 ) -> None:
        self.root = root
        self.overlay = overlay
        self.isolated = isolated
        self.entries = 0
        # write_threads=0: every file inline; None: up to 8 threads while creates prove slow; N: N threads.
        self._writers = None if write_threads == 0 else FileWriters(self._write_new, threads=write_threads)
        self._owners = Owners()
        self._paths = Resolver(root, on_non_dir=self._dir_over_whiteout if overlay else None,
                               before_lookup=self._flush_if_pending if self._writers else None,
                               on_implicit_dir=self._needs_parents if isolated else None,
                               on_denied=None if self._owners.privileged else self._open_up)
        # Real paths this layer wrote, and their ancestors: what an opaque marker keeps.
        self._written: set[str] = {""}
        self._dir_times: dict[str, tuple[int, int]] = {}
        self._whiteouts: set[str] = set()  # overlay mode: whiteout devices this layer made
        # Not root: directories opened up -> the mode they end with; paths known to be open (a cache).
        self._rootless = not self._owners.privileged
        self._dir_modes: dict[str, int] = {}
        self._open: set[str] = set()
        self._devices_skipped: list[TarEntry] = []
        self._keep_bits = 0o777 & ~read_umask()  # mode bits a create keeps; others need a chmod
        # Owner of what we create: our uid, and our gid unless the directory is setgid (then the directory's
        # gid) — on filesystems known to follow that rule ("sysv"; "bsd": always the directory's gid); None:
        # unknown, every owner is set explicitly.
        self._rule = create_owner_rule(root)
        self._uid = os.geteuid()
        self._gid = os.getegid()
        # Real directory path -> (gid an inode created in it gets, whether a directory made in it inherits the
        # setgid bit). Updated when this layer sets a directory's metadata, dropped when directories go.
        self._dir_gid: dict[str, tuple[int, bool]] = {}

    # -- entry dispatch -----------------------------------------------------------------------------------

    def apply(self, e: TarEntry, tar: TarReader) -> None:
        name = e.name
        logical = clean_name(name)
        parent, _, base = logical.rpartition("/")
        self.entries += 1
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base, e)
            return
        if not logical:
            if e.kind != DIR:
                raise UnsafePathError(f"tar entry {name!r}: a non-directory would replace the root")
            self._dir_meta(self.root, "", e, fresh=False, parent="")
            return
        if WHITEOUT_META_PREFIX in parent and _has_meta_component(parent):
            log.debug("skipping aufs metadata entry %r", name)
            return
        dreal = self._parent(parent, name)
        rel = f"{dreal}/{base}" if dreal else base
        path = f"{self.root}/{rel}"
        self._written.add(rel)
        if self._writers is not None and path in self._writers.pending:
            self._flush()  # the same path twice in one layer: the first write must land first
        kind = e.kind
        if kind == REG:
            # A path this layer resolved as a directory is replaced inline: later entries below it must see
            # the file (and fail), not the directory a queued write has not replaced yet.
            self._file(path, e, tar, queue=self._paths.lookup(logical) is None, chown=self._chown_new(dreal, e))
        elif kind == DIR:
            self._dir(path, rel, e, dreal)
            self._paths.remember(logical, rel)
        elif kind == SYM:
            self._symlink(path, e, dreal)
        elif kind == LNK:
            self._hardlink(path, e)
        elif kind == FIFO:
            self._create(path, lambda: os.mkfifo(path, e.mode & 0o777))
            self._meta(path, e, symlink=False, chown=self._chown_new(dreal, e))
        elif kind == CHR or kind == BLK:
            self._device(path, e, dreal)
        else:  # pragma: no cover - the reader only yields the kinds above
            raise InvalidArgumentError(f"tar entry {name!r}: unsupported type {kind!r}")

    def finish(self) -> None:
        """Wait for queued files, then set directory times (and modes, not root): nothing will be written into
        them any more."""
        self._flush()
        self.close()
        for path, times in self._dir_times.items():
            try:
                os.utime(path, ns=times, follow_symlinks=False)
            except FileNotFoundError:
                pass
        if self._dir_modes:
            # Innermost first: a directory closed to us (no u+x) must not block its children's chmod.
            for path in sorted(self._dir_modes, key=lambda p: p.count("/"), reverse=True):
                try:
                    os.chmod(path, self._dir_modes[path])
                except FileNotFoundError:
                    pass
        if self._devices_skipped:
            first = self._devices_skipped[0]
            n = len(self._devices_skipped)
            log.warning("%d device node%s skipped, mknod not permitted (first: tar entry %r, %d:%d)",
                        n, "" if n == 1 else "s", first.name, first.devmajor, first.devminor)

    def close(self) -> None:
        """Stop the writer threads (idempotent; after an error, what they wrote stays)."""
        if self._writers is not None:
            self._writers.close()

    # -- queued writes ------------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Barrier: every queued file is on disk; those whose path existed are now replaced, in order."""
        if self._writers is None:
            return
        for path, e, data, chown in self._writers.flush():
            self._replace_with_new(path, e, data, chown)

    def _flush_if_pending(self, rel: str) -> None:
        assert self._writers is not None
        if self._writers.pending and f"{self.root}/{rel}" in self._writers.pending:
            self._flush()

    # -- paths --------------------------------------------------------------------------------------------

    def _parent(self, logical: str, entry: str) -> str:
        real = self._paths.lookup(logical)
        if real is None:
            real = self._paths.resolve(logical, entry, create=True)
            assert real is not None
        if real not in self._written:
            self._mark(real)
        if self._rootless and real not in self._open:
            self._open_up(real)
        return real

    def _open_up(self, rel: str) -> bool:
        """Not root: let us write into directory ``rel`` until ``finish`` (which gives back its mode)."""
        path = self._paths.abs(rel)
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        self._open.add(rel)
        if mode & 0o700 == 0o700:
            self._dir_gid[rel] = self._gives(st.st_gid, mode)
            return False
        os.chmod(path, mode | 0o700)  # (may drop its setgid bit: not in its group)
        self._dir_gid.pop(rel, None)
        self._dir_modes.setdefault(path, mode)
        return True

    def _mark(self, rel: str) -> None:
        written = self._written
        while rel not in written:
            written.add(rel)
            rel = rel.rpartition("/")[0]

    def _gives(self, gid: int, mode: int) -> tuple[int, bool]:
        """What a directory of this ``gid`` and ``mode`` gives what is created in it: (gid, setgid bit for
        directories)."""
        if self._rule == "bsd":
            return gid, False
        setgid = bool(mode & stat.S_ISGID)
        return (gid if setgid else self._gid), setgid

    def _gives_in(self, rel: str) -> tuple[int, bool]:
        """``_gives`` of directory ``rel``: one lstat, cached."""
        found = self._dir_gid.get(rel)
        if found is None:
            st = os.lstat(self._paths.abs(rel))
            found = self._dir_gid[rel] = self._gives(st.st_gid, st.st_mode)
        return found

    def _chown_new(self, parent: str, e: TarEntry) -> bool:
        """Whether an inode just created in directory ``parent`` needs a chown to get the entry's owner."""
        return self._rule is None or e.uid != self._uid or e.gid != self._gives_in(parent)[0]

    def _remove(self, path: str, st: os.stat_result | None = None) -> None:
        """Remove what is at ``path`` (a whole tree for a directory), keeping the caches true."""
        if self._writers is not None and self._writers.pending:
            self._flush()  # queued files may be inside, or be this very path
            st = None
        mode = (st or os.lstat(path)).st_mode
        if stat.S_ISDIR(mode):
            if self._rootless:
                remove_tree(path)  # opens up read-only directories inside
                self._open.clear()
            else:
                shutil.rmtree(path)
            self._paths.forget()
            self._dir_gid.clear()
            inside = path + "/"
            for cache in (self._dir_times, self._dir_modes):
                if cache:
                    for key in [k for k in cache if k == path or k.startswith(inside)]:
                        del cache[key]
        else:
            os.unlink(path)
            if stat.S_ISLNK(mode):
                self._paths.forget()

    def _create(self, path: str, make: Callable[[], object]) -> None:
        """Run ``make``; if something is in the way, remove it and run ``make`` again."""
        try:
            make()
        except FileExistsError:
            self._remove(path)
            make()

    # -- entry kinds --------------------------------------------------------------------------------------

    def _write_new(self, path: str, e: TarEntry, data: memoryview, chown: bool) -> bool:
        """Create and fill a small file that must not exist yet; False (nothing done) if it does.

        Runs on writer threads: touches nothing shared but the logger."""
        try:
            fd = os.open(path, _CREATE, e.mode & 0o777)
        except FileExistsError:
            return False
        try:
            if data:
                _write_all(fd, data)
            self._fd_meta(fd, e, chown)
        finally:
            os.close(fd)
        return True

    def _replace_with_new(self, path: str, e: TarEntry, data: memoryview, chown: bool) -> None:
        self._remove(path)
        if not self._write_new(path, e, data, chown):
            raise FileExistsError(errno.EEXIST, "still exists after removal", path)

    def _file(self, path: str, e: TarEntry, tar: TarReader, *, queue: bool, chown: bool) -> None:
        if e.sparse is not None:
            self._sparse_file(path, e, tar, chown)
            return
        if e.size <= _SMALL:
            data = tar.read_small() if e.size else _EMPTY
            if queue and self._writers is not None:
                if not self._writers.submit(path, e, data, chown):
                    self._replace_with_new(path, e, data, chown)
            elif not self._write_new(path, e, data, chown):
                self._replace_with_new(path, e, data, chown)
            return
        try:  # large: streamed in chunks from the reader
            fd = os.open(path, _CREATE, e.mode & 0o777)
        except FileExistsError:
            self._remove(path)
            fd = os.open(path, _CREATE, e.mode & 0o777)
        try:
            for chunk in tar.chunks():
                _write_all(fd, chunk)
            self._fd_meta(fd, e, chown)
        finally:
            os.close(fd)

    def _sparse_file(self, path: str, e: TarEntry, tar: TarReader, chown: bool) -> None:
        """A sparse entry: its data at the map's offsets, holes left as holes (written inline, never queued)."""
        assert e.sparse is not None
        try:
            fd = os.open(path, _CREATE, e.mode & 0o777)
        except FileExistsError:
            self._remove(path)
            fd = os.open(path, _CREATE, e.mode & 0o777)
        try:
            sparse.write(fd, e.sparse, tar.chunks(), e.name)
            self._fd_meta(fd, e, chown)
        finally:
            os.close(fd)

    def _dir(self, path: str, rel: str, e: TarEntry, parent: str) -> None:
        st: os.stat_result | None = None
        try:
            os.mkdir(path, e.mode & 0o777)
            fresh = True
        except FileExistsError:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                fresh = False  # keeps its contents, takes the entry's metadata
            elif self._dir_over_whiteout(rel):
                fresh = False  # now an opaque directory: its mode still has to be set
                st = None
            else:  # a file or symlink in the way goes
                self._remove(path, st)
                os.mkdir(path, e.mode & 0o777)
                fresh = True
                st = None
        self._dir_meta(path, rel, e, fresh=fresh, parent=parent, st=st)

    def _dir_meta(self, path: str, rel: str, e: TarEntry, *, fresh: bool, parent: str,
                  st: os.stat_result | None = None) -> None:
        """The entry's metadata on directory ``path`` (``rel`` under the root, in directory ``parent``):
        ``fresh`` when we just made it, ``st`` its lstat from before when it existed."""
        if not fresh and self._writers is not None and self._writers.pending and self._rule is not None and (
                st is None or self._gives(st.st_gid, st.st_mode) != self._gives(e.gid, e.mode)):
            # Queued files in it were judged by the gid their create gets now: they must land first.
            self._flush()
        if fresh:
            # mkdir gave it our uid and the parent's new-inode gid, and the parent's setgid bit if it has one.
            gid, inherited = self._gives_in(parent) if self._rule is not None else (-1, True)
            if e.uid != self._uid or e.gid != gid:
                self._owners.apply(path, e)
        elif st is None or st.st_uid != e.uid or st.st_gid != e.gid:
            self._owners.apply(path, e)
        if not fresh:
            drop_stale_xattrs(path, e)
        if e.xattrs:
            set_xattrs(path, e)
        mode = e.mode
        if self._rootless:
            if mode & 0o700 != 0o700:  # its children come later: the final mode waits for finish()
                self._dir_modes[path] = mode
                mode |= 0o700
            else:
                self._dir_modes.pop(path, None)
            self._open.add(rel)
        if fresh:
            # A fresh one has what mkdir gave it: the bits the umask kept, plus an inherited setgid bit.
            if mode != e.mode & self._keep_bits or inherited:
                os.chmod(path, mode)
        elif st is None or e.xattrs or stat.S_IMODE(st.st_mode) != mode:  # (an ACL xattr can change the mode)
            os.chmod(path, mode)
        # What inodes created in it get from now on. Not root, the chown may have been refused: look again.
        if self._rootless:
            self._dir_gid.pop(rel, None)
        else:
            self._dir_gid[rel] = self._gives(e.gid, mode)
        self._dir_times[path] = entry_times(e)

    def _needs_parents(self, rel: str, entry: str) -> None:
        raise NeedsParentsError(f"tar entry {entry!r}: directory {rel!r} is not in this layer")

    def _symlink(self, path: str, e: TarEntry, parent: str) -> None:
        if not e.linkname:
            raise InvalidArgumentError(f"tar entry {e.name!r}: symlink with an empty target")
        self._create(path, lambda: os.symlink(e.linkname, path))
        self._meta(path, e, symlink=True, chown=self._chown_new(parent, e))

    def _hardlink(self, path: str, e: TarEntry) -> None:
        name = e.name
        target = clean_name(e.linkname, name)
        tparent, _, tbase = target.rpartition("/")
        if not tbase:
            raise UnsafePathError(f"tar entry {name!r}: hardlink to the root refused")
        treal = self._paths.resolve(tparent, name, create=False)
        tpath = self._paths.abs(f"{treal}/{tbase}" if treal else tbase)
        if self._writers is not None and tpath in self._writers.pending:
            self._flush()
        try:
            if treal is None:
                raise FileNotFoundError
            tst = os.lstat(tpath)
        except FileNotFoundError:
            if self.isolated:
                raise NeedsParentsError(
                    f"tar entry {name!r}: hardlink target {e.linkname!r} is not in this layer") from None
            hint = " (overlay mode: a file of a parent layer cannot be linked to)" if self.overlay else ""
            raise NotFoundError(
                f"tar entry {name!r}: hardlink target {e.linkname!r} does not exist{hint}") from None
        if stat.S_ISDIR(tst.st_mode):
            raise InvalidArgumentError(f"tar entry {name!r}: hardlink to directory {e.linkname!r}")
        try:
            os.link(tpath, path, follow_symlinks=False)
        except FileExistsError:
            st = os.lstat(path)
            if os.path.samestat(st, tst):
                return
            self._remove(path, st)
            os.link(tpath, path, follow_symlinks=False)
        # Like GNU tar, the shared inode keeps the metadata its first entry gave it.

    def _device(self, path: str, e: TarEntry, parent: str) -> None:
        kind = stat.S_IFCHR if e.kind == CHR else stat.S_IFBLK
        dev = os.makedev(e.devmajor, e.devminor)
        try:
            self._create(path, lambda: os.mknod(path, kind | (e.mode & 0o777), dev))
        except PermissionError:  # not root, or root without CAP_MKNOD (in a container)
            self._devices_skipped.append(e)  # reported once, by finish()
            return
        self._meta(path, e, symlink=False, chown=self._chown_new(parent, e))

    # -- metadata -----------------------------------------------------------------------------------------

    def _meta(self, path: str, e: TarEntry, *, symlink: bool, chown: bool) -> None:
        """Owner (``chown``: unless it has it already), xattrs, mode (not on symlinks: chmod would follow them)
        and times of a new non-file by path."""
        if chown:
            self._owners.apply(path, e)
        if e.xattrs:
            set_xattrs(path, e, symlink=symlink)
        if not symlink and e.mode != e.mode & self._keep_bits:
            os.chmod(path, e.mode)
        os.utime(path, ns=entry_times(e), follow_symlinks=False)

    def _fd_meta(self, fd: int, e: TarEntry, chown: bool) -> None:
        if chown:
            self._owners.apply(fd, e)
        if e.xattrs:
            set_xattrs(fd, e)
        if e.mode != e.mode & self._keep_bits:
            os.fchmod(fd, e.mode)
        os.utime(fd, ns=entry_times(e))

    # -- whiteouts ----------------------------------------------------------------------------------------

    def _whiteout(self, parent: str, base: str, e: TarEntry) -> None:
        name = e.name
        if base == OPAQUE_MARKER:
            self._opaque(parent, name)
            return
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise UnsafePathError(f"tar entry {name!r}: whiteout of {target!r} points outside its directory")
        if target.startswith(WHITEOUT_PREFIX) or _has_meta_component(parent):
            log.debug("skipping aufs metadata entry %r", name)
            return
        # A whiteout hides its parents' files only, never its own layer's (OCI image spec): a path this layer
        # already wrote stays, whichever order the entries came in.
        # Parents are created in both modes (as containerd does), so both give the same merged tree.
        dreal = self._parent(parent, name)
        rel = f"{dreal}/{target}" if dreal else target
        if rel in self._written:
            return
        path = f"{self.root}/{rel}"
        if self.overlay:
            self._written.add(rel)
            self._whiteouts.add(rel)
            self._create(path, lambda: os.mknod(path, stat.S_IFCHR, 0))
            if self._chown_new(dreal, e):
                self._owners.apply(path, e)
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        self._remove(path, st)

    def _opaque(self, parent: str, name: str) -> None:
        dreal = self._parent(parent, name)
        if self.overlay:
            os.setxattr(self._paths.abs(dreal), OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
        else:
            self._flush()  # queued files are this layer's: they must exist to be kept, not be created after
            self._clear_unwritten(dreal)

    def _dir_over_whiteout(self, rel: str) -> bool:
        """Overlay mode, a directory wanted where this layer put a whiteout: it must hide the parents' directory
        as the whiteout did, so it becomes an opaque directory (what overlayfs itself does on rmdir+mkdir)."""
        if rel not in self._whiteouts:
            return False
        self._whiteouts.discard(rel)
        path = self._paths.abs(rel)
        os.unlink(path)
        self._dir_gid.pop(rel, None)
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)
        os.setxattr(path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
        return True

    def _clear_unwritten(self, rel: str) -> None:
        """Delete everything under ``rel`` that this layer did not write (the parents' content it hides)."""
        if self._rootless and rel not in self._open:
            self._open_up(rel)
        with os.scandir(self._paths.abs(rel)) as it:
            children = list(it)
        for child in children:
            crel = f"{rel}/{child.name}" if rel else child.name
            if crel in self._written:
                if child.is_dir(follow_symlinks=False):
                    self._clear_unwritten(crel)
            else:
                self._remove(child.path)
