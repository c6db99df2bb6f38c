"""A pull that is killed mid-unpack: a child process whose layer apply announces itself and then waits, so the
test can kill it (kill -9) while an unpack is in progress."""

from __future__ import annotations

import textwrap

KILLED_PULL = textwrap.dedent("""
    import sys, threading, time
    from cargohold.diff.worker import ApplyPool
    from cargohold.client import Client

    real = ApplyPool.apply
    first = threading.Lock()

    def slow(*args, **kwargs):
        # Layers apply on several threads at once: only the first says so (one line), all of them wait.
        if first.acquire(blocking=False):
            print("applying", flush=True)  # the parent kills us now, mid-unpack
        time.sleep(60)
        return real(*args, **kwargs)

    ApplyPool.apply = slow
    Client(sys.argv[1]).pull(sys.argv[2])
""")
"""Run as ``python -c KILLED_PULL ROOT REF``: prints ``applying`` when the first layer starts applying."""
