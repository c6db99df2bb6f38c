"""A small Docker token server on loopback for the tests (registry ``auth: token``).

``GET /token?service=…&scope=…`` (Basic credentials optional) and ``POST /token`` (OAuth2 ``password`` and
``refresh_token`` grants) answer RS256 JWTs signed by a key whose self-signed certificate is the registry's
``rootcertbundle``; the certificate travels in the JWT header's ``x5c``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from cargohold.devtools.registry import TokenAuth


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenRequest:
    """What the issuer was asked: method, user (None when anonymous), service and scopes."""

    method: str
    user: str | None
    service: str
    scopes: list[str]
    grant_type: str = ""


@dataclass
class TokenIssuer:
    """Issues tokens for ``users`` (name -> password); anonymous callers get ``anonymous_actions`` only.

    With ``allow_anonymous=False`` a request without valid credentials is answered 401.
    """

    workdir: Path
    users: dict[str, str] = field(default_factory=dict)
    allow_anonymous: bool = True
    anonymous_actions: tuple[str, ...] = ("pull",)
    service: str = "cargohold-test-registry"
    issuer: str = "cargohold-test-issuer"
    expires_in: int = 300
    requests: list[TokenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cargohold test token issuer")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.workdir / "token-issuer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._refresh_tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> TokenIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
                return

            def do_GET(self) -> None:  # noqa: N802
                issuer._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                issuer._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=lambda: self._server.serve_forever(poll_interval=0.05) if self._server else None,
            name="token-issuer",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "token issuer not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    def token_auth(self) -> TokenAuth:
        """The registry's ``auth: token`` settings for this issuer."""
        return TokenAuth(
            realm=self.realm, service=self.service, issuer=self.issuer, rootcertbundle=self.cert_path
        )

    # -- tokens ----------------------------------------------------------------------------------------------

    def make_token(
        self, subject: str, scopes: list[str], *, anonymous: bool, expires_in: int | None = None
    ) -> str:
        """A signed JWT granting ``scopes`` (anonymous subjects only ``anonymous_actions``)."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if anonymous:
                actions = [a for a in actions if a in self.anonymous_actions]
            if actions:
                access.append({"type": kind, "name": name, "actions": actions})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + (expires_in or self.expires_in),
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def _basic_user(self, handler: BaseHTTPRequestHandler) -> tuple[str | None, bool]:
        """(user, presented): the Basic user when credentials check out; presented tells if any were sent."""
        value = handler.headers.get("Authorization", "")
        if not value.lower().startswith("basic "):
            return None, False
        try:
            user, _, password = base64.b64decode(value[6:]).decode().partition(":")
        except ValueError:
            return None, True
        return (user if self.users.get(user) == password and user else None), True

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        if parts.path != "/token":
            self._reply(handler, 404, {"errors": [{"code": "NOT_FOUND", "message": "no such path"}]})
            return
        refresh = ""
        grant = ""
        if method == "GET":
            query = parse_qs(parts.query)
            user, presented = self._basic_user(handler)
            service = query.get("service", [""])[0]
            scopes = query.get("scope", [])
        else:
            length = int(handler.headers.get("Content-Length", "0") or 0)
            form = parse_qs(handler.rfile.read(length).decode())
            grant = form.get("grant_type", [""])[0]
            service = form.get("service", [""])[0]
            scopes = " ".join(form.get("scope", [])).split()
            presented = True
            user = None
            if grant == "password":
                name, password = form.get("username", [""])[0], form.get("password", [""])[0]
                user = name if name and self.users.get(name) == password else None
            elif grant == "refresh_token":
                with self._lock:
                    user = self._refresh_tokens.get(form.get("refresh_token", [""])[0])
            else:
                self._reply(handler, 400, {"error": "unsupported_grant_type"})
                return
        with self._lock:
            self.requests.append(
                TokenRequest(method=method, user=user, service=service, scopes=list(scopes), grant_type=grant)
            )
        if service != self.service:
            self._reply(
                handler, 400, {"errors": [{"code": "DENIED", "message": f"unknown service {service!r}"}]}
            )
            return
        if user is None and (presented or not self.allow_anonymous):
            handler.send_response(401)
            handler.send_header("WWW-Authenticate", 'Basic realm="cargohold-test-token"')
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body.encode())
            return
        token = self.make_token(user or "", scopes, anonymous=user is None)
        doc: dict[str, Any] = {
            "expires_in": self.expires_in,
            "issued_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if method == "POST":
            doc["access_token"] = token
            if grant == "password" and user is not None:
                refresh = secrets.token_hex(16)
                with self._lock:
                    self._refresh_tokens[refresh] = user
                doc["refresh_token"] = refresh
        else:
            doc["token"] = token
        self._reply(handler, 200, doc)

    def issue_refresh_token(self, user: str) -> str:
        """A refresh (identity) token for ``user``, as ``docker login`` would store it."""
        token = secrets.token_hex(16)
        with self._lock:
            self._refresh_tokens[token] = user
        return token

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
