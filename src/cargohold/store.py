"""``Store``: one data root and namespace, opened: the metadata database, the namespaced content store, the
image records, the leases and the snapshotters by name (local and proxy). It holds no operations; the
services of ``cargohold.services`` take a ``Store``.

>>> with Store.open("/tmp/root") as store:  # doctest: +SKIP
...     store.images.list()
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from cargohold.config import Config, find_config
from cargohold.content.local import LocalStore
from cargohold.content.namespaced import NamespacedStore
from cargohold.errors import FailedPreconditionError, NotFoundError
from cargohold.metadata.db import DEFAULT_NAMESPACE, MetadataDB
from cargohold.metadata.images import ImageStore
from cargohold.metadata.leases import LeaseStore
from cargohold.snapshots import default_snapshotter_name, open_proxy_snapshotter, open_snapshotter
from cargohold.snapshots.base import Snapshotter


def default_root() -> Path:
    """``$CARGOHOLD_ROOT``, else ``/var/lib/cargohold`` as root, else ``~/.local/share/cargohold``."""
    env = os.environ.get("CARGOHOLD_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/cargohold")
    return Path.home() / ".local" / "share" / "cargohold"


def open_root(path: Path, *, create: bool = True) -> None:
    """Make sure the data root ``path`` is a usable directory, creating it when ``create``.

    The operating system's refusals become one error naming the path and what to do: NotFoundError for a
    root that does not exist (and is not to be created), FailedPreconditionError for one that cannot be
    created or written (no permission, a read-only file system, a file in the way)."""
    if not create:
        if not path.is_dir():
            raise NotFoundError(f"data root {path} does not exist (nothing pulled yet?)")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FailedPreconditionError(f"data root {path} is not a directory: choose another --root") from None
    except OSError as exc:
        raise FailedPreconditionError(
            f"cannot create data root {path}: {exc.strerror or exc}: choose a writable --root "
            "(or $CARGOHOLD_ROOT)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(path) else "permission denied"
        raise FailedPreconditionError(
            f"data root {path} is not writable ({why}): choose a writable --root (or $CARGOHOLD_ROOT)")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class Store:
    """The data of one root seen from one namespace. Thread-safe; ``close()`` (or ``with``) releases the
    snapshotters (a proxy's gRPC channel) and the database connections."""

    def __init__(self, root: Path, *, namespace: str, config: Config, default_snapshotter: str | None = None
                 ) -> None:
        self.root = root
        self.namespace = namespace
        self.config = config
        try:
            self.db = MetadataDB(root / "metadata.db", lock_timeout=config.lock_timeout)
            self.db.ensure_namespace(namespace)
        except sqlite3.Error as exc:  # a read-only or foreign-owned root: name the file, say what to do
            raise FailedPreconditionError(
                f"metadata database {root / 'metadata.db'}: {exc}: use a data root you can write "
                "(--root or $CARGOHOLD_ROOT), or run as its owner") from None
        self.local = LocalStore(root)
        self.content = NamespacedStore(self.local, self.db, namespace)
        self.images = ImageStore(self.db, namespace)
        self.leases = LeaseStore(self.db, namespace)
        self._default_snapshotter = default_snapshotter or config.snapshotter or None
        self._snapshotters: dict[str, Snapshotter] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: Path | str | None = None, *, namespace: str = DEFAULT_NAMESPACE,
             config: Config | None = None, default_snapshotter: str | None = None, create: bool = True
             ) -> Store:
        """Open (creating, unless not ``create``) the data root ``root`` (default: ``default_root()``) in
        ``namespace``; ``config`` defaults to the config file found for the root."""
        path = Path(root) if root is not None else default_root()
        open_root(path, create=create)
        return cls(path, namespace=namespace, config=config if config is not None else find_config(None, path),
                   default_snapshotter=default_snapshotter)

    @property
    def default_snapshotter(self) -> str:
        """The snapshotter used when none is named: the argument, the config's, else the root's best."""
        return self._default_snapshotter or default_snapshotter_name(self.root)

    def snapshotter(self, name: str | None = None) -> Snapshotter:
        """The named snapshotter of this root (``native``, ``overlayfs``, a configured proxy), or the default."""
        name = name or self.default_snapshotter
        with self._lock:
            sn = self._snapshotters.get(name)
            if sn is None:
                proxy = self.config.snapshotters.get(name)
                if proxy is not None:
                    sn = open_proxy_snapshotter(proxy.name, proxy.address, namespace=self.namespace,
                                                remote=proxy.remote, namespaced_keys=proxy.namespaced_keys)
                else:
                    sn = open_snapshotter(name, self.root, self.db, self.namespace)
                self._snapshotters[name] = sn
            return sn

    def close(self) -> None:
        """Release the snapshotters and the database."""
        with self._lock:
            snapshotters, self._snapshotters = list(self._snapshotters.values()), {}
        for sn in snapshotters:
            sn.close()
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
