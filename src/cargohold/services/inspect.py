"""Look at an image on its registry without pulling it, as ``skopeo inspect`` and ``crane`` do: the digest a
reference resolves to, the manifest or index (exact bytes), the config of the chosen platform, and a
repository's tags.

Needs: a resolver and an event sink (no ``Store``: nothing is written anywhere; every document is read into
memory, size-capped and digest-checked).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cargohold.errors import CargoholdError, DigestMismatchError, FailedPreconditionError, InvalidArgumentError
from cargohold.events import Event, EventSink
from cargohold.oci import kinds
from cargohold.oci import mediatypes as mt
from cargohold.oci.config import ImageConfig
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.kinds import Kind
from cargohold.oci.manifest import Index, Manifest, parse_manifest_or_index
from cargohold.oci.platform import Platform, PlatformMatcher, default_matcher
from cargohold.oci.reference import Reference
from cargohold.remotes.errors import registry_error
from cargohold.remotes.hosts import RegistryHost
from cargohold.remotes.http import discard_response
from cargohold.remotes.resolver import Fetcher, Resolver

# Configs are small JSON documents; a bigger "config" is someone's mistake or an attack on our memory.
MAX_CONFIG_SIZE = 16 << 20
# Tags asked for per page when the caller does not say (the registry may send fewer and a Link to the rest).
DEFAULT_PAGE_SIZE = 100
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')

# The config fields ``inspect`` shows, in the order it shows them (docker's capitalised keys).
RUNTIME_FIELDS = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "ExposedPorts", "Volumes", "Labels",
                  "StopSignal")


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteImage:
    """What a reference names on its registry.

    ``target`` and ``raw`` are the resolved manifest or index and its exact bytes. For an index,
    ``entries`` are its manifests; ``manifest``/``config`` belong to the entry the platform chose (None
    when no runnable entry matches, or the target is an artifact whose config is no image config).
    """

    name: str
    target: Descriptor
    raw: bytes
    entries: tuple[Descriptor, ...] = ()
    manifest_descriptor: Descriptor | None = None
    manifest: Manifest | None = None
    config: ImageConfig | None = None
    config_raw: bytes = b""

    @property
    def is_index(self) -> bool:
        return mt.is_index(self.target.media_type)

    def to_json(self) -> dict[str, Any]:
        """The ``--output json`` document: everything, config runtime settings included."""
        out: dict[str, Any] = {
            "name": self.name,
            "digest": str(self.target.digest),
            "media_type": self.target.media_type,
            "size": self.target.size,
        }
        if self.is_index:
            out["manifests"] = [entry_json(d) for d in self.entries]
        if self.manifest is not None and self.manifest_descriptor is not None:
            out["manifest"] = {
                "digest": str(self.manifest_descriptor.digest),
                "media_type": self.manifest.media_type,
                "config": self.manifest.config.to_dict(),
                "layers": [layer.to_dict() for layer in self.manifest.layers],
                "size": image_size(self.manifest, self.manifest_descriptor),
            }
            if self.manifest.annotations:
                out["manifest"]["annotations"] = dict(self.manifest.annotations)
        if self.config is not None:
            out["config"] = config_json(self.config)
        return out


def entry_json(desc: Descriptor) -> dict[str, Any]:
    """One index entry: digest, media type, size, kind and platform (attestations say what they attest)."""
    kind = kinds.classify(desc)
    out: dict[str, Any] = {"digest": str(desc.digest), "media_type": desc.media_type, "size": desc.size,
                           "kind": kind.value}
    if desc.platform is not None:
        out["platform"] = str(desc.platform)
    if kind is Kind.ATTESTATION:
        out["attests"] = kinds.attests(desc)
    return out


def config_json(config: ImageConfig) -> dict[str, Any]:
    """The config's platform, creation time and runtime settings (entrypoint, cmd, env, workdir, user,
    labels, ...): only the fields the image sets."""
    out: dict[str, Any] = {"platform": str(config.platform), "created": config.created or None}
    for key in RUNTIME_FIELDS:
        value = config.config.get(key)
        if value not in (None, "", [], {}):
            out[key] = value
    return out


def image_size(manifest: Manifest, desc: Descriptor) -> int:
    """Bytes to fetch for one platform: manifest, config and (compressed) layers."""
    return desc.size + manifest.config.size + sum(layer.size for layer in manifest.layers)


def _read(fetcher: Fetcher, desc: Descriptor, what: str, limit: int) -> bytes:
    """``desc``'s bytes, read into memory (never into the store), capped at ``limit`` and digest-checked."""
    if desc.size > limit:
        raise InvalidArgumentError(f"{what}: {desc.size} bytes is over the {limit >> 20} MiB limit")
    chunks: list[bytes] = []
    total = 0
    with fetcher.fetch(desc) as stream:
        for chunk in stream:
            total += len(chunk)
            if total > limit or total > desc.size > 0:
                raise InvalidArgumentError(f"{what}: more bytes than its descriptor's {desc.size}")
            chunks.append(chunk)
    data = b"".join(chunks)
    actual = Digest.from_bytes(data, desc.digest.algorithm)
    if actual != desc.digest:
        raise DigestMismatchError(desc.digest, actual, what=what)
    return data


def resolve_digest(resolver: Resolver, ref: str, *, on_event: EventSink) -> tuple[str, Descriptor]:
    """The normalised reference and the descriptor of the manifest or index it names on the registry."""
    reference = Reference.parse(ref)
    on_event(Event(action="resolve", status="running", item=str(reference)))
    name, target = resolver.resolve(reference)
    on_event(Event(action="resolve", status="done", item=str(reference), message=str(target.digest)))
    return name, target


def inspect_remote(resolver: Resolver, ref: str, *, platforms: Sequence[Platform | str] = (),
                   on_event: EventSink) -> RemoteImage:
    """Resolve ``ref`` and read its manifest or index; for an index, also the manifest and config of the
    best entry for ``platforms`` (default: the host's platform). Nothing is stored."""
    name, target = resolve_digest(resolver, ref, on_event=on_event)
    reference = Reference.parse(name)
    fetcher = resolver.fetcher(reference)
    raw = _read(fetcher, target, f"{reference.name}@{target.digest}", resolver.max_manifest_size)
    doc = parse_manifest_or_index(raw, target.media_type, where=f"{name} ({target.digest})")
    if isinstance(doc, Manifest):
        config, config_raw = _config(fetcher, doc, reference)
        return RemoteImage(name=name, target=target, raw=raw, manifest_descriptor=target, manifest=doc,
                           config=config, config_raw=config_raw)
    chosen = _choose(doc, platforms)
    if chosen is None:
        return RemoteImage(name=name, target=target, raw=raw, entries=doc.manifests)
    what = f"{reference.name}@{chosen.digest}"
    manifest = Manifest.parse(_read(fetcher, chosen, what, resolver.max_manifest_size), chosen.media_type,
                              where=what)
    config, config_raw = _config(fetcher, manifest, reference)
    return RemoteImage(name=name, target=target, raw=raw, entries=doc.manifests, manifest_descriptor=chosen,
                       manifest=manifest, config=config, config_raw=config_raw)


def _choose(index: Index, platforms: Sequence[Platform | str]) -> Descriptor | None:
    matcher = (PlatformMatcher([p if isinstance(p, Platform) else Platform.parse(p) for p in platforms])
               if platforms else default_matcher())
    runnable = [d for d in index.manifests if kinds.classify(d) is Kind.IMAGE]
    best = matcher.best(d.platform for d in runnable)
    return None if best is None else runnable[best]


def _config(fetcher: Fetcher, manifest: Manifest, reference: Reference) -> tuple[ImageConfig | None, bytes]:
    if not mt.is_config(manifest.config.media_type):
        return None, b""  # an artifact: its config is not an image config
    what = f"config {reference.name}@{manifest.config.digest}"
    raw = _read(fetcher, manifest.config, what, MAX_CONFIG_SIZE)
    return ImageConfig.parse(raw, where=what), raw


def list_tags(resolver: Resolver, repo: str, *, page_size: int | None = None, on_event: EventSink
              ) -> list[str]:
    """Every tag of the repository ``repo`` (``host/path``; a tag or digest in it is ignored), following
    the registry's ``Link`` pagination; ``page_size`` is the ``n`` asked for per page."""
    if page_size is not None and page_size < 1:
        raise InvalidArgumentError(f"page size {page_size}: must be at least 1")
    reference = Reference.parse(repo)
    hosts = [h for h in resolver.hosts(reference.domain) if h.can("resolve")]
    if not hosts:
        raise FailedPreconditionError(f"{reference.name}: no host for {reference.domain} has the resolve "
                                      "capability")
    last: CargoholdError | None = None
    for host in hosts:
        try:
            return _tags_on(resolver, host, reference, page_size or DEFAULT_PAGE_SIZE, on_event)
        except CargoholdError as exc:
            resolver.emit_host_event("error", host, f"tags {reference.name}: {exc}")
            last = exc
    assert last is not None
    raise last


def _tags_on(resolver: Resolver, host: RegistryHost, reference: Reference, page_size: int, on_event: EventSink
             ) -> list[str]:
    tags: list[str] = []
    suffix: str | None = f"{reference.path}/tags/list?n={page_size}"
    seen: set[str] = set()
    while suffix is not None:
        if suffix in seen:  # a registry that links a page to itself must not loop us forever
            raise InvalidArgumentError(f"{host.host}: tags of {reference.name}: pagination loops at {suffix}")
        seen.add(suffix)
        resp = resolver.request(host, "GET", suffix, repository=reference.path)
        try:
            body = resp.data
        finally:
            discard_response(resp)
        if resp.status != 200:
            raise registry_error(host.host, resp.status, body, what=f"tags of {reference.name}",
                                 repository=reference.path)
        try:
            page = json.loads(body)
        except ValueError:
            raise InvalidArgumentError(f"{host.host}: tags of {reference.name}: answer is not JSON") from None
        page_tags = page.get("tags") if isinstance(page, dict) else None
        if page_tags is not None and not (isinstance(page_tags, list)
                                          and all(isinstance(t, str) for t in page_tags)):
            raise InvalidArgumentError(f"{host.host}: tags of {reference.name}: 'tags' is not a list of names")
        tags.extend(page_tags or [])
        on_event(Event(action="tags", status="running", item=reference.name, current=len(tags)))
        suffix = _next_suffix(resp.headers.get("Link"), host.path)
    on_event(Event(action="tags", status="done", item=reference.name, current=len(tags)))
    return tags


def _next_suffix(link: str | None, base_path: str) -> str | None:
    """The next page's path below the host's API root (``/v2``), from a ``Link: <...>; rel="next"``."""
    if not link:
        return None
    found = _LINK_NEXT.search(link)
    if found is None:
        return None
    parts = urlsplit(found.group(1))
    path = parts.path
    root = base_path.rstrip("/")
    if root and path.startswith(root + "/"):
        path = path[len(root) + 1:]
    return path.lstrip("/") + (f"?{parts.query}" if parts.query else "")
