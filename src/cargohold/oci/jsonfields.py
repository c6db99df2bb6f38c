"""Typed reads of untrusted JSON documents: every wrong shape is an InvalidArgumentError naming the field."""

from __future__ import annotations

import json
from typing import Any

from cargohold.errors import InvalidArgumentError


def load_object(raw: bytes, what: str) -> dict[str, Any]:
    """``raw`` as a JSON object; RecursionError (absurd nesting) is bad input like any other."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidArgumentError(f"{what}: not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{what}: not a JSON object")
    return data


def string(data: dict[str, Any], key: str, where: str) -> str:
    """An optional string field ("" when absent or null)."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{where}: {key} must be a string, not {type(value).__name__}")
    return value


def string_map(data: dict[str, Any], key: str, where: str) -> dict[str, str]:
    """An optional object of strings (annotations, labels)."""
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgumentError(f"{where}: {key} must be an object of strings")
    return dict(value)


def string_list(data: dict[str, Any], key: str, where: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgumentError(f"{where}: {key} must be a list of strings")
    return list(value)


def array(data: dict[str, Any], key: str, where: str, *, cap: int, what: str) -> list[Any]:
    """An optional array of at most ``cap`` items; the error names the cap."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgumentError(f"{where}: {key} must be a list")
    if len(value) > cap:
        raise InvalidArgumentError(f"{where}: {len(value)} {what} is over the limit of {cap} {what}")
    return value
