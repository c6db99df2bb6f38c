"""Tables and JSON for command output."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import click

from cargohold.stages import Profile


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table (scripts should use ``--output json``)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        click.echo(line)


def labels_cell(labels: Mapping[str, str]) -> str:
    """Labels as ``key=value`` pairs separated by commas; a value holding a comma, a space or a quote is quoted
    (JSON string syntax), so that ``…source.host=repo1,repo2`` stays one label."""
    if not labels:
        return "-"
    return ",".join(f"{k}={_label_value(v)}" for k, v in sorted(labels.items()))


def _label_value(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ', "') else value


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def eprint(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``, ``0 layers`` (``many``: an irregular plural, e.g. ``indexes``)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def profile_lines(profile: Profile) -> list[str]:
    """``pull --profile``: one line per stage — total seconds (summed over blobs and layers, which overlap),
    how many, bytes and rate — under the wall time."""
    lines = [f"profile: {profile.wall():.3f} s wall; stages overlap (downloads, applies on several cores), each "
             "total is summed over blobs/layers"]
    for stage, total in profile.totals().items():
        rate = f", {human_size(int(total.bytes / total.seconds))}/s" if total.bytes and total.seconds > 0 else ""
        size = f", {human_size(total.bytes)}" if total.bytes else ""
        lines.append(f"  {stage:<8} {total.seconds:8.3f} s  ({total.count}x{size}{rate})")
    return lines


def profile_json(profile: Profile) -> dict[str, Any]:
    return {"wall_seconds": round(profile.wall(), 6),
            "stages": {stage: {"seconds": round(t.seconds, 6), "count": t.count, "bytes": t.bytes}
                       for stage, t in profile.totals().items()}}


def show_runtime(doc: Mapping[str, Any]) -> None:
    """A config's platform, created time and runtime settings (``services.inspect.config_json``), one per line
    (for humans)."""
    rest = dict(doc)
    click.echo(f"platform:  {rest.pop('platform')}")
    click.echo(f"created:   {rest.pop('created') or '-'}")
    for key, value in rest.items():
        click.echo(f"{_label(key):<10} {_render(value)}")


def _label(key: str) -> str:
    return {"WorkingDir": "workdir", "ExposedPorts": "ports"}.get(key, key.lower()) + ":"


def _render(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return json.dumps(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" if v not in ({}, None) else str(k) for k, v in sorted(value.items()))
    return str(value)
