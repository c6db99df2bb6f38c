"""Test helpers that run real servers on loopback: a token issuer and a fault-injecting proxy, and the
handles the auth-registry fixtures of ``conftest.py`` return."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cargohold.devtools.registry import RegistryProcess
from support.token_issuer import TokenIssuer


@dataclass(frozen=True)
class BasicAuthRegistry:
    registry: RegistryProcess
    user: str
    password: str

    @property
    def auth_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class TokenRegistry:
    registry: RegistryProcess
    issuer: TokenIssuer
    user: str
    password: str

    def auth_header(self, repo: str, actions: str = "pull,push") -> str:
        """A bearer header for seeding ``repo`` directly (push needs more than anonymous pull)."""
        token = self.issuer.make_token(self.user, [f"repository:{repo}:{actions}"], anonymous=False)
        return "Bearer " + token
