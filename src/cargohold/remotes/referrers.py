"""Referrers (OCI distribution spec 1.1): list the manifests whose ``subject`` is a digest, and keep the
referrers tag schema's fallback tag up to date when pushing one to a registry without the referrers API.

Listing asks ``GET /v2/<name>/referrers/<digest>[?artifactType=…]`` (an OCI index, paginated with ``Link``
headers; the ``artifactType`` filter is applied here when the registry's ``OCI-Filters-Applied`` does not say
it did). A registry without the API (docker-registry 2.8 answers 404 ``404 page not found``) is read through
the fallback tag ``<alg>-<hex>`` of the digest, whose manifest is an OCI index of the referrers.

>>> referrers = list_referrers(resolver, Reference.parse("127.0.0.1:5000/app:v1"), digest)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

from cargohold.errors import CargoholdError, FailedPreconditionError, InvalidArgumentError
from cargohold.oci import mediatypes as mt
from cargohold.oci.artifact import parse_referrers, referrer_descriptor, referrers_index, referrers_tag
from cargohold.oci.descriptor import Descriptor
from cargohold.oci.digest import Digest
from cargohold.oci.manifest import MAX_MANIFEST_SIZE, Index, Manifest, parse_manifest_or_index
from cargohold.oci.reference import Reference
from cargohold.remotes.auth import pull_scope
from cargohold.remotes.errors import registry_error
from cargohold.remotes.hosts import RegistryHost
from cargohold.remotes.http import Response
from cargohold.remotes.push import Pusher
from cargohold.remotes.resolver import Resolver

log = logging.getLogger(__name__)

MAX_PAGES = 1000
"""Pages of one referrers listing followed at most (a registry whose ``Link`` never ends is an error)."""

# Answers to the referrers URL that mean "this registry has no referrers API": no such route (404, what
# docker-registry 2.8 says), method or request not understood (400, 405), not implemented (501).
_UNSUPPORTED = frozenset({400, 404, 405, 501})

_LINK_RE = re.compile(r'<([^>]*)>\s*((?:;\s*[^;,]*)*)')


# -- parsing (pure: bytes and headers in, descriptors out) -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReferrersPage:
    """One answer of the referrers API: its entries (already filtered by artifact type when asked) and the
    absolute URL of the next page ("" on the last)."""

    entries: tuple[Descriptor, ...]
    next_url: str = ""


def next_link(headers: Mapping[str, str], url: str) -> str:
    """The absolute URL of a ``Link: <…>; rel="next"`` header (relative links resolve against ``url``), or ""."""
    value = headers.get("Link") or ""
    for match in _LINK_RE.finditer(value):
        params = [p.strip() for p in match.group(2).split(";") if p.strip()]
        for param in params:
            key, _, val = param.partition("=")
            if key.strip().lower() == "rel" and "next" in val.strip().strip('"').split():
                return str(urljoin(url, match.group(1).strip()))
    return ""


def filters_applied(headers: Mapping[str, str]) -> frozenset[str]:
    """The filters the registry says it applied (``OCI-Filters-Applied: artifactType``)."""
    value = headers.get("OCI-Filters-Applied") or ""
    return frozenset(f.strip() for f in value.split(",") if f.strip())


def filter_by_type(entries: Sequence[Descriptor], artifact_type: str | None) -> list[Descriptor]:
    """The entries of ``artifact_type`` (all of them when None)."""
    if not artifact_type:
        return list(entries)
    return [d for d in entries if d.artifact_type == artifact_type]


def parse_page(raw: bytes, headers: Mapping[str, str], url: str, artifact_type: str | None) -> ReferrersPage:
    """One referrers API answer (status 200) as a page; filtered here unless the registry did it."""
    if len(raw) > MAX_MANIFEST_SIZE:
        raise InvalidArgumentError(f"referrers {url}: {len(raw)} bytes is over the {MAX_MANIFEST_SIZE}-byte limit")
    entries = parse_referrers(raw, f"referrers {url}")
    if artifact_type and "artifactType" not in filters_applied(headers):
        entries = filter_by_type(entries, artifact_type)
    return ReferrersPage(entries=tuple(entries), next_url=next_link(headers, url))


def collect_pages(first_url: str, get_page: Callable[[str], ReferrersPage]) -> list[Descriptor]:
    """Follow ``next_url`` from ``first_url`` until the last page; entries in order, each digest once.
    Pages stay on the first page's scheme and host: credentials are never sent where a ``Link`` points."""
    out: dict[Digest, Descriptor] = {}
    url = first_url
    origin = urlsplit(first_url)[:2]
    visited: set[str] = set()
    while url:
        if url in visited or len(visited) >= MAX_PAGES:
            raise InvalidArgumentError(f"referrers {first_url}: pagination does not end (at {url})")
        if urlsplit(url)[:2] != origin:
            raise InvalidArgumentError(f"referrers {first_url}: next page {url} is on another host")
        visited.add(url)
        page = get_page(url)
        for desc in page.entries:
            out.setdefault(desc.digest, desc)
        url = page.next_url
    return list(out.values())


# -- listing -----------------------------------------------------------------------------------------------


def list_referrers(resolver: Resolver, ref: Reference, digest: Digest, *, artifact_type: str | None = None
                   ) -> list[Descriptor]:
    """The referrers of ``digest`` in ``ref``'s repository (of ``artifact_type`` when given): from the
    referrers API, else from the fallback tag (no tag: none). Pull-capable hosts are asked in order, and the
    first that lists any wins: a mirror that lacks the fallback tag cannot tell "none" from "not mirrored".
    An empty list when every host answered so; else the last error when none answered."""
    hosts = [h for h in resolver.hosts(ref.domain) if h.can("pull")]
    if not hosts:
        raise FailedPreconditionError(f"{ref}: no host for {ref.domain} has the pull capability")
    last: CargoholdError | None = None
    answered = False
    for host in hosts:
        try:
            found = _list_on(resolver, host, ref, digest, artifact_type)
        except CargoholdError as exc:
            log.info("referrers of %s on %s failed: %s", digest, host.describe(), exc)
            last = exc
            continue
        if found:
            return found
        answered = True
    if answered or last is None:
        return []
    raise last


def _list_on(resolver: Resolver, host: RegistryHost, ref: Reference, digest: Digest, artifact_type: str | None
             ) -> list[Descriptor]:
    repo = ref.path
    what = f"{ref.domain}/{repo}@{digest}"

    def get(url: str, accept: str) -> Response:
        def do(auth: Mapping[str, str]) -> Response:
            return resolver.transport.request("GET", url, host=host, headers={"Accept": accept, **auth})

        return resolver.authorizer.send(host, [pull_scope(repo, "pull")], do, repository=repo)

    query = f"?{urlencode({'artifactType': artifact_type})}" if artifact_type else ""
    first = host.url(f"{repo}/referrers/{digest}{query}")
    resp = get(first, mt.OCI_INDEX)
    if resp.status in _UNSUPPORTED:
        log.info("%s: no referrers API (%s); reading the fallback tag", what, resp.status)
        return _from_tag(get, host, repo, digest, artifact_type, what)
    if resp.status != 200:
        raise registry_error(host.host, resp.status, resp.data, what=f"referrers of {what}", repository=repo)
    answers = {first: resp}  # the first page is in hand already

    def page(url: str) -> ReferrersPage:
        answer = answers.pop(url, None)
        if answer is None:
            answer = get(url, mt.OCI_INDEX)
        if answer.status != 200:
            raise registry_error(host.host, answer.status, answer.data, what=f"referrers of {what}",
                                 repository=repo)
        return parse_page(bytes(answer.data), answer.headers, url, artifact_type)

    return collect_pages(first, page)


def _from_tag(get: Callable[[str, str], Response], host: RegistryHost, repo: str, digest: Digest,
              artifact_type: str | None, what: str) -> list[Descriptor]:
    tag = referrers_tag(digest)
    # Accept every manifest type: registries answer 404 to a GET whose Accept excludes what the tag holds,
    # and a tag holding something else must be an error, not "no referrers".
    resp = get(host.url(f"{repo}/manifests/{tag}"), mt.MANIFEST_ACCEPT)
    if resp.status == 404:
        return []
    if resp.status != 200:
        raise registry_error(host.host, resp.status, resp.data, what=f"{host.host}/{repo}:{tag}", repository=repo)
    raw = bytes(resp.data)
    if len(raw) > MAX_MANIFEST_SIZE:
        raise InvalidArgumentError(f"{host.host}/{repo}:{tag}: {len(raw)} bytes is over the manifest limit")
    return filter_by_type(parse_referrers(raw, f"referrers tag {host.host}/{repo}:{tag} of {what}"), artifact_type)


# -- pushing a manifest with a subject -----------------------------------------------------------------------

_tag_locks: dict[tuple[str, str], threading.Lock] = {}
_tag_locks_guard = threading.Lock()


def _tag_lock(pusher: Pusher, tag: str) -> threading.Lock:
    with _tag_locks_guard:
        return _tag_locks.setdefault((pusher.name, tag), threading.Lock())


def subject_of(desc: Descriptor, raw: bytes) -> tuple[Descriptor, Manifest | Index] | None:
    """The ``subject`` of a manifest or index and the parsed document, None when it has none."""
    if not (mt.is_manifest(desc.media_type) or mt.is_index(desc.media_type)):
        return None
    doc = parse_manifest_or_index(raw, desc.media_type, where=desc.describe())
    return (doc.subject, doc) if doc.subject is not None else None


def add_to_fallback_tag(pusher: Pusher, desc: Descriptor, doc: Manifest | Index, subject: Descriptor) -> bool:
    """List ``desc`` (its document ``doc``) in the fallback tag index of ``subject``: GET the index at
    ``<alg>-<hex>`` (404: none yet), add the entry unless its digest is listed, PUT it back. True when the
    tag changed. Pushes of this process to one tag take turns; another client writing the same tag at the
    same moment can still lose an entry (the tag schema has no atomic update)."""
    tag = referrers_tag(subject.digest)
    entry = referrer_descriptor(desc, doc)
    with _tag_lock(pusher, tag):
        # Every manifest type accepted (see _from_tag): a tag holding no OCI index fails here, before the PUT.
        found = pusher.get_manifest(tag)
        entries: list[Descriptor] = []
        if found is not None:
            _, raw = found
            entries = parse_referrers(raw, f"referrers tag {pusher.name}:{tag}")
        if any(e.digest == desc.digest for e in entries):
            return False
        body = referrers_index([*entries, entry])
        index = Descriptor(media_type=mt.OCI_INDEX, digest=Digest.from_bytes(body), size=len(body))
        pusher.push_manifest(index, body, tag=tag)
        log.info("%s: listed %s in referrers tag %s", pusher.name, desc.digest, tag)
        return True


def after_manifest_push(pusher: Pusher, desc: Descriptor, raw: bytes, oci_subject: str) -> bool:
    """What follows the PUT of a manifest: when it has a ``subject`` and the registry did not answer with
    ``OCI-Subject`` (no referrers API), keep the fallback tag. True when the tag changed."""
    found = subject_of(desc, raw)
    if found is None or oci_subject:
        return False
    subject, doc = found
    return add_to_fallback_tag(pusher, desc, doc, subject)
