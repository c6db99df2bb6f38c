"""Member names and in-root path resolution: the part of extraction that keeps writes inside the root.

Policy (stricter than containerd, which silently re-roots everything):

* A member name is cleaned lexically (``./a//b/`` -> ``a/b``; ``a/../b`` -> ``b``). An absolute name, or one
  whose ``..`` climbs above the root, is refused with UnsafePathError naming the entry.
* Parent directories may be symlinks. They are followed component by component *inside* the root, as in a
  chroot: an absolute target starts again at the root (``/run`` means ``<root>/run``, never the host's), a
  relative one from the link's directory. A target's ``..`` at the root stays at the root, as in a chroot
  (``usr/lib64/x -> ../../../../usr/lib/x`` is common in real images): the walk is clamped, never refused and
  never continued outside. The symlink itself is written verbatim; only paths resolved through it clamp.
* The last component of a name is never followed: the entry replaces whatever is there.
* A hardlink's target is a member name too: cleaned the same way (absolute or escaping by name: refused), its
  parents resolved as above (symlinks on the way clamp), its last component not followed (a link to a
  symlink links the symlink).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from cargohold.errors import InvalidArgumentError, UnsafePathError

MAX_SYMLINKS = 40


def clean_name(name: str, entry: str | None = None) -> str:
    """``name`` cleaned to a root-relative path without ``.``/``..``/empty parts; ``""`` is the root itself.

    ``entry`` names the tar entry in errors when ``name`` is another field of it (a hardlink's target).
    """
    who = f"tar entry {entry or name!r}"
    if name.startswith("/"):
        what = "absolute path" if entry is None else f"absolute hardlink target {name!r}"
        raise UnsafePathError(f"{who}: {what} refused")
    if "//" not in name and "/." not in name and not name.startswith("."):
        return name.rstrip("/")  # the common case: nothing to clean
    parts: list[str] = []
    for comp in name.split("/"):
        if comp == "" or comp == ".":
            continue
        if comp == "..":
            if not parts:
                what = "path" if entry is None else f"hardlink target {name!r}"
                raise UnsafePathError(f"{who}: {what} escapes the root with '..'")
            parts.pop()
        else:
            parts.append(comp)
    return "/".join(parts)


class Resolver:
    """Resolves directories of a root to symlink-free real paths (relative to the root), with a cache.

    The cache maps cleaned logical directory names to real paths. It stays valid while nothing but this
    resolver's owner changes the root, and the owner calls ``forget()`` whenever it removes a directory or a
    symlink (the only changes that can invalidate a cached resolution).
    """

    def __init__(self, root: str, *, on_non_dir: Callable[[str], bool] | None = None,
                 before_lookup: Callable[[str], object] | None = None,
                 on_implicit_dir: Callable[[str, str], object] | None = None,
                 on_denied: Callable[[str], bool] | None = None) -> None:
        self.root = root
        # Called (real path) when looking or making a directory inside it was denied: True when it may be
        # retried (it was opened up).
        self._on_denied = on_denied
        # Called (real path, entry) before a missing directory is made: a chance to refuse guessing it.
        self._on_implicit_dir = on_implicit_dir
        self._dirs: dict[str, str] = {"": ""}
        # Asked about a non-directory met on the way (real path): True when it made it a directory.
        self._on_non_dir = on_non_dir
        # Called with each real path about to be looked at (cache misses only): a chance to land queued writes.
        self._before_lookup = before_lookup

    def abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def forget(self) -> None:
        self._dirs = {"": ""}

    def remember(self, logical: str, real: str) -> None:
        """Record that directory ``logical`` is at ``real`` (the caller just made it)."""
        self._dirs[logical] = real

    def lookup(self, logical: str) -> str | None:
        return self._dirs.get(logical)

    def resolve(self, logical: str, entry: str, *, create: bool) -> str | None:
        """The real path of directory ``logical``. Missing directories are made (0755) when ``create``,
        else the answer is None. A non-directory on the way is an error naming ``entry``."""
        cached = self._dirs.get(logical)
        if cached is not None:
            return cached
        parent, _, base = logical.rpartition("/")
        cur = self.resolve(parent, entry, create=create)
        if cur is None:
            return None
        real = self._walk(cur, (base,), entry, create, [MAX_SYMLINKS])
        if real is not None:
            self._dirs[logical] = real
        return real

    def _walk(self, cur: str, comps: tuple[str, ...] | list[str], entry: str, create: bool,
              budget: list[int]) -> str | None:
        for comp in comps:
            if comp == "" or comp == ".":
                continue
            if comp == "..":
                # Only symlink targets get here (names are cleaned first): at the root, '..' is the root.
                cur = cur.rpartition("/")[0]
                continue
            nxt = f"{cur}/{comp}" if cur else comp
            path = self.abs(nxt)
            if self._before_lookup is not None:
                self._before_lookup(nxt)
            try:
                try:
                    mode = os.lstat(path).st_mode
                except PermissionError:  # ``cur`` has no search bit for us (not root)
                    if self._on_denied is None or not self._on_denied(cur):
                        raise
                    mode = os.lstat(path).st_mode
            except FileNotFoundError:
                if not create:
                    return None
                if self._on_implicit_dir is not None:
                    self._on_implicit_dir(nxt, entry)
                try:
                    os.mkdir(path, 0o755)
                except PermissionError:
                    if self._on_denied is None or not self._on_denied(cur):
                        raise
                    os.mkdir(path, 0o755)
                os.chmod(path, 0o755)  # whatever the umask
                cur = nxt
                continue
            if stat.S_ISDIR(mode):
                cur = nxt
            elif stat.S_ISLNK(mode):
                budget[0] -= 1
                if budget[0] < 0:
                    raise UnsafePathError(f"tar entry {entry!r}: too many levels of symlinks on its path")
                target = os.readlink(path)
                start = "" if target.startswith("/") else cur
                found = self._walk(start, target.split("/"), entry, create, budget)
                if found is None:
                    return None
                cur = found
            elif create and self._on_non_dir is not None and self._on_non_dir(nxt):
                cur = nxt
            else:
                raise InvalidArgumentError(f"tar entry {entry!r}: {nxt!r} on its path is not a directory")
        return cur
