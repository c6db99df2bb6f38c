"""Registry error bodies (``{"errors": [{"code", "message", "detail"}]}``) as cargohold's error kinds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cargohold.errors import CargoholdError, NotFoundError, RegistryError, UnauthorizedError

# Codes of the distribution spec that mean "there is no such thing".
NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN", "BLOB_UPLOAD_UNKNOWN"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorBody:
    """The first error of a registry's JSON error body (empty strings when the body had none)."""

    code: str = ""
    message: str = ""
    detail: str = ""


def parse_error_body(body: bytes) -> ErrorBody:
    """Read the distribution-spec error document; anything else gives an empty ``ErrorBody``.

    A non-JSON body (a proxy's HTML page) gives its first line as the message, trimmed, so the user
    still sees something.
    """
    if not body:
        return ErrorBody()
    try:
        doc: Any = json.loads(body)
    except ValueError:
        first = body.decode("utf-8", "replace").strip().splitlines()
        return ErrorBody(message=first[0][:200] if first else "")
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return ErrorBody()
    first_err = errors[0]
    detail = first_err.get("detail", "")
    if not isinstance(detail, str):
        detail = json.dumps(detail, sort_keys=True) if detail else ""
    return ErrorBody(
        code=str(first_err.get("code", "") or ""),
        message=str(first_err.get("message", "") or ""),
        detail=detail,
    )


def registry_error(host: str, status: int, body: bytes, *, what: str, repository: str = "") -> CargoholdError:
    """The error kind for a failed registry answer.

    ``what`` names the object asked for (``127.0.0.1:5000/app:v1``, ``127.0.0.1:5000/app@sha256:...``);
    ``repository`` the repository, for 401s. 404s become NotFoundError (callers catch one kind), 401s
    UnauthorizedError, everything else RegistryError with the registry's code.
    """
    err = parse_error_body(body)
    if status == 404 or err.code in NOT_FOUND_CODES:
        return NotFoundError(f"{what}: not found ({err.code or 'HTTP 404'})")
    if status == 401:
        where = f"{host}/{repository}" if repository else host
        text = err.message or "authentication required"
        return UnauthorizedError(f"{where}: unauthorized: {text}")
    if status == 403:
        where = f"{host}/{repository}" if repository else host
        return UnauthorizedError(f"{where}: access denied ({err.code or 'HTTP 403'}): {err.message or what}")
    return RegistryError(
        host, status, err.code, f"{what}: {err.message}" if err.message else what, err.detail
    )
