"""`cargohold referrers`: what refers to an image on its registry. Never import ``cargohold.cli.main`` here
(it runs as __main__)."""

from __future__ import annotations

import click

from cargohold.cli.common import State, output_option, pass_state
from cargohold.cli.output import emit_json, human_size, table
from cargohold.oci.descriptor import Descriptor

CREATED = "org.opencontainers.image.created"


def referrer_row(desc: Descriptor) -> list[str]:
    """DIGEST, ARTIFACT TYPE, SIZE, CREATED and the other annotations (``key=value``, sorted)."""
    others = ", ".join(f"{k}={v}" for k, v in sorted(desc.annotations.items()) if k != CREATED)
    return [str(desc.digest), desc.artifact_type or "-", human_size(desc.size),
            desc.annotations.get(CREATED, "-"), others or "-"]


@click.command()
@click.argument("image")
@click.option("--artifact-type", default=None, metavar="TYPE", help="Only referrers of this artifact type.")
@click.option("--user", "-u", metavar="USER[:PASSWORD]", help="Registry credentials (else ~/.docker/config.json).")
@output_option
@pass_state
def referrers(state: State, image: str, artifact_type: str | None, user: str | None, output: str) -> None:
    """List the artifacts (signatures, SBOMs, attestations) that refer to IMAGE on its registry, as
    `oras discover` does. IMAGE is a registry reference; a tag is resolved to its manifest digest first.

    Registries with the OCI 1.1 referrers API are asked through it; others through the referrers tag
    (`sha256-<hex>`) that pushing an artifact with cargohold, oras or cosign keeps up to date. JSON output
    is the list of descriptors (mediaType, digest, size, artifactType, annotations).
    """
    client = state.client(user=user)
    try:
        found = client.referrers(image, artifact_type=artifact_type)
    finally:
        client.close()
    if output == "json":
        emit_json([d.to_dict() for d in found])
        return
    table(["DIGEST", "ARTIFACT TYPE", "SIZE", "CREATED", "ANNOTATIONS"], [referrer_row(d) for d in found])
