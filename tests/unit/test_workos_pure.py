"""The pure parts of WorkOS support: the role table, webhook signatures and events, the JWKS
cache and session token verification (with a JWKS handed in, no network)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import Config
from gateway.errors import ConfigError
from keystore import roles, workos
from keystore.api.sessions import (
    JwksCache,
    JwksUnavailable,
    SessionError,
    SessionVerifier,
    WorkosSettings,
    usable_keys,
)

ISSUER = "https://api.workos.com/user_management/client_unit"

# --- roles ---------------------------------------------------------------------------------


def test_the_default_roles_follow_the_product_table() -> None:
    table = roles.parse_roles(roles.DEFAULT_ROLES)
    assert table["owner"] == table["admin"] == ("*",)
    assert table["developer"] == table["member"] == ("ssh-key:read", "ssh-key:write:own")
    assert table["viewer"] == ("ssh-key:read",)


@pytest.mark.parametrize(
    "entries",
    [
        ["owner"],  # no '='
        ["Owner Admin=*"],
        ["owner=*", "owner=ssh-key:read"],
        ["dev=ssh-key:delete"],
        ["dev=billing:read"],
    ],
)
def test_a_bad_role_table_is_refused_naming_the_entry(entries: list[str]) -> None:
    with pytest.raises(ValueError):
        roles.parse_roles(entries)


def test_a_role_may_grant_nothing() -> None:
    assert roles.parse_roles(["guest="]) == {"guest": ()}


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"role": "admin"}, ("*",)),
        ({"role": "Developer"}, ("ssh-key:read", "ssh-key:write:own")),
        ({"roles": ["viewer", "member"]}, ("ssh-key:read", "ssh-key:write:own")),
        (
            {"role": "viewer", "permissions": ["ssh-key:write", "widgets:read"]},
            ("ssh-key:read", "ssh-key:write"),
        ),
        ({"permissions": ["audit:read"]}, ("audit:read",)),
        ({"role": "intern"}, ()),
        ({}, ()),
        ({"role": 7, "roles": "viewer", "permissions": "api-key:*"}, ("api-key:*", "ssh-key:read")),
        ({"roles": [None, 3, "owner"]}, ("*",)),
    ],
)
def test_permissions_come_from_roles_and_the_permissions_claim(
    claims: dict[str, Any], expected: tuple[str, ...]
) -> None:
    table = roles.parse_roles(roles.DEFAULT_ROLES)
    assert roles.permissions_for(claims, table) == expected


def test_own_only_is_write_on_ssh_keys_without_the_full_scope() -> None:
    member = ("ssh-key:read", "ssh-key:write:own")
    assert roles.own_only(member, "ssh-key:write")
    assert not roles.allows(member, "ssh-key:write")
    assert roles.allows(member, "ssh-key:read")
    assert not roles.own_only(member, "api-key:write")
    assert not roles.own_only(("*", "ssh-key:write:own"), "ssh-key:write")


# --- webhook signatures ----------------------------------------------------------------------

SECRET = "whsec_unit"
BODY = b'{"id":"event_1","event":"organization.deleted","data":{"id":"org_1"}}'


def _header(t_ms: int, body: bytes = BODY, secret: str = SECRET) -> str:
    digest = hmac.new(secret.encode(), f"{t_ms}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t_ms}, v1={digest}"


def test_a_delivery_signed_as_workos_signs_is_accepted() -> None:
    now = time.time()
    workos.verify_signature(_header(int(now * 1000)), BODY, SECRET, now=now)
    assert workos.sign(BODY, SECRET, 1234) == _header(1234)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_signature"),
        ("", "missing_signature"),
        ("v1=abc", "malformed_signature"),
        ("t=abc, v1=abc", "malformed_signature"),
        ("t=123", "malformed_signature"),
        ("garbage", "malformed_signature"),
        ("t=1, v1=" + "0" * 64 + "," * 2000, "malformed_signature"),
    ],
)
def test_malformed_signature_headers_are_refused(header: str | None, code: str) -> None:
    with pytest.raises(workos.InvalidSignature) as info:
        workos.verify_signature(header, BODY, SECRET, now=time.time())
    assert info.value.code == code


def test_a_wrong_secret_a_changed_body_or_a_stale_timestamp_is_refused() -> None:
    now = time.time()
    t = int(now * 1000)
    for header, body in [
        (_header(t, secret="other"), BODY),
        (_header(t), BODY + b" "),
        (_header(t).replace("v1=", "v1=0"), BODY),
    ]:
        with pytest.raises(workos.InvalidSignature) as info:
            workos.verify_signature(header, body, SECRET, now=now)
        assert info.value.code == "invalid_signature"
    for skew in (-181.0, 181.0):
        with pytest.raises(workos.InvalidSignature) as info:
            workos.verify_signature(_header(int((now + skew) * 1000)), BODY, SECRET, now=now)
        assert info.value.code == "stale_signature"
    workos.verify_signature(_header(int((now - 179) * 1000)), BODY, SECRET, now=now)


def test_any_matching_v1_is_enough_for_a_rotated_secret() -> None:
    now = time.time()
    t = int(now * 1000)
    good = _header(t).split("v1=")[1]
    workos.verify_signature(f"t={t}, v1={'0' * 64}, v1={good}", BODY, SECRET, now=now)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"event": "x"}',
        b'{"id": "", "event": "x"}',
        b'{"id": "e1"}',
        b'{"id": "e1", "event": "x", "data": []}',
        b'{"id": 5, "event": "x"}',
    ],
)
def test_bodies_that_are_not_events_are_refused(payload: bytes) -> None:
    with pytest.raises(workos.InvalidEvent):
        workos.parse_event(payload)


def test_an_event_exposes_its_short_text_fields_only() -> None:
    event = workos.parse_event(
        {"id": "e1", "event": "organization_membership.deleted", "data": {"user_id": "u", "x": 1}}
    )
    assert (event.id, event.event, event.text("user_id"), event.text("x")) == (
        "e1",
        "organization_membership.deleted",
        "u",
        None,
    )


# --- JWKS and session tokens -----------------------------------------------------------------


def _rsa_jwk(kid: str) -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    data.update({"kid": kid, "use": "sig"})
    return key, data


@pytest.fixture(scope="module")
def rsa_key() -> tuple[Any, dict[str, Any]]:
    return _rsa_jwk("k1")


class FakeJwks:
    def __init__(self, *entries: dict[str, Any]) -> None:
        self.entries = list(entries)
        self.calls = 0
        self.fail = False

    async def __call__(self, url: str) -> Any:
        self.calls += 1
        if self.fail:
            raise JwksUnavailable("down")
        return {"keys": list(self.entries)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_symmetric_and_unusable_keys_are_left_out_of_the_jwks(rsa_key: Any) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    keys = usable_keys(
        {
            "keys": [
                rsa_key[1],
                {**ec_jwk, "kid": "e1"},
                {"kty": "oct", "k": "c2VjcmV0", "kid": "h1"},
                {**rsa_key[1], "kid": "enc", "use": "enc"},
                {**rsa_key[1], "kid": "hs", "alg": "HS256"},
                {"kty": "RSA", "kid": "broken", "n": "x", "e": "y"},
                {**rsa_key[1], "kid": None},
                "nonsense",
            ]
        }
    )
    assert sorted(keys) == ["e1", "k1"]
    with pytest.raises(JwksUnavailable):
        usable_keys({"nokeys": []})


async def test_the_jwks_is_cached_and_refetched_for_an_unknown_kid_at_most_every_few_seconds(
    rsa_key: Any,
) -> None:
    fetch, clock = FakeJwks(rsa_key[1]), Clock()
    cache = JwksCache("https://x/jwks", fetch=fetch, refetch_min=5.0, max_age=600, clock=clock)
    assert await cache.key("k1") is not None
    assert await cache.key("k1") is not None
    assert fetch.calls == 1
    assert await cache.key("unknown") is None  # within 5 s of the last fetch: no new fetch
    assert fetch.calls == 1
    clock.now += 5.0
    _, other = _rsa_jwk("k2")
    fetch.entries.append(other)
    assert await cache.key("k2") is not None
    assert fetch.calls == 2
    assert await cache.key("k3") is None
    assert fetch.calls == 2
    clock.now += 601  # stale: fetched again on use, and kept when that fails
    fetch.fail = True
    assert await cache.key("k1") is not None
    assert fetch.calls == 3


async def test_concurrent_callers_share_one_fetch(rsa_key: Any) -> None:
    fetch = FakeJwks(rsa_key[1])

    async def slow(url: str) -> Any:
        await asyncio.sleep(0.05)
        return await fetch(url)

    cache = JwksCache("https://x/jwks", fetch=slow)
    found = await asyncio.gather(*(cache.key("k1") for _ in range(20)))
    assert all(found) and fetch.calls == 1


async def test_no_jwks_at_all_is_unavailable_not_invalid() -> None:
    fetch = FakeJwks()
    fetch.fail = True
    cache = JwksCache("https://x/jwks", fetch=fetch)
    with pytest.raises(JwksUnavailable):
        await cache.key("k1")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "user_1", "org_id": "org_1", "iat": now, "exp": now + 300}
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
def verifier(rsa_key: Any) -> SessionVerifier:
    settings = WorkosSettings(jwks_url="https://x/jwks", issuer=ISSUER)
    return SessionVerifier(settings, JwksCache(settings.jwks_url, fetch=FakeJwks(rsa_key[1])))


async def test_a_good_token_names_the_member_and_the_organization(
    verifier: SessionVerifier, rsa_key: Any
) -> None:
    token = jwt.encode(_claims(role="admin"), rsa_key[0], algorithm="RS256", headers={"kid": "k1"})
    claims = await verifier.verify(token)
    assert (claims.user_id, claims.workos_org_id, claims.claims["role"]) == (
        "user_1",
        "org_1",
        "admin",
    )


def _forgeries(rsa_key: Any) -> dict[str, str]:
    private, _ = rsa_key
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    good = jwt.encode(_claims(), private, algorithm="RS256", headers={"kid": "k1"})
    header, body, signature = good.split(".")
    hs_header = _b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    hs_body = _b64(json.dumps(_claims()).encode())
    hs_sig = _b64(hmac.new(pem, f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    return {
        "expired": jwt.encode(
            _claims(iat=now - 900, exp=now - 600), private, algorithm="RS256", headers={"kid": "k1"}
        ),
        "not yet valid": jwt.encode(
            _claims(nbf=now + 600), private, algorithm="RS256", headers={"kid": "k1"}
        ),
        "other issuer": jwt.encode(
            _claims(iss="https://evil.example"), private, algorithm="RS256", headers={"kid": "k1"}
        ),
        "unknown kid": jwt.encode(_claims(), private, algorithm="RS256", headers={"kid": "k9"}),
        "alg none": f"{_b64(json.dumps({'alg': 'none', 'kid': 'k1'}).encode())}.{body}.",
        "HS256 with the public key": f"{hs_header}.{hs_body}.{hs_sig}",
        "tampered payload": ".".join(
            [header, _b64(json.dumps(_claims(sub="user_2")).encode()), signature]
        ),
        "signed by another key": jwt.encode(
            _claims(), other, algorithm="RS256", headers={"kid": "k1"}
        ),
        "no exp": jwt.encode(_claims(exp=None), private, algorithm="RS256", headers={"kid": "k1"}),
        "no sub": jwt.encode(_claims(sub=None), private, algorithm="RS256", headers={"kid": "k1"}),
        "no kid": jwt.encode(_claims(), private, algorithm="RS256"),
        "PS256 header on an RS256 key": jwt.encode(
            _claims(), private, algorithm="PS256", headers={"kid": "k1"}
        ),
        "garbage": "a.b.c",
        "not a jwt": "hello",
    }


async def test_forged_or_unusable_tokens_are_refused(
    verifier: SessionVerifier, rsa_key: Any
) -> None:
    for name, token in _forgeries(rsa_key).items():
        with pytest.raises(SessionError) as info:
            await verifier.verify(token)
        assert info.value.status == 401, name
        assert info.value.code in ("invalid_session_token", "session_expired"), name
        assert token not in str(info.value)


def test_settings_need_both_the_jwks_url_and_the_issuer() -> None:
    with pytest.raises(ValueError):
        WorkosSettings(jwks_url="https://x/jwks")
    with pytest.raises(ValueError):
        WorkosSettings(issuer=ISSUER)
    with pytest.raises(ValueError):
        WorkosSettings(jwks_url="http://api.workos.com/jwks", issuer=ISSUER)
    assert WorkosSettings(jwks_url="http://127.0.0.1:9/jwks", issuer=ISSUER).sessions_enabled
    assert not WorkosSettings().sessions_enabled
    assert not WorkosSettings().webhooks_enabled


# --- the [workos] settings ---------------------------------------------------------------------


def test_the_workos_settings_come_from_the_environment() -> None:
    config = Config.load(
        env={
            "RTGW_WORKOS_JWKS_URL": "https://api.workos.com/sso/jwks/client_1",
            "RTGW_WORKOS_ISSUER": "https://api.workos.com/user_management/client_1",
            "RTGW_WORKOS_WEBHOOK_SECRET": "whsec_1",
            "RTGW_WORKOS_ROLES": "owner=*, admin=*, developer=ssh-key:* audit:read",
        }
    )
    assert config.workos.roles == ("owner=*", "admin=*", "developer=ssh-key:* audit:read")
    assert config.workos.webhook_secret == "whsec_1"
    assert Config.load(env={}).workos.roles == roles.DEFAULT_ROLES


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"RTGW_WORKOS_JWKS_URL": "https://api.workos.com/sso/jwks/c"}, "workos.issuer"),
        ({"RTGW_WORKOS_ISSUER": ISSUER}, "workos.jwks_url"),
        (
            {"RTGW_WORKOS_JWKS_URL": "http://api.workos.com/jwks", "RTGW_WORKOS_ISSUER": ISSUER},
            "workos.jwks_url",
        ),
        ({"RTGW_WORKOS_ROLES": "owner=everything"}, "workos.roles"),
    ],
)
def test_bad_workos_settings_are_refused_at_load(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env=env)
    assert info.value.key == key
