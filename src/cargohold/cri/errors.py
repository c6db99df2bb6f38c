"""cargohold's error kinds as gRPC status codes: one table, read at the CRI boundary and nowhere else."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from cargohold.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnauthorizedError,
    UnavailableError,
)

GRPC_CODES: Mapping[type[BaseException], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    UnauthorizedError: grpc.StatusCode.UNAUTHENTICATED,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}
"""Error kind -> status code. A subclass (e.g. DigestMismatchError, LockedError) takes its nearest kind's code."""


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc``: its class's or nearest base class's entry in ``GRPC_CODES``, else INTERNAL."""
    for cls in type(exc).__mro__:
        code = GRPC_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
