"""Helpers for the key-API tests: organizations with API keys, made straight in the keystore,
and a client for the API under test."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.lab.seed import unique
from keystore import api_keys, orgs
from keystore.audit_events import AuditEvent


def public_line(comment: str = "alice@laptop") -> str:
    """A fresh ed25519 public key line, as in a .pub file."""
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}"


def rsa_public_line(bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} rsa@test"


def private_pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


@dataclass
class ApiOrg:
    """An organization and a way to mint API keys for it."""

    db: Any
    slug: str
    id: uuid.UUID

    async def api_key(
        self,
        scopes: Sequence[str] = ("*",),
        *,
        name: str = "test",
        environment: str = "live",
        expires_in: dt.timedelta | None = None,
    ) -> tuple[str, api_keys.ApiKey]:
        created = await api_keys.create_key(
            self.db,
            org_id=self.id,
            name=name,
            scopes=list(scopes),
            environment=environment,
            expires_in=expires_in,
        )
        return created.secret, created.key


async def make_org(db: Any, prefix: str = "apiorg") -> ApiOrg:
    org = await orgs.create_org(db, unique(prefix))
    return ApiOrg(db=db, slug=org.slug, id=org.id)


MAX_BODY = 65536  # the in-process API's body limit (the api fixture)


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    text: str

    @property
    def body(self) -> Any:
        return json.loads(self.text) if self.text else None

    @property
    def code(self) -> str:
        return str(self.body["error"]["code"])


@dataclass
class Api:
    base: str
    session: aiohttp.ClientSession
    events: list[AuditEvent] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=sent) as resp:
            return Reply(resp.status, resp.headers, await resp.text())
