"""Runtime handlers: each may use its own snapshotter; container rootfs preparation."""

from __future__ import annotations

from cargohold.clientbase import ClientBase


class RuntimeOps(ClientBase):
    """``snapshotter_for``, ``prepare_rootfs``."""
