"""Copy images between registries, archive files and the local store, in the spirit of ``skopeo copy``."""

from __future__ import annotations

from cargohold.clientops.archive import ArchiveOps
from cargohold.clientops.push import PushOps


class CopyOps(ArchiveOps, PushOps):
    """``copy``."""
