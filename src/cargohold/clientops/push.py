"""Push images from the store to a registry."""

from __future__ import annotations

from cargohold.clientbase import ClientBase


class PushOps(ClientBase):
    """``push``."""
