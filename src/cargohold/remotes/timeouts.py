"""The registry client's default timeouts, apart from the transport so that reading them (the config file's
defaults) does not load urllib3, ssl and http.client: a command that never talks to a registry starts faster."""

from __future__ import annotations

#: Seconds without a byte from a registry before a transfer reports itself as stalled and reconnects at the
#: offset it reached (the read timeout; config ``stall_timeout``).
DEFAULT_STALL_TIMEOUT = 15.0
#: Seconds a blob download may go without any progress, across reconnects, before it gives up (config
#: ``fetch_timeout``).
DEFAULT_FETCH_TIMEOUT = 120.0
