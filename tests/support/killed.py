"""A pull that is killed mid-unpack: a child process whose layer apply announces itself and then waits, so the
test can kill it (kill -9) while an unpack is in progress."""

from __future__ import annotations

import textwrap

KILLED_PULL = textwrap.dedent("""
    import sys, time
    import cargohold.unpack.unpacker as unpacker
    from cargohold.client import Client

    real = unpacker.apply_layer

    def slow(*args, **kwargs):
        print("applying", flush=True)  # the parent kills us now, mid-unpack
        time.sleep(60)
        return real(*args, **kwargs)

    unpacker.apply_layer = slow
    Client(sys.argv[1]).pull(sys.argv[2])
""")
"""Run as ``python -c KILLED_PULL ROOT REF``: prints ``applying`` when the first layer starts applying."""
