"""cargohold's error kinds and the gRPC status codes of containerd's snapshots API, in both directions.

One table: the server (``cargohold.snapshots.server``) turns an error kind into the code containerd's errdefs
reads back (``grpc_code``); the proxy client (``cargohold.snapshots.proxy``) turns a code into a kind
(``error_kind``). containerd's errdefs leaves a suffix on the message ("...: not found"); the client strips it.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from cargohold.errors import (
    AlreadyExistsError,
    CargoholdError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)

_TABLE: tuple[tuple[type[CargoholdError], grpc.StatusCode, str], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND, "not found"),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS, "already exists"),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION, "failed precondition"),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "invalid argument"),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE, "unavailable"),
)

GRPC_CODES: Mapping[type[CargoholdError], grpc.StatusCode] = {kind: code for kind, code, _ in _TABLE}
"""Error kind -> status code; a subclass (LockedError, UnsafePathError, ...) takes its nearest kind's code."""

ERROR_KINDS: Mapping[grpc.StatusCode, tuple[type[CargoholdError], str]] = {
    **{code: (kind, suffix) for kind, code, suffix in _TABLE},
    # A call that timed out on the client's side: the daemon may be back later, as with UNAVAILABLE.
    grpc.StatusCode.DEADLINE_EXCEEDED: (UnavailableError, "context deadline exceeded"),
}
"""Status code -> (error kind, the suffix containerd's errdefs leaves on the message for that kind)."""


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc``: its class's or nearest base class's entry in ``GRPC_CODES``, else UNKNOWN
    (which containerd's errdefs passes through as a plain error)."""
    for cls in type(exc).__mro__:
        code = GRPC_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


def error_kind(code: grpc.StatusCode) -> tuple[type[CargoholdError], str]:
    """The error kind for a status code and the message suffix to strip ("" for codes with no kind)."""
    return ERROR_KINDS.get(code, (CargoholdError, ""))
