"""List what refers to an image on its registry (OCI 1.1 referrers), as ``oras discover`` does."""

from __future__ import annotations

from cargohold.clientbase import ClientBase
from cargohold.events import Event
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.reference import Reference
from cargohold.remotes.referrers import list_referrers


class ReferrersOps(ClientBase):
    """``referrers``."""

    def referrers(self, ref: str, artifact_type: str | None = None) -> list[Descriptor]:
        """The manifests whose ``subject`` is the manifest ``ref`` names (a tag is resolved to its digest
        first), of ``artifact_type`` when given: each one's media type, digest, size, artifact type and
        annotations. Read from the registry's referrers API, else from the referrers tag schema's fallback
        tag; a manifest nothing refers to has an empty list."""
        reference = Reference.parse(ref)
        digest = reference.digest
        if digest is None:
            self.on_event(Event(action="resolve", status="running", item=str(reference)))
            _, target = self.resolver.resolve(reference)
            self.on_event(Event(action="resolve", status="done", item=str(reference), message=str(target.digest)))
            digest = target.digest
        return list_referrers(self.resolver, reference, digest, artifact_type=artifact_type)
