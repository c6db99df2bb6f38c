"""A Docker schema 1 manifest signed as libtrust signs it (JWS "pretty" signature, ES256), so a registry
with schema 1 compatibility enabled accepts and serves it: test data for the "schema 1 is not supported"
error. Needs the ``cryptography`` package (a test dependency)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from cargohold.oci.digest import Digest


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _key_id(der: bytes) -> str:
    """libtrust's key ID: base32 of the first 240 bits of sha256(SubjectPublicKeyInfo), in groups of 4."""
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


def signed_manifest(name: str, tag: str, layer_digests: Sequence[Digest], *, seed: int = 1) -> bytes:
    """A signed schema 1 manifest of ``name:tag`` whose fsLayers are ``layer_digests`` (top layer first)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    history = []
    for i, _ in enumerate(layer_digests):
        v1: dict[str, Any] = {"id": hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(),
                              "created": "2016-01-01T00:00:00Z"}
        if i + 1 < len(layer_digests):
            v1["parent"] = hashlib.sha256(f"{seed}-{i + 1}".encode()).hexdigest()
        if i == 0:
            v1["architecture"] = "amd64"
            v1["os"] = "linux"
        history.append({"v1Compatibility": json.dumps(v1, separators=(",", ":"))})
    doc = {"schemaVersion": 1, "name": name, "tag": tag, "architecture": "amd64",
           "fsLayers": [{"blobSum": str(d)} for d in layer_digests], "history": history}
    payload = json.dumps(doc, indent=3).encode()
    # The signature goes in before the closing brace; the protected header records where (libtrust format).
    tail_at = payload.rindex(b"}")
    while payload[tail_at - 1:tail_at] in (b"\n", b" "):
        tail_at -= 1
    format_length, format_tail = tail_at, payload[tail_at:]

    key = ec.derive_private_key(seed, ec.SECP256R1())
    public = key.public_key()
    numbers = public.public_numbers()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk = {"crv": "P-256", "kid": _key_id(der), "kty": "EC",
           "x": _b64(numbers.x.to_bytes(32, "big")), "y": _b64(numbers.y.to_bytes(32, "big"))}
    protected = _b64(json.dumps({"formatLength": format_length, "formatTail": _b64(format_tail),
                                 "time": "2016-01-01T00:00:00Z"}, separators=(",", ":")).encode())
    signing_input = f"{protected}.{_b64(payload)}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    signature = {"header": {"jwk": jwk, "alg": "ES256"}, "signature": _b64(r.to_bytes(32, "big") +
                                                                           s.to_bytes(32, "big")),
                 "protected": protected}
    sigs = json.dumps([signature], indent=3).replace("\n", "\n   ").encode()
    return payload[:format_length] + b',\n   "signatures": ' + sigs + format_tail
