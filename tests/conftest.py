"""Shared fixtures: real docker-registry processes on loopback (anonymous, htpasswd, token), a token issuer
and a fault-injecting proxy. A registry starts in ~20 ms, so each test gets fresh ones."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# ``support`` (tests/support) and ``tests.*`` helpers are imported by test modules; make both work however
# pytest was started.
_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS), str(_TESTS.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from cargohold.devtools.registry import (  # noqa: E402
    RegistryProcess,
    find_registry_binary,
    make_htpasswd,
    start_registry,
)
from cargohold.errors import NotFoundError  # noqa: E402
from support import BasicAuthRegistry, TokenRegistry  # noqa: E402
from support.faultproxy import FaultProxy  # noqa: E402
from support.token_issuer import TokenIssuer  # noqa: E402

# In CI (``.ci/run`` sets CARGOHOLD_CI=1) every capability the suite needs is installed by ``make test``, so a
# test that skips hides a missing requirement: it is reported as a failure instead.
STRICT_SKIPS = os.environ.get("CARGOHOLD_CI", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where make test installs every requirement: {reason}"


def _require_registry() -> None:
    try:
        find_registry_binary()
    except NotFoundError as exc:
        pytest.skip(f"needs docker-registry: {exc}")


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """An anonymous docker-registry on a free 127.0.0.1 port with its own storage directory."""
    _require_registry()
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture
def make_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RegistryProcess]]:
    """``make_registry(htpasswd=..., token=...)``: more registries, all stopped after the test."""
    _require_registry()
    started: list[RegistryProcess] = []

    def make(**kwargs: object) -> RegistryProcess:
        reg = start_registry(tmp_path_factory.mktemp("registry"), **kwargs)  # type: ignore[arg-type]
        started.append(reg)
        return reg

    yield make
    for reg in started:
        reg.stop()


@pytest.fixture
def basic_registry(make_registry: Callable[..., RegistryProcess], tmp_path: Path) -> BasicAuthRegistry:
    """A registry behind htpasswd Basic auth with one user (``alice`` / ``s3cret-pw``)."""
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "alice", "s3cret-pw")
    return BasicAuthRegistry(registry=make_registry(htpasswd=htpasswd), user="alice", password="s3cret-pw")


@pytest.fixture
def make_token_registry(
    make_registry: Callable[..., RegistryProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., TokenRegistry]]:
    """``make_token_registry(allow_anonymous=True)``: a registry trusting a token issuer on loopback; user
    ``bob`` / ``t0ken-pw`` may pull and push, anonymous callers may pull when allowed."""
    issuers: list[TokenIssuer] = []

    def make(*, allow_anonymous: bool = True, expires_in: int = 300) -> TokenRegistry:
        issuer = TokenIssuer(
            tmp_path_factory.mktemp("token"),
            users={"bob": "t0ken-pw"},
            allow_anonymous=allow_anonymous,
            expires_in=expires_in,
        ).start()
        issuers.append(issuer)
        reg = make_registry(token=issuer.token_auth())
        return TokenRegistry(registry=reg, issuer=issuer, user="bob", password="t0ken-pw")

    yield make
    for issuer in issuers:
        issuer.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[RegistryProcess], FaultProxy]]:
    """``fault_proxy(registry)``: a FaultProxy in front of the registry, stopped after the test."""
    proxies: list[FaultProxy] = []

    def make(reg: RegistryProcess) -> FaultProxy:
        proxy = FaultProxy(reg.host).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
