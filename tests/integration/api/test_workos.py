"""Members signed in through WorkOS call the key API with their session token: a real JWKS
served over HTTP on loopback with keys made here, the API in-process over the session's
PostgreSQL. Forged and unusable tokens answer 401; roles decide the rest (the matrix below
covers every operation); keys and audit rows name the member."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway.lab.seed import unique
from keystore import orgs
from keystore.api.app import ROUTES
from tests.integration.api.support import Api, public_line
from tests.integration.api.workos_support import (
    Issuer,
    JwksServer,
    MemberOrg,
    SigningKey,
    close_api,
    hmac_token,
    member_org,
    start_api,
    tampered,
    unsigned_token,
    user_id,
    workos_org_id,
)
from tests.integration.support import REPO


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey.rsa("rsa-1")


@pytest.fixture(scope="module")
def jwks(rsa_key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([rsa_key, SigningKey.ec("ec-1")]) as server:
        yield server


@pytest.fixture(scope="module")
def issuer(rsa_key: SigningKey) -> Issuer:
    return Issuer(rsa_key)


@pytest.fixture(scope="module")
async def wapi(pool: Any, jwks: JwksServer) -> AsyncIterator[Api]:
    server, api = await start_api(pool, jwks.url)
    yield api
    await close_api(server, api)


@pytest.fixture
async def morg(pool: Any, issuer: Issuer) -> MemberOrg:
    return await member_org(pool, issuer)


async def register(api: Api, token: str, name: str = "laptop") -> Any:
    r = await api.call(
        "POST", "/v1/ssh-keys", token, json_body={"name": name, "public_key": public_line()}
    )
    assert r.status == 201, r.text
    return r.body


# --- who may sign in ---------------------------------------------------------------------------


async def test_a_member_of_a_mapped_org_is_let_in_and_sees_only_that_org(
    wapi: Api, morg: MemberOrg, pool: Any, issuer: Issuer
) -> None:
    other = await member_org(pool, issuer)
    theirs = await register(wapi, other.token("admin"))
    mine = await register(wapi, morg.token("developer"))
    r = await wapi.call("GET", "/v1/ssh-keys", morg.token("viewer"))
    assert r.status == 200, r.text
    assert [k["id"] for k in r.body["data"]] == [mine["id"]]
    assert (
        await wapi.call("GET", f"/v1/ssh-keys/{theirs['id']}", morg.token("admin"))
    ).status == 404


async def test_an_ec_signed_token_works_too(wapi: Api, morg: MemberOrg, jwks: JwksServer) -> None:
    ec_key = next(k for k in jwks.keys if k.alg == "ES256")
    token = morg.issuer.token(user_id(), morg.workos_id, key=ec_key, role="viewer")
    assert (await wapi.call("GET", "/v1/ssh-keys", token)).status == 200


def _forged(morg: MemberOrg, rsa_key: SigningKey) -> dict[str, tuple[str, str]]:
    """name -> (token, expected error code)."""
    now = int(time.time())
    good = morg.token("viewer")
    stranger = SigningKey.rsa(rsa_key.kid)  # same kid, another key
    claims = morg.issuer.claims(user_id(), morg.workos_id, role="owner")
    return {
        "expired": (
            morg.token("admin", iat=now - 900, exp=now - 600),
            "session_expired",
        ),
        "not yet valid": (morg.token("admin", nbf=now + 600), "invalid_session_token"),
        "issued in the future": (morg.token("admin", iat=now + 600), "invalid_session_token"),
        "from another issuer": (
            Issuer(rsa_key, issuer="https://api.workos.com/user_management/client_other").token(
                user_id(), morg.workos_id, role="admin"
            ),
            "invalid_session_token",
        ),
        "for an unmapped org": (
            morg.issuer.token(user_id(), workos_org_id(), role="admin"),
            "unknown_organization",
        ),
        "without an org": (morg.issuer.token(user_id(), None, role="admin"), "no_organization"),
        "with an unknown kid": (
            morg.issuer.token(user_id(), morg.workos_id, key=SigningKey.rsa(), role="admin"),
            "invalid_session_token",
        ),
        "signed by another key under a known kid": (
            morg.issuer.token(user_id(), morg.workos_id, key=stranger, role="admin"),
            "invalid_session_token",
        ),
        "alg none": (unsigned_token(claims, rsa_key.kid), "invalid_session_token"),
        "HS256 signed with the public key": (
            hmac_token(claims, rsa_key.kid, rsa_key.public_pem()),
            "invalid_session_token",
        ),
        "tampered payload (viewer made owner)": (
            tampered(good, role="owner"),
            "invalid_session_token",
        ),
        "tampered payload (another org)": (
            tampered(good, org_id=workos_org_id()),
            "invalid_session_token",
        ),
        "garbage": ("eyJhbGciOi.not.a-token", "invalid_session_token"),
        "not a jwt": ("hello", "invalid_session_token"),
    }


_FORGERIES = [
    "expired",
    "not yet valid",
    "issued in the future",
    "from another issuer",
    "for an unmapped org",
    "without an org",
    "with an unknown kid",
    "signed by another key under a known kid",
    "alg none",
    "HS256 signed with the public key",
    "tampered payload (viewer made owner)",
    "tampered payload (another org)",
    "garbage",
    "not a jwt",
]


@pytest.mark.parametrize("case", _FORGERIES)
async def test_unusable_session_tokens_are_refused_with_401(
    wapi: Api, morg: MemberOrg, rsa_key: SigningKey, case: str
) -> None:
    token, code = _forged(morg, rsa_key)[case]
    for method, path in [("GET", "/v1/ssh-keys"), ("GET", "/v1/audit-events")]:
        r = await wapi.call(method, path, token)
        assert r.status == 401, (case, r.text)
        assert r.code == code, (case, r.text)
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="runtools"')
        assert token not in r.text


def test_the_forgery_table_is_complete() -> None:
    assert len(set(_FORGERIES)) == len(_FORGERIES) == 14


async def test_a_disabled_organizations_members_are_refused(
    wapi: Api, morg: MemberOrg, pool: Any
) -> None:
    token = morg.token("owner")
    assert (await wapi.call("GET", "/v1/ssh-keys", token)).status == 200
    assert await orgs.disable_org(pool, morg.id)
    r = await wapi.call("GET", "/v1/ssh-keys", token)
    assert (r.status, r.code) == (401, "organization_disabled")
    api_token, _ = await morg.org.api_key(["*"])
    r = await wapi.call("GET", "/v1/ssh-keys", api_token)
    assert (r.status, r.code) == (401, "organization_disabled")


async def test_a_key_rotated_in_at_workos_is_fetched_once_and_unknown_kids_do_not_hammer_it(
    wapi: Api, morg: MemberOrg, jwks: JwksServer
) -> None:
    assert (await wapi.call("GET", "/v1/ssh-keys", morg.token("viewer"))).status == 200
    new_key = SigningKey.rsa()
    jwks.keys.append(new_key)
    try:
        before = jwks.fetches
        token = morg.issuer.token(user_id(), morg.workos_id, key=new_key, role="viewer")
        started = time.monotonic()
        while (await wapi.call("GET", "/v1/ssh-keys", token)).status != 200:
            assert time.monotonic() - started < 8.0, "the new key was never fetched"
            await asyncio.sleep(0.2)
        # At most one fetch per 5 s, however many requests carried the unknown kid meanwhile.
        assert 1 <= jwks.fetches - before <= 2
        before = jwks.fetches
        strangers = [
            morg.issuer.token(user_id(), morg.workos_id, key=SigningKey.rsa(), role="viewer")
            for _ in range(10)
        ]
        replies = await asyncio.gather(*(wapi.call("GET", "/v1/ssh-keys", t) for t in strangers))
        assert {r.status for r in replies} == {401}
        assert jwks.fetches - before <= 1
        # Known keys are served from the cache.
        before = jwks.fetches
        for _ in range(5):
            assert (await wapi.call("GET", "/v1/ssh-keys", morg.token("viewer"))).status == 200
        assert jwks.fetches == before
    finally:
        jwks.keys.remove(new_key)


async def test_an_api_key_only_gateway_refuses_session_tokens(api: Api, morg: MemberOrg) -> None:
    r = await api.call("GET", "/v1/ssh-keys", morg.token("owner"))
    assert (r.status, r.code) == (401, "invalid_api_key")


async def test_without_a_reachable_jwks_sessions_are_unavailable_not_accepted(
    pool: Any, morg: MemberOrg
) -> None:
    server, api = await start_api(pool, "http://127.0.0.1:9/jwks")
    try:
        r = await api.call("GET", "/v1/ssh-keys", morg.token("owner"))
        assert (r.status, r.code) == (503, "unavailable")
        assert "Retry-After" in r.headers
        api_token, _ = await morg.org.api_key(["ssh-key:read"])
        assert (await api.call("GET", "/v1/ssh-keys", api_token)).status == 200
    finally:
        await close_api(server, api)


async def test_bad_session_tokens_count_against_the_source_like_bad_api_keys(
    pool: Any, morg: MemberOrg, jwks: JwksServer, rsa_key: SigningKey
) -> None:
    server, api = await start_api(pool, jwks.url, invalid_key_burst=3)
    try:
        forged = tampered(morg.token("viewer"), role="owner")
        statuses = [(await api.call("GET", "/v1/ssh-keys", forged)).status for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        r = await api.call("GET", "/v1/ssh-keys", morg.token("viewer"))
        assert (r.status, r.code) == (429, "too_many_invalid_keys")
    finally:
        await close_api(server, api)


# --- roles ---------------------------------------------------------------------------------

ALL, OWN, NONE = "all", "own", "none"
ROLES = ("owner", "admin", "developer", "member", "viewer", "intern", None)
# route -> what each role of ROLES may do there
MATRIX: dict[str, tuple[str, ...]] = {
    "POST /v1/ssh-keys": (ALL, ALL, ALL, ALL, NONE, NONE, NONE),
    "GET /v1/ssh-keys": (ALL, ALL, ALL, ALL, ALL, NONE, NONE),
    "GET /v1/ssh-keys/{id}": (ALL, ALL, ALL, ALL, ALL, NONE, NONE),
    "PATCH /v1/ssh-keys/{id}": (ALL, ALL, OWN, OWN, NONE, NONE, NONE),
    "DELETE /v1/ssh-keys/{id}": (ALL, ALL, OWN, OWN, NONE, NONE, NONE),
    "POST /v1/api-keys": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    "GET /v1/api-keys": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    "DELETE /v1/api-keys/{id}": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    "POST /v1/api-keys/{id}/rotate": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    "GET /v1/audit-events": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    # A CA is an organization-wide credential: ssh-key:write:own does not reach it.
    "POST /v1/ssh-cert-authorities": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    "GET /v1/ssh-cert-authorities": (ALL, ALL, ALL, ALL, ALL, NONE, NONE),
    "GET /v1/ssh-cert-authorities/{id}": (ALL, ALL, ALL, ALL, ALL, NONE, NONE),
    "PATCH /v1/ssh-cert-authorities/{id}": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    "DELETE /v1/ssh-cert-authorities/{id}": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    "POST /v1/ssh-cert-authorities/{id}/revocations": (ALL, ALL, NONE, NONE, NONE, NONE, NONE),
    "GET /v1/ssh-cert-authorities/{id}/revocations": (ALL, ALL, ALL, ALL, ALL, NONE, NONE),
    "DELETE /v1/ssh-cert-authorities/{id}/revocations/{rid}": (
        ALL,
        ALL,
        NONE,
        NONE,
        NONE,
        NONE,
        NONE,
    ),
}


def _ca_line() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()


def test_the_role_matrix_covers_every_operation() -> None:
    assert set(MATRIX) == {f"{r.method} {r.path}" for r in ROUTES}


async def _request_for(wapi: Api, morg: MemberOrg, label: str) -> tuple[str, str, Any]:
    """A request the route's handler would carry out given the permission, on resources of
    the org that another member (an owner) made."""
    method, path = label.split(" ", 1)
    body: Any = None
    if path == "/v1/ssh-keys" and method == "POST":
        body = {"name": "laptop", "public_key": public_line()}
    elif path == "/v1/ssh-cert-authorities" and method == "POST":
        body = {"name": "ci", "public_key": _ca_line()}
    elif path.startswith("/v1/ssh-cert-authorities/"):
        owner = morg.token("owner")
        created = await wapi.call(
            "POST",
            "/v1/ssh-cert-authorities",
            owner,
            json_body={"name": "ci", "public_key": _ca_line()},
        )
        ca_id = created.body["id"]
        revoked = await wapi.call(
            "POST", f"/v1/ssh-cert-authorities/{ca_id}/revocations", owner, json_body={"serial": 1}
        )
        path = path.replace("{id}", ca_id).replace("{rid}", revoked.body["id"])
        if method == "PATCH":
            body = {"name": "renamed"}
        elif method == "POST":
            body = {"serial": 2}
    elif path.startswith("/v1/ssh-keys/"):
        key = await register(wapi, morg.token("owner"))
        path = path.replace("{id}", key["id"])
        body = {"name": "renamed"} if method == "PATCH" else None
    elif path == "/v1/api-keys" and method == "POST":
        body = {"name": "ci", "scopes": ["ssh-key:read"]}
    elif path.startswith("/v1/api-keys/"):
        _, key = await morg.org.api_key(["ssh-key:read"])
        path = path.replace("{id}", str(key.id))
    return method, path, body


@pytest.mark.parametrize("label", sorted(MATRIX))
@pytest.mark.parametrize("role", ROLES, ids=lambda r: str(r))
async def test_each_role_may_do_what_the_table_says_on_every_operation(
    wapi: Api, morg: MemberOrg, label: str, role: str | None
) -> None:
    allowed = MATRIX[label][ROLES.index(role)]
    method, path, body = await _request_for(wapi, morg, label)
    r = await wapi.call(method, path, morg.token(role), json_body=body)
    if allowed == ALL:
        assert r.status in (200, 201, 204), r.text
    elif allowed == OWN:
        # Someone else's key: refused. (Their own: see the ownership story below.)
        assert (r.status, r.code) == (403, "not_key_owner"), r.text
    else:
        assert (r.status, r.code) == (403, "insufficient_permission"), r.text
        assert "WWW-Authenticate" in r.headers


async def test_a_developer_changes_only_the_keys_they_registered(
    wapi: Api, morg: MemberOrg
) -> None:
    alice, bob = user_id(), user_id()
    as_alice = morg.token("developer", user=alice)
    as_bob = morg.token("developer", user=bob)
    key = await register(wapi, as_alice)
    assert (key["created_by"], key["created_by_type"]) == (alice, "member")
    # Bob sees it, and may neither rename nor revoke it.
    listed = await wapi.call("GET", "/v1/ssh-keys", as_bob)
    assert key["id"] in [k["id"] for k in listed.body["data"]]
    r = await wapi.call("PATCH", f"/v1/ssh-keys/{key['id']}", as_bob, json_body={"name": "x"})
    assert (r.status, r.code) == (403, "not_key_owner")
    r = await wapi.call("DELETE", f"/v1/ssh-keys/{key['id']}", as_bob)
    assert (r.status, r.code) == (403, "not_key_owner")
    # Alice may.
    r = await wapi.call(
        "PATCH", f"/v1/ssh-keys/{key['id']}", as_alice, json_body={"name": "old laptop"}
    )
    assert (r.status, r.body["name"]) == (200, "old laptop")
    assert (await wapi.call("DELETE", f"/v1/ssh-keys/{key['id']}", as_alice)).status == 204
    # A key registered with an API key is nobody's own: only admins change it.
    api_token, api_key = await morg.org.api_key(["ssh-key:*"])
    keyed = await register(wapi, api_token)
    assert (keyed["created_by"], keyed["created_by_type"]) == (str(api_key.id), "api_key")
    r = await wapi.call("DELETE", f"/v1/ssh-keys/{keyed['id']}", as_alice)
    assert (r.status, r.code) == (403, "not_key_owner")
    assert (
        await wapi.call("DELETE", f"/v1/ssh-keys/{keyed['id']}", morg.token("admin"))
    ).status == 204


async def test_a_members_changes_are_audited_with_the_member_as_actor(
    wapi: Api, morg: MemberOrg
) -> None:
    alice = user_id()
    token = morg.token("developer", user=alice)
    key = await register(wapi, token)
    assert (await wapi.call("DELETE", f"/v1/ssh-keys/{key['id']}", token)).status == 204
    mine = [e for e in wapi.events if e.target == key["id"]]
    assert [e.action for e in mine] == ["api.ssh_key.create", "api.ssh_key.revoke"]
    for event in mine:
        assert event.actor == alice
        assert event.org_id == morg.id
        assert event.details["actor_type"] == "member"
        assert event.details["roles"] == ["developer"]


async def test_the_permissions_claim_is_honoured_and_foreign_permissions_ignored(
    wapi: Api, morg: MemberOrg
) -> None:
    token = morg.token("viewer", permissions=["ssh-key:write", "billing:admin", "api-key:read"])
    key = await register(wapi, token)
    assert (await wapi.call("GET", "/v1/api-keys", token)).status == 200
    r = await wapi.call("POST", "/v1/api-keys", token, json_body={"name": "x", "scopes": ["*"]})
    assert (r.status, r.code) == (403, "insufficient_permission")
    # ssh-key:write (not only :own): it may revoke a key someone else registered.
    other = await register(wapi, morg.token("owner"))
    assert (await wapi.call("DELETE", f"/v1/ssh-keys/{other['id']}", token)).status == 204
    assert key["created_by_type"] == "member"


async def test_an_admin_creates_api_keys_recorded_as_theirs_within_their_permissions(
    wapi: Api, morg: MemberOrg
) -> None:
    admin = user_id()
    r = await wapi.call(
        "POST",
        "/v1/api-keys",
        morg.token("admin", user=admin),
        json_body={"name": "deploy", "scopes": ["*"], "expires_in": "30d"},
    )
    assert r.status == 201, r.text
    assert (r.body["created_by"], r.body["created_by_type"]) == (admin, "member")
    listed = await wapi.call("GET", "/v1/api-keys", r.body["secret"])
    mine = next(k for k in listed.body["data"] if k["id"] == r.body["id"])
    assert (mine["created_by"], mine["created_by_type"]) == (admin, "member")
    # A role that holds api-key:* but not * cannot mint *.
    narrow = morg.token(None, permissions=["api-key:*"])
    r = await wapi.call("POST", "/v1/api-keys", narrow, json_body={"name": "x", "scopes": ["*"]})
    assert (r.status, r.code) == (403, "insufficient_permission")
    r = await wapi.call(
        "POST", "/v1/api-keys", narrow, json_body={"name": "x", "scopes": ["api-key:read"]}
    )
    assert r.status == 201, r.text


async def test_ssh_key_ids_in_other_orgs_stay_404_for_members_too(
    wapi: Api, morg: MemberOrg, pool: Any, issuer: Issuer
) -> None:
    other = await member_org(pool, issuer)
    theirs = await register(wapi, other.token("owner"))
    for method in ("GET", "PATCH", "DELETE"):
        body = {"name": "x"} if method == "PATCH" else None
        r = await wapi.call(
            method, f"/v1/ssh-keys/{theirs['id']}", morg.token("developer"), json_body=body
        )
        assert r.status == 404, (method, r.text)
    r = await wapi.call("GET", f"/v1/ssh-keys/{uuid.uuid4()}", morg.token("viewer"))
    assert r.status == 404


# --- the operator maps organizations with the CLI ----------------------------------------------


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTGW_")}
    env["RTGW_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


async def test_the_operator_maps_an_org_with_the_cli_and_the_keys_say_who_registered_them(
    wapi: Api, database_url: str, issuer: Issuer, tmp_path: Path
) -> None:
    slug, first, second = unique("cli"), workos_org_id(), workos_org_id()
    made = cli(database_url, "org", "create", slug, "--workos-org-id", first)
    assert made.returncode == 0, made.stderr
    assert first in made.stdout
    member = user_id()
    key = await register(wapi, issuer.token(member, first, role="developer"))
    assert key["created_by"] == member

    # One WorkOS organization maps to one organization only.
    taken = cli(database_url, "org", "create", unique("cli"), "--workos-org-id", first)
    assert taken.returncode == 1 and "already mapped" in taken.stderr
    bad = cli(database_url, "org", "update", slug, "--workos-org-id", "not an id!")
    assert bad.returncode == 1 and "WorkOS organization id" in bad.stderr
    assert cli(database_url, "org", "update", slug).returncode == 1

    # Remapped: tokens for the old WorkOS organization no longer get in.
    moved = cli(database_url, "org", "update", slug, "--workos-org-id", second)
    assert moved.returncode == 0 and second in moved.stdout, moved.stderr
    r = await wapi.call("GET", "/v1/ssh-keys", issuer.token(member, first, role="developer"))
    assert (r.status, r.code) == (401, "unknown_organization")
    r = await wapi.call("GET", "/v1/ssh-keys", issuer.token(member, second, role="developer"))
    assert r.status == 200

    # ssh-key list names who registered each key: the member, the CLI.
    pub = tmp_path / "id_ed25519.pub"
    pub.write_text(public_line() + "\n")
    added = cli(database_url, "ssh-key", "add", str(pub), "--org", slug, "--name", "by-cli")
    assert added.returncode == 0, added.stderr
    listed = cli(database_url, "ssh-key", "list", "--org", slug).stdout.splitlines()
    by_line = {line.split("\t")[4]: line for line in listed}
    assert by_line["laptop"].endswith(f"created by member:{member}")
    assert by_line["by-cli"].endswith("created by cli:cli")

    unmapped = cli(database_url, "org", "update", slug, "--no-workos-org-id")
    assert unmapped.returncode == 0 and "no WorkOS organization" in unmapped.stdout
    r = await wapi.call("GET", "/v1/ssh-keys", issuer.token(member, second, role="developer"))
    assert (r.status, r.code) == (401, "unknown_organization")
