"""One flat tree of error kinds, after containerd's errdefs.

Every error names what failed (a digest, ref, key, path or host). Boundaries (CLI exit codes, gRPC status)
map the kinds in one table each; nothing else inspects message text.
"""

from __future__ import annotations

import errno
import os


class CargoholdError(Exception):
    """Base of every error cargohold raises on purpose."""


class NotFoundError(CargoholdError):
    """A digest, image, snapshot, ref or file does not exist."""


class AlreadyExistsError(CargoholdError):
    """The thing being created exists already."""


class InvalidArgumentError(CargoholdError):
    """Input is malformed: a reference, digest, platform, manifest or option."""


class FailedPreconditionError(CargoholdError):
    """The state does not allow the operation (e.g. an image with missing content)."""


class NeedsParentsError(FailedPreconditionError):
    """A layer applied on its own (no parents present) touches a path only its parents can explain: a directory
    it does not create or a hardlink to a file it does not hold. The caller applies it onto its parents."""


class UnavailableError(CargoholdError):
    """A resource is busy or unreachable; a retry may help."""


class NoSpaceError(UnavailableError):
    """A write failed for lack of space (ENOSPC, EDQUOT) or on a read-only filesystem (EROFS). Names the
    operation and the path; what was partly written has been discarded or is kept to be resumed."""


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError saying the filesystem has no room (or is read-only)."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def no_space(exc: OSError, operation: str, path: object) -> NoSpaceError:
    """The NoSpaceError for ``exc`` (checked with ``is_no_space``): ``operation`` into ``path``."""
    return NoSpaceError(f"{operation} into {path}: {os.strerror(exc.errno or errno.ENOSPC)} (free space and retry)")


class FeedFailedError(UnavailableError):
    """A blob file an apply was following while it was written will not be completed (its download failed
    or was cut short); the apply stopped. Names the reason."""


class LimitExceededError(FailedPreconditionError):
    """A layer is larger, or inflates larger, than a limit the node set (max_layer_size, max_unpacked_size)."""


class LockedError(UnavailableError):
    """An ingest ref or snapshot key is held by another writer."""

    def __init__(self, ref: str, holder: str = "") -> None:
        self.ref = ref
        msg = f"ref {ref} locked"
        if holder:
            msg += f" by {holder}"
        super().__init__(msg)


class DigestMismatchError(InvalidArgumentError):
    """Content did not hash to the digest it was expected to have. Nothing was committed."""

    def __init__(self, expected: object, actual: object, what: str = "content") -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what} digest mismatch: expected {expected}, got {actual}")


class SizeMismatchError(InvalidArgumentError):
    """Content did not have the size its descriptor announced. Nothing was committed."""

    def __init__(self, digest: object, expected: int, actual: int) -> None:
        self.digest = digest
        self.expected = expected
        self.actual = actual
        super().__init__(f"content {digest}: size mismatch: expected {expected} bytes, got {actual}")


class UnsupportedMediaTypeError(InvalidArgumentError):
    """A descriptor carries a media type cargohold does not handle. Names the descriptor."""


class UnauthorizedError(CargoholdError):
    """The registry refused our credentials (or we had none)."""


class RegistryError(CargoholdError):
    """An error answered by a registry, with its own code (MANIFEST_UNKNOWN, TOOMANYREQUESTS, ...)."""

    def __init__(self, host: str, status: int, code: str, message: str, detail: str = "") -> None:
        self.host = host
        self.status = status
        self.code = code
        self.detail = detail
        text = f"{host}: {code or 'HTTP ' + str(status)}"
        if message:
            text += f": {message}"
        super().__init__(text)

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


class UnsafePathError(InvalidArgumentError):
    """A tar entry would write outside the root (../, absolute, through a symlink, hardlink out)."""


class CancelledError(KeyboardInterrupt):
    """The operation was cancelled (Ctrl-C, SIGTERM, ``Cancel.cancel()``) and stopped where it was.

    A KeyboardInterrupt, not a CargoholdError: handlers that fall back on an error (the next registry host,
    a retry) must let a cancellation through, and a worker thread's cancellation surfaces in the caller as
    the interruption it is."""
