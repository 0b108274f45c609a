"""The key API as its users live it: a real HTTP server on loopback over a real PostgreSQL.

Most tests run the API in-process (``serve_api`` on port 0, audit events collected in a list);
the end-to-end stories at the bottom drive the real ``runtools-gateway serve`` subprocess and
the real OpenSSH client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncssh
import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant
from keystore import db as keystore_db
from keystore import keys as keyparse
from keystore import orgs
from keystore.api import ApiServer, serve_api
from keystore.api.app import ROUTES
from tests.integration.api.support import (
    MAX_BODY,
    Api,
    ApiOrg,
    Reply,
    make_org,
    private_pem,
    public_line,
    rsa_public_line,
)
from tests.integration.support import REPO, SshClient


async def register(api: Api, token: str, line: str | None = None, **extra: Any) -> Reply:
    body = {"name": extra.pop("name", "laptop"), "public_key": line or public_line(), **extra}
    return await api.call("POST", "/v1/ssh-keys", token, json_body=body)


# --- authentication ------------------------------------------------------------------------


def _concrete(path: str) -> str:
    return re.sub(r"\{\w+\}", lambda _: str(uuid.uuid4()), path)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_every_route_refuses_a_request_without_an_api_key_with_a_bearer_challenge(
    api: Api, route: Any
) -> None:
    r = await api.call(route.method, _concrete(route.path), json_body={})
    assert r.status == 401
    assert r.code == "missing_api_key"
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="runtools"')


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer    ",
        "Bearer not-a-key",
        "Bearer rt_live_tooShort",
        "Bearer sk_live_" + "a" * 44,
        "Bearer rt_live_" + "a" * 44,  # well formed, unknown
        "Bearer rt_live_" + "é" * 44,
        "bearer rt_live_" + "a" * 300,
    ],
)
async def test_malformed_or_unknown_api_keys_are_refused_with_401(
    api: Api, admin: str, header: str
) -> None:
    r = await api.call("GET", "/v1/ssh-keys", headers={"Authorization": header})
    assert r.status == 401, r.text
    assert r.code == "invalid_api_key"
    assert "error=" in r.headers["WWW-Authenticate"]
    assert admin not in r.text


async def test_a_key_with_a_known_lookup_but_a_wrong_secret_is_refused(
    api: Api, admin: str
) -> None:
    forged = admin[:-4] + ("aaaa" if not admin.endswith("aaaa") else "bbbb")
    r = await api.call("GET", "/v1/ssh-keys", forged)
    assert r.status == 401
    assert r.code == "invalid_api_key"


async def test_a_live_key_presented_as_a_test_key_is_refused(api: Api, admin: str) -> None:
    r = await api.call("GET", "/v1/ssh-keys", admin.replace("rt_live_", "rt_test_", 1))
    assert r.status == 401


async def test_an_expired_api_key_is_refused(api: Api, org: ApiOrg, pool: Any) -> None:
    token, key = await org.api_key(["*"], expires_in=dt.timedelta(hours=1))
    assert (await api.call("GET", "/v1/ssh-keys", token)).status == 200
    await pool.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' "
        "WHERE org_id = $1 AND id = $2",
        org.id,
        key.id,
    )
    r = await api.call("GET", "/v1/ssh-keys", token)
    assert r.status == 401
    assert r.code == "api_key_expired"
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


async def test_a_revoked_api_key_is_refused_on_the_very_next_request(
    api: Api, org: ApiOrg, admin: str
) -> None:
    token, key = await org.api_key(["ssh-key:read"])
    assert (await api.call("GET", "/v1/ssh-keys", token)).status == 200
    assert (await api.call("DELETE", f"/v1/api-keys/{key.id}", admin)).status == 204
    r = await api.call("GET", "/v1/ssh-keys", token)
    assert r.status == 401
    assert r.code == "api_key_revoked"


async def test_using_an_api_key_records_when_it_was_last_used(
    api: Api, org: ApiOrg, admin: str
) -> None:
    token, key = await org.api_key(["ssh-key:read"], name="reader")
    assert (await api.call("GET", "/v1/ssh-keys", token)).status == 200
    listed: dict[str, Any] = {}
    for _ in range(50):
        r = await api.call("GET", "/v1/api-keys", admin)
        listed = {k["id"]: k for k in r.body["data"]}
        if listed[str(key.id)]["last_used_at"] is not None:
            break
        await asyncio.sleep(0.05)
    assert listed[str(key.id)]["last_used_at"] is not None


# --- scopes --------------------------------------------------------------------------------

# (scopes granted, route, allowed)
_SCOPE_CASES = [
    (["ssh-key:read"], "GET /v1/ssh-keys", True),
    (["ssh-key:read"], "GET /v1/ssh-keys/{id}", True),
    (["ssh-key:read"], "POST /v1/ssh-keys", False),
    (["ssh-key:read"], "PATCH /v1/ssh-keys/{id}", False),
    (["ssh-key:read"], "DELETE /v1/ssh-keys/{id}", False),
    (["ssh-key:write"], "POST /v1/ssh-keys", True),
    (["ssh-key:write"], "GET /v1/ssh-keys", False),
    (["ssh-key:*"], "POST /v1/ssh-keys", True),
    (["ssh-key:*"], "GET /v1/ssh-keys", True),
    (["ssh-key:*"], "PATCH /v1/ssh-keys/{id}", True),
    (["ssh-key:*"], "DELETE /v1/ssh-keys/{id}", True),
    (["ssh-key:*"], "GET /v1/api-keys", False),
    (["ssh-key:read"], "GET /v1/ssh-cert-authorities", True),
    (["ssh-key:read"], "GET /v1/ssh-cert-authorities/{id}", True),
    (["ssh-key:read"], "GET /v1/ssh-cert-authorities/{id}/revocations", True),
    (["ssh-key:read"], "POST /v1/ssh-cert-authorities", False),
    (["ssh-key:read"], "PATCH /v1/ssh-cert-authorities/{id}", False),
    (["ssh-key:read"], "DELETE /v1/ssh-cert-authorities/{id}", False),
    (["ssh-key:read"], "POST /v1/ssh-cert-authorities/{id}/revocations", False),
    (["ssh-key:read"], "DELETE /v1/ssh-cert-authorities/{id}/revocations/{rid}", False),
    (["ssh-key:write"], "POST /v1/ssh-cert-authorities", True),
    (["ssh-key:*"], "PATCH /v1/ssh-cert-authorities/{id}", True),
    (["ssh-key:*"], "DELETE /v1/ssh-cert-authorities/{id}", True),
    (["ssh-key:*"], "POST /v1/ssh-cert-authorities/{id}/revocations", True),
    (["ssh-key:*"], "DELETE /v1/ssh-cert-authorities/{id}/revocations/{rid}", True),
    (["api-key:*"], "GET /v1/ssh-cert-authorities", False),
    (["api-key:*"], "GET /v1/ssh-cert-authorities/{id}", False),
    (["api-key:*"], "GET /v1/ssh-cert-authorities/{id}/revocations", False),
    (["ssh-key:*"], "POST /v1/api-keys", False),
    (["ssh-key:*"], "DELETE /v1/api-keys/{id}", False),
    (["ssh-key:*"], "POST /v1/api-keys/{id}/rotate", False),
    (["api-key:read"], "GET /v1/api-keys", True),
    (["api-key:read"], "POST /v1/api-keys", False),
    (["api-key:read"], "GET /v1/ssh-keys", False),
    (["api-key:*"], "GET /v1/api-keys", True),
    (["api-key:*"], "POST /v1/api-keys", True),
    (["api-key:*"], "DELETE /v1/api-keys/{id}", True),
    (["api-key:*"], "POST /v1/api-keys/{id}/rotate", True),
    (["api-key:*"], "GET /v1/ssh-keys/{id}", False),
    (["*"], "GET /v1/ssh-keys", True),
    (["*"], "POST /v1/api-keys/{id}/rotate", True),
    (["audit:read"], "GET /v1/audit-events", True),
    (["audit:read"], "GET /v1/ssh-keys", False),
    (["ssh-key:*", "api-key:*"], "GET /v1/audit-events", False),
    (["*"], "GET /v1/audit-events", True),
]


def test_the_scope_table_covers_every_route_both_ways() -> None:
    labels = {f"{r.method} {r.path}" for r in ROUTES}
    assert {label for _, label, ok in _SCOPE_CASES if ok} == labels
    assert {label for _, label, ok in _SCOPE_CASES if not ok} == labels


@pytest.mark.parametrize(("scopes", "label", "allowed"), _SCOPE_CASES)
async def test_each_route_needs_its_scope(
    api: Api, org: ApiOrg, scopes: list[str], label: str, allowed: bool
) -> None:
    method, path = label.split(" ", 1)
    token, _ = await org.api_key(scopes)
    body: Any = None
    if method in ("POST", "PATCH"):
        body = {}
    r = await api.call(method, _concrete(path), token, json_body=body)
    if allowed:
        assert r.status not in (401, 403), r.text
    else:
        assert r.status == 403, r.text
        assert r.code == "insufficient_scope"
        assert "insufficient_scope" in r.headers["WWW-Authenticate"]


async def test_a_runaway_script_is_slowed_down_with_429(pool: Any, org: ApiOrg) -> None:
    token, _ = await org.api_key(["ssh-key:read"])
    server = await serve_api(
        pool,
        host="127.0.0.1",
        port=0,
        max_body_bytes=MAX_BODY,
        record_audit=lambda e: None,
        rate_per_second=0.5,
        rate_burst=3,
    )
    try:
        async with aiohttp.ClientSession() as session:
            local = Api(f"http://127.0.0.1:{server.port}", session)
            statuses = [(await local.call("GET", "/v1/ssh-keys", token)).status for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
            r = await local.call("GET", "/v1/ssh-keys", token)
            assert r.status == 429
            assert r.code == "rate_limited"
            assert int(r.headers["Retry-After"]) >= 1
    finally:
        await server.close()


# --- registering SSH keys ------------------------------------------------------------------


async def test_user_registers_a_public_key_and_gets_its_metadata(api: Api, org: ApiOrg) -> None:
    token, api_key = await org.api_key(["ssh-key:*"], name="dashboard")
    line = public_line("alice@laptop")
    r = await register(api, token, line, name="Alice's laptop")
    assert r.status == 201, r.text
    body = r.body
    parsed = keyparse.parse_public_key(line)
    assert body["name"] == "Alice's laptop"
    assert body["type"] == "ssh-ed25519"
    assert body["bits"] == 256
    assert body["fingerprint"] == parsed.fingerprint
    assert body["fingerprint"].startswith("SHA256:")
    assert body["comment"] == "alice@laptop"
    assert body["project"] == "default"
    assert body["last_used_at"] is None
    assert dt.datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert r.headers["Location"] == f"/v1/ssh-keys/{body['id']}"
    assert r.headers["Cache-Control"] == "no-store"
    again = await api.call("GET", f"/v1/ssh-keys/{body['id']}", token)
    assert again.status == 200
    assert again.body == body
    event = next(e for e in api.events if e.target == body["id"])
    assert event.action == "api.ssh_key.create"
    assert event.result == "ok"
    assert event.actor == str(api_key.id)
    assert event.org_id == org.id
    assert event.source_ip == "127.0.0.1"


async def test_a_key_can_be_registered_into_a_named_project(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    await orgs.create_project(pool, org.id, "backend", "Backend")
    r = await register(api, admin, project="backend")
    assert r.status == 201
    assert r.body["project"] == "backend"


async def test_a_project_the_org_does_not_have_is_refused_with_422(
    api: Api, admin: str, pool: Any
) -> None:
    other = await make_org(pool)
    await orgs.create_project(pool, other.id, "theirs", "Theirs")
    for slug in ("nope", "theirs"):
        r = await register(api, admin, project=slug)
        assert r.status == 422, r.text
        assert r.code == "unknown_project"


def _rfc4716(line: str) -> str:
    body = line.split()[1]
    chunks = "\n".join(body[i : i + 70] for i in range(0, len(body), 70))
    return f"---- BEGIN SSH2 PUBLIC KEY ----\n{chunks}\n---- END SSH2 PUBLIC KEY ----\n"


async def test_an_rfc4716_export_is_accepted_and_canonicalised(api: Api, admin: str) -> None:
    line = public_line()
    r = await register(api, admin, _rfc4716(line))
    assert r.status == 201, r.text
    assert r.body["public_key"] == " ".join(line.split()[:2])


def _dsa_line() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import dsa

    key = dsa.generate_private_key(1024).public_key()  # noqa: S505 - must be refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography deprecates DSA: that is the point
        raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode() + " old@box"


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda: "hello world", "not_a_public_key", "not an OpenSSH public key"),
        (lambda: "   \n# only a comment\n", "empty", "No public key"),
        (lambda: public_line().split()[1], "not_a_public_key", "key type is missing"),
        (_dsa_line, "dsa_not_supported", "DSA"),
        (lambda: rsa_public_line(1024), "rsa_too_small", "2048"),
        (lambda: public_line() + "\n" + public_line(), "multiple_keys", "one public key"),
        (lambda: 'from="10.0.0.1",no-pty ' + public_line(), "options_not_supported", "options"),
        (lambda: 'command="ls" ' + public_line(), "options_not_supported", "options"),
        (lambda: "ssh-ed25519 " + "A" * 20000, "too_large", "at most 16384"),
        (lambda: public_line()[:-20], "not_a_public_key", "cut short"),
        (lambda: public_line("evil\u202ename"), "bad_comment", "comment"),
    ],
    ids=[
        "prose",
        "empty",
        "no-type",
        "dsa",
        "rsa-1024",
        "two-keys",
        "options",
        "command-option",
        "oversized",
        "truncated",
        "bidi-comment",
    ],
)
async def test_what_is_not_one_acceptable_public_key_is_refused_with_400_saying_why(
    api: Api, admin: str, make: Any, code: str, words: str
) -> None:
    r = await register(api, admin, make())
    assert r.status == 400, r.text
    assert r.code == code
    assert words.lower() in r.body["error"]["message"].lower()


async def test_a_rsa_key_of_2048_bits_is_accepted(api: Api, admin: str) -> None:
    r = await register(api, admin, rsa_public_line(2048))
    assert r.status == 201
    assert (r.body["type"], r.body["bits"]) == ("ssh-rsa", 2048)


async def test_a_pasted_private_key_is_refused_and_never_echoed_stored_or_logged(
    api: Api,
    admin: str,
    org: ApiOrg,
    pool: Any,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = private_pem()
    r = await register(api, admin, secret, name="oops")
    assert r.status == 400
    assert r.code == "private_key"
    assert "PRIVATE key" in r.body["error"]["message"]
    body_lines = [ln for ln in secret.splitlines() if ln and not ln.startswith("-----")]
    assert body_lines
    captured = capsys.readouterr()
    seen = [r.text, captured.out, captured.err, caplog.text, repr(api.events)]
    for chunk in body_lines:
        for piece in (chunk[i : i + 16] for i in range(0, len(chunk) - 16, 8)):
            for text in seen:
                assert piece not in text
    refused = [e for e in api.events if e.org_id == org.id and e.reason == "private_key"]
    assert refused and refused[-1].result == "refused"
    assert await pool.fetchval("SELECT count(*) FROM ssh_keys WHERE org_id = $1", org.id) == 0


async def test_registering_a_key_the_org_already_has_answers_409_naming_the_existing_key(
    api: Api, admin: str
) -> None:
    line = public_line()
    first = await register(api, admin, line, name="work laptop")
    assert first.status == 201
    r = await register(api, admin, line.rsplit(" ", 1)[0] + " other-comment", name="dup")
    assert r.status == 409
    assert r.code == "key_already_registered"
    assert "work laptop" in r.body["error"]["message"]
    assert first.body["id"] in r.body["error"]["message"]
    assert r.body["error"]["existing_id"] == first.body["id"]


async def test_a_revoked_key_can_be_registered_again(api: Api, admin: str) -> None:
    line = public_line()
    first = await register(api, admin, line)
    assert (await api.call("DELETE", f"/v1/ssh-keys/{first.body['id']}", admin)).status == 204
    second = await register(api, admin, line)
    assert second.status == 201
    assert second.body["id"] != first.body["id"]


async def test_two_orgs_may_register_the_same_key_without_learning_of_each_other(
    api: Api, admin: str, pool: Any
) -> None:
    other = await make_org(pool)
    other_token, _ = await other.api_key(["*"])
    line = public_line()
    assert (await register(api, admin, line)).status == 201
    assert (await register(api, other_token, line)).status == 201


# --- request bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'"just a string"', "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b"[" * 5000 + b"]" * 5000, "invalid_json"),
        (b'{"name": "x"}', "missing_field"),
        (b'{"public_key": "ssh-ed25519 AAAA"}', "missing_field"),
        (b'{"name": 5, "public_key": "x"}', "invalid_type"),
        (b'{"name": "x", "public_key": null}', "invalid_type"),
        (b'{"name": "x", "public_key": "x", "project": null}', "invalid_type"),
        (b'{"name": "x", "public_key": "x", "org_id": "other"}', "unknown_field"),
        (b'{"name": "", "public_key": "PLACEHOLDER"}', "invalid_name"),
        (b'{"name": "a\\u0000b", "public_key": "PLACEHOLDER"}', "invalid_name"),
        (b'{"name": "laptop\\f", "public_key": "PLACEHOLDER"}', "invalid_name"),
        (b'{"name": "\\u008a", "public_key": "PLACEHOLDER"}', "invalid_name"),
        (b'{"name": "a\\udc00b", "public_key": "PLACEHOLDER"}', "invalid_json"),
        (b'{"name": "x", "public_key": "PLACEHOLDER", "\\ud800": 1}', "invalid_json"),
        (b'{"name": "x", "public_key": "PLACEHOLDER", "project": "Bad Slug"}', "invalid_slug"),
    ],
)
async def test_malformed_bodies_are_refused_with_400(
    api: Api, admin: str, data: bytes, code: str
) -> None:
    data = data.replace(b"PLACEHOLDER", public_line().encode())
    r = await api.call(
        "POST",
        "/v1/ssh-keys",
        admin,
        data=data,
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 400, r.text
    assert r.code == code


@pytest.mark.parametrize("name", ["\u008a\f", "ci\f", "\u0085deploy", "\tci"])
async def test_an_api_key_name_with_a_control_character_is_refused_and_nothing_is_created(
    api: Api, admin: str, name: str
) -> None:
    """Found by the schema fuzzer: "\\u008a\\f" was stripped to a control character and stored
    as a new key's name. The schema forbids control characters anywhere; so does the API."""
    before = await api.call("GET", "/v1/api-keys", admin)
    r = await api.call(
        "POST", "/v1/api-keys", admin, json_body={"name": name, "scopes": ["ssh-key:*"]}
    )
    assert r.status == 400, r.text
    assert r.code == "invalid_name"
    after = await api.call("GET", "/v1/api-keys", admin)
    assert [k["id"] for k in after.body["data"]] == [k["id"] for k in before.body["data"]]


async def test_a_post_without_a_body_is_refused_with_400(api: Api, admin: str) -> None:
    r = await api.call("POST", "/v1/ssh-keys", admin)
    assert r.status == 400
    assert r.code == "body_required"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_a_body_that_is_not_json_is_refused_with_415(
    api: Api, admin: str, content_type: str | None
) -> None:
    data = json.dumps({"name": "x", "public_key": public_line()}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    r = await api.call("POST", "/v1/ssh-keys", admin, data=data, headers=headers)
    assert r.status == 415, r.text
    assert r.code == "unsupported_media_type"


async def test_json_with_a_charset_is_fine(api: Api, admin: str) -> None:
    data = json.dumps({"name": "x", "public_key": public_line()}).encode()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    r = await api.call("POST", "/v1/ssh-keys", admin, data=data, headers=headers)
    assert r.status == 201


async def test_a_body_over_the_limit_is_refused_with_413(api: Api, admin: str) -> None:
    data = json.dumps({"name": "x", "public_key": "A" * (MAX_BODY + 10)}).encode()
    r = await api.call(
        "POST", "/v1/ssh-keys", admin, data=data, headers={"Content-Type": "application/json"}
    )
    assert r.status == 413
    assert r.code == "payload_too_large"
    assert str(MAX_BODY) in r.body["error"]["message"]


async def test_a_chunked_body_over_the_limit_is_refused_with_413(api: Api, admin: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "x", "public_key": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"A" * 4096
        yield b'"}'

    async with api.session.post(
        api.base + "/v1/ssh-keys",
        data=chunks(),
        headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"


# --- listing, reading, renaming, moving and revoking ---------------------------------------


async def test_listing_pages_through_every_key_once_in_creation_order(
    api: Api, org: ApiOrg, admin: str
) -> None:
    made = [(await register(api, admin, name=f"k{i}")).body["id"] for i in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        path = "/v1/ssh-keys?limit=3" + (f"&cursor={cursor}" if cursor else "")
        r = await api.call("GET", path, admin)
        assert r.status == 200, r.text
        pages += 1
        seen += [k["id"] for k in r.body["data"]]
        cursor = r.body["next_cursor"]
        if cursor is None:
            break
    assert seen == made
    assert pages == 3
    everything = await api.call("GET", "/v1/ssh-keys", admin)
    assert [k["id"] for k in everything.body["data"]] == made
    assert everything.body["next_cursor"] is None


async def test_listing_filters_by_project(api: Api, org: ApiOrg, admin: str, pool: Any) -> None:
    await orgs.create_project(pool, org.id, "infra", "Infra")
    in_infra = (await register(api, admin, project="infra")).body["id"]
    await register(api, admin)
    r = await api.call("GET", "/v1/ssh-keys?project=infra", admin)
    assert [k["id"] for k in r.body["data"]] == [in_infra]
    r = await api.call("GET", "/v1/ssh-keys?project=unknown", admin)
    assert r.status == 422


async def test_revoked_keys_are_not_listed(api: Api, admin: str) -> None:
    kept = (await register(api, admin)).body["id"]
    gone = (await register(api, admin)).body["id"]
    await api.call("DELETE", f"/v1/ssh-keys/{gone}", admin)
    r = await api.call("GET", "/v1/ssh-keys", admin)
    assert [k["id"] for k in r.body["data"]] == [kept]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "invalid_limit"),
        ("limit=101", "invalid_limit"),
        ("limit=-1", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("limit=1&limit=2", "invalid_parameter"),
        ("cursor=garbage", "invalid_cursor"),
        ("cursor=", "invalid_cursor"),
        ("cursor=MjAyNC0wMS0wMVQwMDowMDowMHxub3QtYS11dWlk", "invalid_cursor"),
        ("sort=name", "unknown_parameter"),
        ("project=Not%20A%20Slug", "invalid_slug"),
    ],
)
async def test_bad_paging_parameters_are_refused_with_400(
    api: Api, admin: str, query: str, code: str
) -> None:
    r = await api.call("GET", f"/v1/ssh-keys?{query}", admin)
    assert r.status == 400, r.text
    assert r.code == code


async def test_a_key_is_renamed_and_moved_to_another_project(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    await orgs.create_project(pool, org.id, "data", "Data")
    key_id = (await register(api, admin, name="old")).body["id"]
    r = await api.call("PATCH", f"/v1/ssh-keys/{key_id}", admin, json_body={"name": "new"})
    assert r.status == 200, r.text
    assert (r.body["name"], r.body["project"]) == ("new", "default")
    r = await api.call("PATCH", f"/v1/ssh-keys/{key_id}", admin, json_body={"project": "data"})
    assert (r.body["name"], r.body["project"]) == ("new", "data")
    r = await api.call(
        "PATCH", f"/v1/ssh-keys/{key_id}", admin, json_body={"name": "both", "project": "default"}
    )
    assert (r.body["name"], r.body["project"]) == ("both", "default")
    actions = [e.action for e in api.events if e.target == key_id]
    assert actions.count("api.ssh_key.update") == 3


async def test_a_key_cannot_be_moved_to_another_orgs_project(
    api: Api, admin: str, pool: Any
) -> None:
    other = await make_org(pool)
    await orgs.create_project(pool, other.id, "secret-proj", "Secret")
    key_id = (await register(api, admin)).body["id"]
    r = await api.call(
        "PATCH", f"/v1/ssh-keys/{key_id}", admin, json_body={"project": "secret-proj"}
    )
    assert r.status == 422
    assert r.code == "unknown_project"


@pytest.mark.parametrize(
    ("body", "code"),
    [({}, "nothing_to_update"), ({"name": "  "}, "invalid_name"), ({"id": "x"}, "unknown_field")],
)
async def test_a_patch_that_changes_nothing_valid_is_refused_with_400(
    api: Api, admin: str, body: dict[str, Any], code: str
) -> None:
    key_id = (await register(api, admin)).body["id"]
    r = await api.call("PATCH", f"/v1/ssh-keys/{key_id}", admin, json_body=body)
    assert r.status == 400
    assert r.code == code


async def test_delete_revokes_at_once_and_a_second_delete_is_404(api: Api, admin: str) -> None:
    key_id = (await register(api, admin)).body["id"]
    r = await api.call("DELETE", f"/v1/ssh-keys/{key_id}", admin)
    assert r.status == 204
    assert r.text == ""
    assert (await api.call("GET", f"/v1/ssh-keys/{key_id}", admin)).status == 404
    assert (await api.call("DELETE", f"/v1/ssh-keys/{key_id}", admin)).status == 404
    assert any(e.action == "api.ssh_key.revoke" and e.target == key_id for e in api.events)


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1", "SHA256:abc"])
async def test_an_id_that_is_no_uuid_names_nothing(api: Api, admin: str, bad_id: str) -> None:
    for method in ("GET", "DELETE"):
        r = await api.call(method, f"/v1/ssh-keys/{bad_id}", admin)
        assert r.status == 404
        assert r.code == "not_found"


# --- isolation between organizations -------------------------------------------------------


async def test_another_orgs_resources_answer_404_on_every_endpoint(
    api: Api, admin: str, pool: Any
) -> None:
    """Org A holds a '*' key; everything of org B is invisible and untouchable to it."""
    other = await make_org(pool)
    other_admin, other_api_key = await other.api_key(["*"], name="b-admin")
    their_ssh = (await register(api, other_admin, name="theirs")).body["id"]
    their_api = str(other_api_key.id)
    ca_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    their_ca = (
        await api.call(
            "POST",
            "/v1/ssh-cert-authorities",
            other_admin,
            json_body={"name": "theirs", "public_key": ca_key},
        )
    ).body["id"]
    their_rid = (
        await api.call(
            "POST",
            f"/v1/ssh-cert-authorities/{their_ca}/revocations",
            other_admin,
            json_body={"serial": 1},
        )
    ).body["id"]
    by_route: dict[str, tuple[str, Any]] = {
        "GET /v1/ssh-keys/{id}": (their_ssh, None),
        "PATCH /v1/ssh-keys/{id}": (their_ssh, {"name": "pwned"}),
        "DELETE /v1/ssh-keys/{id}": (their_ssh, None),
        "DELETE /v1/api-keys/{id}": (their_api, None),
        "POST /v1/api-keys/{id}/rotate": (their_api, {}),
        "GET /v1/ssh-cert-authorities/{id}": (their_ca, None),
        "PATCH /v1/ssh-cert-authorities/{id}": (their_ca, {"principals": ["pwned"]}),
        "DELETE /v1/ssh-cert-authorities/{id}": (their_ca, None),
        "POST /v1/ssh-cert-authorities/{id}/revocations": (their_ca, {"serial": 2}),
        "GET /v1/ssh-cert-authorities/{id}/revocations": (their_ca, None),
        "DELETE /v1/ssh-cert-authorities/{id}/revocations/{rid}": (their_ca, None),
    }
    for route in ROUTES:
        label = f"{route.method} {route.path}"
        if "{id}" not in route.path:
            continue
        target, body = by_route.pop(label)
        path = route.path.replace("{id}", target).replace("{rid}", their_rid)
        r = await api.call(route.method, path, admin, json_body=body)
        assert r.status == 404, (label, r.text)
        assert r.code == "not_found"
    assert not by_route
    # The lists show only org A's own keys.
    ssh_list = await api.call("GET", "/v1/ssh-keys", admin)
    assert their_ssh not in {k["id"] for k in ssh_list.body["data"]}
    api_list = await api.call("GET", "/v1/api-keys", admin)
    assert their_api not in {k["id"] for k in api_list.body["data"]}
    # A new key or API key lands in org A, never in B.
    mine = await register(api, admin)
    assert mine.status == 201
    theirs = await api.call("GET", f"/v1/ssh-keys/{mine.body['id']}", other_admin)
    assert theirs.status == 404
    # And org B's key and API key are untouched.
    r = await api.call("GET", f"/v1/ssh-keys/{their_ssh}", other_admin)
    assert r.status == 200
    assert r.body["name"] == "theirs"


# --- API keys ------------------------------------------------------------------------------


async def test_an_api_key_is_shown_once_and_only_its_hash_is_stored(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    r = await api.call(
        "POST",
        "/v1/api-keys",
        admin,
        json_body={"name": "ci", "scopes": ["ssh-key:read"], "expires_in": "90d"},
    )
    assert r.status == 201, r.text
    created = r.body
    secret = created["secret"]
    assert secret.startswith("rt_live_")
    assert secret.startswith(created["prefix"])
    assert created["scopes"] == ["ssh-key:read"]
    expires = dt.datetime.fromisoformat(created["expires_at"])
    made = dt.datetime.fromisoformat(created["created_at"])
    assert abs((expires - made) - dt.timedelta(days=90)) < dt.timedelta(seconds=5)
    # The secret works, and is nowhere to be read again.
    assert (await api.call("GET", "/v1/ssh-keys", secret)).status == 200
    listed = await api.call("GET", "/v1/api-keys", admin)
    assert secret not in listed.text
    assert "secret" not in next(k for k in listed.body["data"] if k["id"] == created["id"])
    row = await pool.fetchrow(
        "SELECT * FROM api_keys WHERE org_id = $1 AND id = $2", org.id, uuid.UUID(created["id"])
    )
    assert bytes(row["token_hash"]) == hashlib.sha256(secret.encode()).digest()
    assert secret not in repr(dict(row))
    assert secret not in repr(api.events)
    assert any(e.action == "api.api_key.create" and e.target == created["id"] for e in api.events)


async def test_a_test_environment_key_is_made_on_request(api: Api, admin: str) -> None:
    r = await api.call(
        "POST",
        "/v1/api-keys",
        admin,
        json_body={"name": "sandbox", "scopes": ["ssh-key:read"], "environment": "test"},
    )
    assert r.status == 201
    assert r.body["secret"].startswith("rt_test_")
    assert r.body["environment"] == "test"
    assert (await api.call("GET", "/v1/ssh-keys", r.body["secret"])).status == 200


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"name": "x", "scopes": ["ssh-key:admin"]}, "invalid_scope"),
        ({"name": "x", "scopes": []}, "invalid_scope"),
        ({"name": "x", "scopes": "ssh-key:read"}, "invalid_type"),
        ({"name": "x", "scopes": [1]}, "invalid_scope"),
        ({"name": "x", "scopes": ["*"], "expires_in": "forever"}, "invalid_duration"),
        ({"name": "x", "scopes": ["*"], "expires_in": "0d"}, "invalid_duration"),
        ({"name": "x", "scopes": ["*"], "expires_in": "99999d"}, "invalid_duration"),
        ({"name": "x", "scopes": ["*"], "environment": "prod"}, "invalid_environment"),
        ({"scopes": ["*"]}, "missing_field"),
        ({"name": "x", "scopes": ["*"], "secret": "rt_live_x"}, "unknown_field"),
    ],
)
async def test_invalid_api_key_requests_are_refused_with_400(
    api: Api, admin: str, body: dict[str, Any], code: str
) -> None:
    r = await api.call("POST", "/v1/api-keys", admin, json_body=body)
    assert r.status == 400, r.text
    assert r.code == code


@pytest.mark.parametrize("wanted", [["*"], ["ssh-key:*"], ["ssh-key:read"], ["api-key:*"]])
async def test_a_key_cannot_grant_scopes_it_does_not_hold(
    api: Api, org: ApiOrg, wanted: list[str]
) -> None:
    token, _ = await org.api_key(["api-key:write", "api-key:read"])
    r = await api.call("POST", "/v1/api-keys", token, json_body={"name": "x", "scopes": wanted})
    assert r.status == 403, r.text
    assert r.code == "insufficient_scope"


async def test_a_key_may_grant_scopes_it_holds(api: Api, org: ApiOrg) -> None:
    token, _ = await org.api_key(["api-key:*", "ssh-key:read"])
    r = await api.call(
        "POST",
        "/v1/api-keys",
        token,
        json_body={"name": "x", "scopes": ["api-key:read", "ssh-key:read"]},
    )
    assert r.status == 201, r.text


async def test_listing_api_keys_shows_metadata_of_keys_not_revoked(
    api: Api, org: ApiOrg, admin: str
) -> None:
    await org.api_key(["ssh-key:read"], name="kept")
    _, gone = await org.api_key(["ssh-key:read"], name="gone")
    assert (await api.call("DELETE", f"/v1/api-keys/{gone.id}", admin)).status == 204
    r = await api.call("GET", "/v1/api-keys", admin)
    names = {k["name"] for k in r.body["data"]}
    assert {"admin", "kept"} <= names
    assert "gone" not in names
    first = await api.call("GET", "/v1/api-keys?limit=1", admin)
    assert len(first.body["data"]) == 1
    second = await api.call(
        "GET", f"/v1/api-keys?limit=1&cursor={first.body['next_cursor']}", admin
    )
    assert second.body["data"][0]["id"] != first.body["data"][0]["id"]
    assert any(e.action == "api.api_key.revoke" and e.target == str(gone.id) for e in api.events)


async def test_rotation_without_grace_revokes_the_old_secret_at_once(
    api: Api, org: ApiOrg, admin: str
) -> None:
    old_token, old = await org.api_key(["ssh-key:read"], name="deploy")
    r = await api.call("POST", f"/v1/api-keys/{old.id}/rotate", admin)
    assert r.status == 201, r.text
    new = r.body
    assert new["id"] != str(old.id)
    assert (new["name"], new["scopes"]) == ("deploy", ["ssh-key:read"])
    assert new["previous"]["id"] == str(old.id)
    assert new["previous"]["revoked_at"] is not None
    assert (await api.call("GET", "/v1/ssh-keys", old_token)).code == "api_key_revoked"
    assert (await api.call("GET", "/v1/ssh-keys", new["secret"])).status == 200
    assert any(e.action == "api.api_key.rotate" and e.target == str(old.id) for e in api.events)


async def test_rotation_with_a_grace_period_keeps_the_old_secret_working_until_it_ends(
    api: Api, org: ApiOrg, admin: str
) -> None:
    old_token, old = await org.api_key(["ssh-key:read"], name="deploy")
    r = await api.call(
        "POST", f"/v1/api-keys/{old.id}/rotate", admin, json_body={"grace_period": "2s"}
    )
    assert r.status == 201, r.text
    previous = r.body["previous"]
    assert previous["revoked_at"] is None
    ends = dt.datetime.fromisoformat(previous["expires_at"])
    assert dt.timedelta(0) < ends - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=3)
    assert (await api.call("GET", "/v1/ssh-keys", old_token)).status == 200
    assert (await api.call("GET", "/v1/ssh-keys", r.body["secret"])).status == 200
    await asyncio.sleep(max(0.0, (ends - dt.datetime.now(dt.UTC)).total_seconds()) + 0.3)
    assert (await api.call("GET", "/v1/ssh-keys", old_token)).code == "api_key_expired"
    assert (await api.call("GET", "/v1/ssh-keys", r.body["secret"])).status == 200


async def test_rotation_keeps_the_lifetime_and_never_extends_the_old_keys_expiry(
    api: Api, org: ApiOrg, admin: str
) -> None:
    _, old = await org.api_key(["ssh-key:read"], expires_in=dt.timedelta(hours=1))
    r = await api.call(
        "POST", f"/v1/api-keys/{old.id}/rotate", admin, json_body={"grace_period": "7d"}
    )
    assert r.status == 201
    assert old.expires_at is not None
    assert dt.datetime.fromisoformat(r.body["previous"]["expires_at"]) == old.expires_at
    lifetime = dt.datetime.fromisoformat(r.body["expires_at"]) - dt.datetime.fromisoformat(
        r.body["created_at"]
    )
    assert abs(lifetime - dt.timedelta(hours=1)) < dt.timedelta(seconds=2)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"grace_period": "31d"}, "invalid_grace_period"),
        ({"grace_period": "soon"}, "invalid_duration"),
        ({"grace": "1h"}, "unknown_field"),
    ],
)
async def test_invalid_rotation_requests_are_refused_with_400(
    api: Api, org: ApiOrg, admin: str, body: dict[str, Any], code: str
) -> None:
    token, old = await org.api_key(["ssh-key:read"])
    r = await api.call("POST", f"/v1/api-keys/{old.id}/rotate", admin, json_body=body)
    assert r.status == 400, r.text
    assert r.code == code
    assert (await api.call("GET", "/v1/ssh-keys", token)).status == 200


async def test_a_narrow_key_cannot_rotate_a_broader_one_to_learn_its_new_secret(
    api: Api, org: ApiOrg
) -> None:
    narrow, _ = await org.api_key(["api-key:*"])
    broad_token, broad = await org.api_key(["*"])
    r = await api.call("POST", f"/v1/api-keys/{broad.id}/rotate", narrow)
    assert r.status == 403
    assert (await api.call("GET", "/v1/ssh-keys", broad_token)).status == 200


async def test_a_key_can_rotate_itself(api: Api, org: ApiOrg) -> None:
    token, key = await org.api_key(["api-key:*"])
    r = await api.call("POST", f"/v1/api-keys/{key.id}/rotate", token)
    assert r.status == 201
    assert (await api.call("GET", "/v1/api-keys", token)).status == 401
    assert (await api.call("GET", "/v1/api-keys", r.body["secret"])).status == 200


# --- errors --------------------------------------------------------------------------------


async def test_an_unknown_path_answers_404_in_json(api: Api) -> None:
    r = await api.call("GET", "/v1/nothing-here")
    assert r.status == 404
    assert r.code == "not_found"


async def test_a_wrong_method_answers_405_in_json_with_allow(api: Api, admin: str) -> None:
    r = await api.call("PUT", "/v1/ssh-keys", admin, json_body={})
    assert r.status == 405
    assert r.code == "method_not_allowed"
    assert "GET" in r.headers["Allow"] and "POST" in r.headers["Allow"]


async def test_an_unexpected_error_is_a_generic_500_without_a_stack_trace(
    api: Api, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    r = await api.call("GET", "/boom")
    assert r.status == 500
    assert r.code == "internal_error"
    assert "shadow" not in r.text
    assert "Traceback" not in r.text
    assert "RuntimeError" not in r.text
    logged = capsys.readouterr()
    assert "api_internal_error" in logged.out + logged.err + caplog.text


async def test_when_the_database_is_gone_the_api_fails_closed_with_503(
    database_url: str, org: ApiOrg, pool: Any
) -> None:
    token, _ = await org.api_key(["*"])
    dead = await keystore_db.create_pool(database_url, min_size=1, max_size=1)
    await dead.close()
    server = await serve_api(
        dead, host="127.0.0.1", port=0, max_body_bytes=MAX_BODY, record_audit=lambda e: None
    )
    try:
        async with aiohttp.ClientSession() as session:
            r = await Api(f"http://127.0.0.1:{server.port}", session).call(
                "GET", "/v1/ssh-keys", token
            )
        assert r.status == 503, r.text
        assert r.code == "unavailable"
    finally:
        await server.close()


async def test_the_openapi_document_is_public_and_lists_every_operation(api: Api) -> None:
    r = await api.call("GET", "/v1/openapi.json")
    assert r.status == 200
    doc = r.body
    assert doc["openapi"].startswith("3.")
    for route in ROUTES:
        assert route.method.lower() in doc["paths"][route.path]


async def test_serve_api_closes_cleanly_and_frees_its_port(pool: Any) -> None:
    server: ApiServer = await serve_api(
        pool, host="127.0.0.1", port=0, max_body_bytes=MAX_BODY, record_audit=lambda e: None
    )
    port = server.port
    await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/v1/openapi.json")


# --- end to end: the real gateway, the real ssh client -------------------------------------


def _http(port: int, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _cli_api_key(database_url: str, slug: str, *scopes: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RTGW_DATABASE_URL": database_url}
    args = [sys.executable, "-m", "gateway", "api-key", "create", "--org", slug, "--name", "ops"]
    for scope in scopes:
        args += ["--scope", scope]
    return subprocess.run(
        [*args, "--expires-in", "1d"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_a_key_registered_through_the_api_opens_ssh_at_once_and_a_deleted_one_is_refused_at_once(
    gateway: GatewayProcess, ssh_client: SshClient, tenant: Tenant, database_url: str
) -> None:
    from gateway.lab.user_keys import make_key

    # The operator makes the org's first API key with the CLI; the secret is all of stdout.
    cli = _cli_api_key(database_url, tenant.slug, "ssh-key:*")
    assert cli.returncode == 0, cli.stderr
    token = cli.stdout.strip()
    assert token.startswith("rt_live_") and "\n" not in token
    assert "ssh-key:*" in cli.stderr

    key = make_key(tenant.key.path.parent, "via-api")
    refused = ssh_client.ssh(key, tenant.sandbox_id, "true")
    assert refused.returncode == 255

    status, body = _http(
        gateway.api_port,
        "POST",
        "/v1/ssh-keys",
        token,
        {"name": "via api", "public_key": key.public_line},
    )
    assert status == 201, body
    opened = ssh_client.ssh(key, tenant.sandbox_id, "echo in-sandbox")
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == b"in-sandbox\n"

    status, _ = _http(gateway.api_port, "DELETE", f"/v1/ssh-keys/{body['id']}", token)
    assert status == 204
    again = ssh_client.ssh(key, tenant.sandbox_id, "echo in-sandbox")
    assert again.returncode == 255
    assert again.stdout == b""


def test_the_key_list_shows_when_a_key_was_last_used_for_ssh(
    gateway: GatewayProcess, ssh_client: SshClient, tenant: Tenant, database_url: str
) -> None:
    cli = _cli_api_key(database_url, tenant.slug, "ssh-key:read")
    assert cli.returncode == 0, cli.stderr
    token = cli.stdout.strip()
    status, body = _http(gateway.api_port, "GET", f"/v1/ssh-keys/{tenant.key_id}", token)
    assert status == 200
    assert body["last_used_at"] is None
    assert ssh_client.ssh(tenant.key, tenant.sandbox_id, "true").returncode == 0
    used = None
    for _ in range(50):
        _, body = _http(gateway.api_port, "GET", f"/v1/ssh-keys/{tenant.key_id}", token)
        used = body["last_used_at"]
        if used:
            break
        time.sleep(0.1)
    assert used is not None


def test_the_cli_refuses_an_unknown_scope_and_an_unknown_org(
    database_url: str, tenant: Tenant
) -> None:
    bad_scope = _cli_api_key(database_url, tenant.slug, "ssh-key:everything")
    assert bad_scope.returncode == 1
    assert "Unknown scope" in bad_scope.stderr
    assert bad_scope.stdout == ""
    bad_org = _cli_api_key(database_url, "no-such-org-here", "ssh-key:*")
    assert bad_org.returncode == 1
    assert bad_org.stdout == ""
