"""A stand-in for WorkOS in tests: a JWKS served over HTTP on 127.0.0.1 with keys the test
generates, session tokens signed with them (and forged ones), and signed webhook deliveries.

The JWKS server is ``http.server`` in a thread of its own, so it serves an in-process API
(async tests) and a gateway subprocess (sync tests) alike; it counts its fetches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keystore import orgs, workos
from keystore.api import ApiServer, serve_api
from keystore.audit_events import AuditEvent
from tests.integration.api.support import MAX_BODY, Api, ApiOrg, Reply, make_org

ISSUER = "https://api.workos.com/user_management/client_test"
WEBHOOK_SECRET = "whsec_test_" + "s3cr3t" * 4


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass
class SigningKey:
    """A private key and its public JWK."""

    kid: str
    private: Any
    alg: str

    @classmethod
    def rsa(cls, kid: str | None = None) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(kid or f"key_{uuid.uuid4().hex[:12]}", key, "RS256")

    @classmethod
    def ec(cls, kid: str | None = None) -> SigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(kid or f"key_{uuid.uuid4().hex[:12]}", key, "ES256")

    def jwk(self) -> dict[str, Any]:
        algorithms = jwt.algorithms
        algorithm = algorithms.RSAAlgorithm if self.alg.startswith("RS") else algorithms.ECAlgorithm
        data: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return data

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


class JwksServer:
    """``GET /jwks`` answers ``{"keys": [...]}`` of :attr:`keys` (change it at will)."""

    def __init__(self, keys: list[SigningKey] | None = None) -> None:
        self.keys: list[SigningKey] = list(keys or [])
        self.extra: list[dict[str, Any]] = []  # raw JWK entries served besides
        self.fetches = 0
        self.status = 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                body = json.dumps({"keys": [k.jwk() for k in server.keys] + server.extra}).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks"

    def start(self) -> JwksServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> JwksServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Issuer:
    """Mints AuthKit-like access tokens."""

    key: SigningKey
    issuer: str = ISSUER
    lifetime: float = 300.0

    def claims(self, user_id: str, org_id: str | None, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user_id,
            "sid": f"session_{uuid.uuid4().hex[:10]}",
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + int(self.lifetime),
        }
        if org_id is not None:
            claims["org_id"] = org_id
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        user_id: str,
        org_id: str | None,
        *,
        key: SigningKey | None = None,
        headers: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        key = key or self.key
        return jwt.encode(
            self.claims(user_id, org_id, **extra),
            key.private,
            algorithm=key.alg,
            headers={"kid": key.kid, **(headers or {})},
        )


def unsigned_token(claims: Mapping[str, Any], kid: str) -> str:
    """``alg: none``."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def hmac_token(claims: Mapping[str, Any], kid: str, secret: bytes) -> str:
    """HS256 with ``secret`` (e.g. the RSA public key's PEM: the classic confusion attack)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(signature)}"


def tampered(token: str, **changes: Any) -> str:
    """``token`` with its payload changed and its signature kept."""
    header, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


def workos_org_id() -> str:
    return f"org_{uuid.uuid4().hex[:26].upper()}"


def user_id() -> str:
    return f"user_{uuid.uuid4().hex[:26].upper()}"


@dataclass
class Delivery:
    """A webhook delivery as WorkOS would send it."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        event: str,
        data: Mapping[str, Any],
        *,
        event_id: str | None = None,
        secret: str = WEBHOOK_SECRET,
        at_ms: int | None = None,
    ) -> Delivery:
        payload = {
            "id": event_id or f"event_{uuid.uuid4().hex[:26].upper()}",
            "event": event,
            "data": dict(data),
            "created_at": "2025-01-01T00:00:00.000Z",
        }
        body = json.dumps(payload).encode()
        return cls(
            body,
            {
                "Content-Type": "application/json",
                workos.SIGNATURE_HEADER: workos.sign(body, secret, at_ms),
            },
        )

    @property
    def event_id(self) -> str:
        return str(json.loads(self.body)["id"])


def membership_deleted(org: str, user: str, **kw: Any) -> Delivery:
    return Delivery.of(
        workos.MEMBERSHIP_DELETED,
        {
            "object": "organization_membership",
            "id": f"om_{uuid.uuid4().hex[:20]}",
            "user_id": user,
            "organization_id": org,
            "status": "inactive",
        },
        **kw,
    )


def organization_deleted(org: str, **kw: Any) -> Delivery:
    return Delivery.of(
        workos.ORGANIZATION_DELETED, {"object": "organization", "id": org, "name": "Acme"}, **kw
    )


async def start_api(
    pool: Any,
    jwks_url: str = "",
    *,
    secret: str = WEBHOOK_SECRET,
    invalid_key_burst: int = 100_000,
    **options: Any,
) -> tuple[ApiServer, Api]:
    """serve_api on loopback with WorkOS sessions (when ``jwks_url``) and webhooks, and a
    client for it (``close_api`` stops both)."""
    events: list[AuditEvent] = []
    workos_options: dict[str, Any] = {"workos_webhook_secret": secret}
    if jwks_url:
        workos_options.update(workos_jwks_url=jwks_url, workos_issuer=ISSUER)
    server = await serve_api(
        pool,
        host="127.0.0.1",
        port=0,
        max_body_bytes=MAX_BODY,
        record_audit=events.append,
        rate_per_second=1000.0,
        rate_burst=1000,
        invalid_key_burst=invalid_key_burst,
        **workos_options,
        **options,
    )
    session = aiohttp.ClientSession()
    return server, Api(f"http://127.0.0.1:{server.port}", session, events)


async def close_api(server: ApiServer, api: Api) -> None:
    await api.session.close()
    await server.close()


@dataclass
class MemberOrg:
    """An organization mapped to a WorkOS organization, with tokens for its members."""

    org: ApiOrg
    workos_id: str
    issuer: Issuer

    @property
    def id(self) -> uuid.UUID:
        return self.org.id

    def token(self, role: str | None = "member", user: str | None = None, **claims: Any) -> str:
        return self.issuer.token(user or user_id(), self.workos_id, role=role, **claims)


async def member_org(pool: Any, issuer: Issuer) -> MemberOrg:
    org = await make_org(pool, "member")
    mapped = workos_org_id()
    await orgs.set_workos_org_id(pool, org.slug, mapped)
    return MemberOrg(org, mapped, issuer)


async def post_webhook(api: Api, delivery: Delivery) -> Reply:
    return await api.call(
        "POST", "/v1/webhooks/workos", data=delivery.body, headers=delivery.headers
    )
