"""The facade: one data root (blob files + SQLite metadata) and every operation users run on it.

>>> client = Client("/tmp/root")  # doctest: +SKIP
>>> client.pull("127.0.0.1:5000/app:v1")  # doctest: +SKIP
"""

from __future__ import annotations

from cargohold.clientbase import ClientBase, PullResult, default_root
from cargohold.clientops.copy import CopyOps
from cargohold.clientops.referrers import ReferrersOps
from cargohold.clientops.runtime import RuntimeOps
from cargohold.remotes.fetch import DISTRIBUTION_SOURCE


class Client(CopyOps, RuntimeOps, ReferrersOps):
    """Everything cargohold does, on one data root and namespace (see ``ClientBase`` for the core)."""


__all__ = ["DISTRIBUTION_SOURCE", "Client", "ClientBase", "PullResult", "default_root"]
