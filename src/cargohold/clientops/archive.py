"""Export and import of image archives (OCI layout + docker manifest.json tars)."""

from __future__ import annotations

from cargohold.clientbase import ClientBase


class ArchiveOps(ClientBase):
    """``export`` and ``import_archive``."""
