"""List what refers to an image on its registry (OCI 1.1 referrers), as ``oras discover`` does.

Needs: a resolver and an event sink (no ``Store``: nothing is stored).
"""

from __future__ import annotations

from cargohold.events import Event, EventSink
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.reference import Reference
from cargohold.remotes.referrers import list_referrers
from cargohold.remotes.resolver import Resolver


def referrers(resolver: Resolver, ref: str, artifact_type: str | None = None, *, on_event: EventSink
              ) -> list[Descriptor]:
    """The manifests whose ``subject`` is the manifest ``ref`` names (a tag is resolved to its digest
    first), of ``artifact_type`` when given: each one's media type, digest, size, artifact type and
    annotations. Read from the registry's referrers API, else from the referrers tag schema's fallback
    tag; a manifest nothing refers to has an empty list."""
    reference = Reference.parse(ref)
    digest = reference.digest
    if digest is None:
        on_event(Event(action="resolve", status="running", item=str(reference)))
        _, target = resolver.resolve(reference)
        on_event(Event(action="resolve", status="done", item=str(reference), message=str(target.digest)))
        digest = target.digest
    return list_referrers(resolver, reference, digest, artifact_type=artifact_type)
