"""`cargohold` commands: maintenance. Never import ``cargohold.cli.main`` here (it runs as __main__).

``content active`` / ``content abort`` (downloads in progress or left by a crash), ``content verify`` (rehash,
quarantine what does not match), ``leases ls`` / ``leases rm``.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import click

from cargohold.cli.common import State, output_option, pass_state
from cargohold.cli.output import emit_json, human_size, table
from cargohold.cli.progress import ProgressRenderer
from cargohold.metadata.db import utcnow
from cargohold.services.maintenance import parse_digests


def _age(when: datetime) -> str:
    seconds = max(0, int((utcnow() - when).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


@click.command("active")
@output_option
@pass_state
def content_active(state: State, output: str) -> None:
    """List downloads in progress or left behind by a process that died (abort them with `content abort`,
    or let `gc` remove the dead ones)."""
    client = state.client()
    try:
        ingests = client.active_ingests()
    finally:
        client.close()
    if output == "json":
        emit_json([{"ref": i.ref, "offset": i.offset, "total": i.total,
                    "expected": str(i.expected) if i.expected else None, "started_at": i.started_at,
                    "updated_at": i.updated_at, "age_seconds": int((utcnow() - i.started_at).total_seconds()),
                    "locked": i.holder is not None, "holder": i.holder} for i in ingests])
        return
    table(["REF", "SIZE", "TOTAL", "AGE", "WRITER"],
          [[i.ref, human_size(i.offset), human_size(i.total) if i.total else "-", _age(i.started_at),
            i.holder or "none (dead)"] for i in ingests])


@click.command("abort")
@click.argument("refs", nargs=-1, required=True)
@pass_state
def content_abort(state: State, refs: tuple[str, ...]) -> None:
    """Remove the partial downloads REF… (an error naming the pid while a live writer holds one)."""
    client = state.client()
    try:
        for ref in refs:
            client.abort_ingest(ref)
            click.echo(ref)
    finally:
        client.close()


@click.command("verify")
@click.argument("digests", nargs=-1)
@output_option
@pass_state
def content_verify(state: State, digests: tuple[str, ...], output: str) -> None:
    """Rehash blobs (DIGEST…, or every one) and check their sizes; a bad blob is moved to
    ROOT/content/quarantine (never deleted) so images needing it show it missing. Exit 1 when any was bad."""
    wanted = parse_digests(digests)
    with ProgressRenderer(quiet=output == "json") as progress:
        client = state.client(on_event=progress)
        try:
            result = client.verify(wanted)
        finally:
            client.close()
    if output == "json":
        emit_json({"checked": len(result.checked),
                   "bad": [{"digest": str(b.digest), "reason": b.reason,
                            "quarantined": str(b.quarantined) if b.quarantined else None} for b in result.bad]})
    else:
        click.echo(f"verified {len(result.checked)} blobs: {len(result.bad)} bad")
        for b in result.bad:
            click.echo(f"bad: {b.digest}: {b.reason}; moved to {b.quarantined}")
    if result.bad:
        sys.exit(1)


@click.group()
def leases() -> None:
    """List and remove leases (what running, or crashed, operations hold)."""


@leases.command("ls")
@output_option
@pass_state
def leases_ls(state: State, output: str) -> None:
    """List the namespace's leases: id, the process holding it, resources, created, expires."""
    client = state.client()
    try:
        found = client.leases()
    finally:
        client.close()
    if output == "json":
        doc: list[dict[str, Any]] = [
            {"id": lease.id, "labels": lease.labels, "process": lease.process or None, "alive": lease.alive,
             "created_at": lease.created_at, "expires_at": lease.expires_at, "resources": lease.resources}
            for lease in found]
        emit_json(doc)
        return
    table(["ID", "PROCESS", "RESOURCES", "CREATED", "EXPIRES"],
          [[lease.id, (lease.process.split(":", 1)[0] + ("" if lease.alive else " (dead)")) if lease.process
            else "-", lease.resources, _age(lease.created_at) + " ago",
            lease.expires_at.isoformat() if lease.expires_at else "-"] for lease in found])


@leases.command("rm")
@click.argument("ids", nargs=-1, required=True)
@pass_state
def leases_rm(state: State, ids: tuple[str, ...]) -> None:
    """Remove leases ID… (what they held stays until the next gc)."""
    client = state.client()
    try:
        client.remove_leases(ids)
    finally:
        client.close()
    for lease_id in ids:
        click.echo(lease_id)
