"""Image references: ``alpine`` -> ``docker.io/library/alpine:latest``, ``host:port/repo:tag@sha256:...``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cargohold.errors import InvalidArgumentError
from cargohold.oci.digest import Digest

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAINS = {"index.docker.io", "registry-1.docker.io"}
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reference:
    """A normalised image reference. ``tag`` and ``digest`` may both be set; the digest wins when fetching."""

    domain: str
    path: str
    tag: str = ""
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalise a reference the way docker and containerd do."""
        raw = text
        if not text or text != text.strip():
            raise InvalidArgumentError(f"invalid reference {raw!r}: empty or surrounded by spaces")
        if "://" in text:
            raise InvalidArgumentError(f"invalid reference {raw!r}: a reference has no scheme")
        digest: Digest | None = None
        if "@" in text:
            text, _, dtext = text.partition("@")
            try:
                digest = Digest.parse(dtext)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"invalid reference {raw!r}: {exc}") from None
        name, tag = text, ""
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            name, tag = text[:colon], text[colon + 1:]
            if not _TAG.match(tag):
                raise InvalidArgumentError(
                    f"invalid reference {raw!r}: tag {tag!r} must be 1-128 of [A-Za-z0-9_.-], not starting "
                    "with . or -"
                )
        first, sep, rest = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            domain, path = first, rest
            if not _DOMAIN.match(domain):
                raise InvalidArgumentError(f"invalid reference {raw!r}: invalid registry host {domain!r}")
        else:
            domain, path = DEFAULT_DOMAIN, name
        if domain in LEGACY_DOMAINS:
            domain = DEFAULT_DOMAIN
        if not path:
            raise InvalidArgumentError(f"invalid reference {raw!r}: missing repository name")
        if any(c.isupper() for c in path):
            raise InvalidArgumentError(f"invalid reference {raw!r}: repository name must be lowercase")
        for comp in path.split("/"):
            if not _COMPONENT.match(comp):
                raise InvalidArgumentError(
                    f"invalid reference {raw!r}: path component {comp!r} must be lowercase letters, digits "
                    "and separators (. _ __ -)"
                )
        if domain == DEFAULT_DOMAIN and "/" not in path:
            path = "library/" + path
        if len(domain) + 1 + len(path) > 255:
            raise InvalidArgumentError(f"invalid reference {raw!r}: name longer than 255 characters")
        if not tag and digest is None:
            tag = DEFAULT_TAG
        return cls(domain=domain, path=path, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """``domain/path``: the repository, without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return str(self.digest) if self.digest is not None else self.tag

    def with_tag(self, tag: str) -> Reference:
        return Reference(domain=self.domain, path=self.path, tag=tag, digest=None)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest is not None:
            text += "@" + str(self.digest)
        return text

    def familiar(self) -> str:
        """The short form docker shows (``alpine:latest`` for ``docker.io/library/alpine:latest``)."""
        text = str(self)
        if self.domain == DEFAULT_DOMAIN:
            text = text[len(DEFAULT_DOMAIN) + 1:]
            if text.startswith("library/"):
                text = text[len("library/"):]
        return text


def normalize_name(name: str) -> str:
    """Image names are stored normalised when they parse as references, verbatim otherwise."""
    try:
        return str(Reference.parse(name))
    except InvalidArgumentError:
        return name
