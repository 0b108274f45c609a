"""An organization registers the SSH user certificate authorities whose certificates may open
its sandboxes, and revokes certificates they signed by key id or serial: the key API
in-process over the session's PostgreSQL, API keys and WorkOS member tokens."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncssh
import pytest

from tests.integration.api.support import MAX_BODY, Api, ApiOrg, Reply, make_org
from tests.integration.api.workos_support import (
    Issuer,
    JwksServer,
    MemberOrg,
    SigningKey,
    close_api,
    member_org,
    start_api,
    user_id,
)

BASE = "/v1/ssh-cert-authorities"


def ca_line(comment: str = "ci-signer") -> str:
    """A fresh CA public key line, as ``ssh-keygen -f ca`` writes ca.pub."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    return key.export_public_key("openssh").decode().strip()


def certificate_line() -> str:
    ca = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_user_certificate(user, "alice", principals=["sandbox-abc"], serial=7)
    return cert.export_certificate("openssh").decode().strip()


async def register(
    api: Api, token: str, line: str | None = None, *, name: str = "ci", **extra: Any
) -> Reply:
    body = {"name": name, "public_key": line or ca_line(), **extra}
    return await api.call("POST", BASE, token, json_body=body)


async def count_cas(pool: Any, org: ApiOrg) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM ssh_cert_authorities WHERE org_id = $1", org.id)
    )


async def count_revocations(pool: Any, org: ApiOrg) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM ssh_cert_revocations WHERE org_id = $1", org.id)
    )


def events(api: Api, action: str, target: str | None = None) -> list[Any]:
    return [e for e in api.events if e.action == action and (target is None or e.target == target)]


# --- register, list, read, update, revoke ------------------------------------------------------


async def test_an_admin_registers_a_ca_then_lists_reads_updates_and_revokes_it(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    line = ca_line("ci-signer")
    key = asyncssh.import_public_key(line)
    r = await register(api, admin, "\n" + line + "\n", name=" CI signer ", principals=["deploy"])
    assert r.status == 201, r.text
    ca = r.body
    assert r.headers["Location"] == f"{BASE}/{ca['id']}"
    assert ca["name"] == "CI signer"
    assert (ca["type"], ca["bits"]) == ("ssh-ed25519", 256)
    assert ca["fingerprint"] == key.get_fingerprint("sha256")
    assert ca["public_key"] == " ".join(line.split()[:2])
    assert ca["comment"] == "ci-signer"
    assert ca["principals"] == ["deploy"]
    assert ca["created_by_type"] == "api_key"
    [created] = events(api, "api.ssh_ca.create", ca["id"])
    assert created.result == "ok" and created.details["fingerprint"] == ca["fingerprint"]

    listed = await api.call("GET", BASE, admin)
    assert listed.status == 200
    assert [c["id"] for c in listed.body["data"]] == [ca["id"]]
    assert listed.body["next_cursor"] is None
    got = await api.call("GET", f"{BASE}/{ca['id']}", admin)
    assert got.status == 200 and got.body == ca

    patched = await api.call(
        "PATCH",
        f"{BASE}/{ca['id']}",
        admin,
        json_body={"principals": ["team-backend", "deploy", "team-backend"], "name": "signer"},
    )
    assert patched.status == 200, patched.text
    assert patched.body["principals"] == ["team-backend", "deploy"]
    assert patched.body["name"] == "signer"
    assert patched.body["fingerprint"] == ca["fingerprint"]
    cleared = await api.call("PATCH", f"{BASE}/{ca['id']}", admin, json_body={"principals": []})
    assert (cleared.status, cleared.body["principals"], cleared.body["name"]) == (200, [], "signer")
    assert len(events(api, "api.ssh_ca.update", ca["id"])) == 2

    revoked = await api.call("DELETE", f"{BASE}/{ca['id']}", admin)
    assert revoked.status == 204, revoked.text
    assert events(api, "api.ssh_ca.revoke", ca["id"])
    assert (await api.call("GET", f"{BASE}/{ca['id']}", admin)).status == 404
    assert (await api.call("GET", BASE, admin)).body["data"] == []
    again = await api.call("DELETE", f"{BASE}/{ca['id']}", admin)
    assert (again.status, again.code) == (404, "not_found")
    assert await pool.fetchval(
        "SELECT revoked_at IS NOT NULL FROM ssh_cert_authorities WHERE org_id = $1 AND id = $2",
        org.id,
        uuid.UUID(ca["id"]),
    )


async def test_the_list_pages_with_a_cursor(api: Api, org: ApiOrg, admin: str) -> None:
    ids = [(await register(api, admin, name=f"ca {i}")).body["id"] for i in range(3)]
    first = await api.call("GET", f"{BASE}?limit=2", admin)
    assert [c["id"] for c in first.body["data"]] == ids[:2]
    rest = await api.call("GET", f"{BASE}?limit=2&cursor={first.body['next_cursor']}", admin)
    assert [c["id"] for c in rest.body["data"]] == ids[2:]
    assert rest.body["next_cursor"] is None


# --- revoking certificates ---------------------------------------------------------------------


async def test_certificates_are_revoked_by_key_id_and_by_serial_and_can_be_unrevoked(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    ca = (await register(api, admin)).body
    path = f"{BASE}/{ca['id']}/revocations"
    by_key_id = await api.call(
        "POST", path, admin, json_body={"key_id": "alice@laptop", "reason": " laptop stolen "}
    )
    assert by_key_id.status == 201, by_key_id.text
    assert by_key_id.headers["Location"] == f"{path}/{by_key_id.body['id']}"
    assert by_key_id.body["key_id"] == "alice@laptop"
    assert by_key_id.body["serial"] is None
    assert by_key_id.body["reason"] == "laptop stolen"
    assert by_key_id.body["ca_id"] == ca["id"]
    assert by_key_id.body["created_by_type"] == "api_key"
    by_serial = await api.call("POST", path, admin, json_body={"serial": 2**64 - 1})
    assert by_serial.status == 201, by_serial.text
    assert (by_serial.body["serial"], by_serial.body["key_id"]) == (2**64 - 1, None)
    assert len(events(api, "api.ssh_ca.revoke_certificate", ca["id"])) == 2

    listed = await api.call("GET", path, admin)
    assert listed.status == 200
    assert [r["id"] for r in listed.body["data"]] == [by_key_id.body["id"], by_serial.body["id"]]

    # The same key id or serial twice: 409 naming the revocation, nothing written.
    for body, existing in (
        ({"key_id": "alice@laptop"}, by_key_id.body["id"]),
        ({"serial": 2**64 - 1, "reason": "again"}, by_serial.body["id"]),
    ):
        twice = await api.call("POST", path, admin, json_body=body)
        assert (twice.status, twice.code) == (409, "already_revoked"), twice.text
        assert twice.body["error"]["existing_id"] == existing
    assert await count_revocations(pool, org) == 2

    # Un-revoke the key id: it can be revoked again afterwards.
    gone = await api.call("DELETE", f"{path}/{by_key_id.body['id']}", admin)
    assert gone.status == 204, gone.text
    assert events(api, "api.ssh_ca.unrevoke_certificate", ca["id"])
    assert [r["id"] for r in (await api.call("GET", path, admin)).body["data"]] == [
        by_serial.body["id"]
    ]
    assert (await api.call("DELETE", f"{path}/{by_key_id.body['id']}", admin)).status == 404
    assert (await api.call("DELETE", f"{path}/not-a-uuid", admin)).status == 404
    assert (await api.call("POST", path, admin, json_body={"key_id": "alice@laptop"})).status == 201


async def test_a_revoked_ca_takes_no_new_revocations(api: Api, admin: str) -> None:
    ca = (await register(api, admin)).body
    assert (await api.call("DELETE", f"{BASE}/{ca['id']}", admin)).status == 204
    path = f"{BASE}/{ca['id']}/revocations"
    r = await api.call("POST", path, admin, json_body={"serial": 1})
    assert (r.status, r.code) == (404, "not_found")
    assert (await api.call("GET", path, admin)).status == 404


# --- registering the same key twice ------------------------------------------------------------


async def test_a_ca_already_registered_is_a_conflict_naming_it(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    line = ca_line()
    first = await register(api, admin, line, name="first")
    assert first.status == 201
    second = await register(api, admin, line.rsplit(" ", 1)[0] + " other-comment", name="second")
    assert (second.status, second.code) == (409, "ca_already_registered"), second.text
    assert second.body["error"]["existing_id"] == first.body["id"]
    assert "'first'" in second.body["error"]["message"]
    assert await count_cas(pool, org) == 1
    refused = events(api, "api.ssh_ca.create", first.body["id"])
    assert [e.result for e in refused] == ["ok", "refused"]
    # Another organization may register the same CA key: uniqueness is per organization.
    other = await make_org(pool)
    other_admin, _ = await other.api_key(["*"])
    assert (await register(api, other_admin, line)).status == 201


async def test_a_revoked_ca_can_be_registered_again_and_keeps_its_revoked_certificates(
    api: Api, org: ApiOrg, admin: str
) -> None:
    line = ca_line()
    old = (await register(api, admin, line)).body
    path = f"{BASE}/{old['id']}/revocations"
    await api.call("POST", path, admin, json_body={"key_id": "leaked", "reason": "leaked"})
    await api.call("POST", path, admin, json_body={"serial": 99})
    assert (await api.call("DELETE", f"{BASE}/{old['id']}", admin)).status == 204

    new = await register(api, admin, line, name="ci again")
    assert new.status == 201, new.text
    assert new.body["id"] != old["id"]
    assert new.body["fingerprint"] == old["fingerprint"]
    carried = (await api.call("GET", f"{BASE}/{new.body['id']}/revocations", admin)).body["data"]
    assert {(r["key_id"], r["serial"], r["reason"]) for r in carried} == {
        ("leaked", None, "leaked"),
        (None, 99, None),
    }
    assert {r["ca_id"] for r in carried} == {new.body["id"]}


# --- refused input: 400, nothing written -------------------------------------------------------


def _private_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh").decode()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"public_key": "ssh-ed25519 AAAAnot-a-key"}, "not_a_public_key"),
        ({"public_key": "hello"}, "not_a_public_key"),
        ({"public_key": "CERT"}, "certificate_not_supported"),
        ({"public_key": "PRIVATE"}, "private_key"),
        ({"principals": [f"p{i}" for i in range(33)]}, "too_many_principals"),
        ({"principals": ["a,b"]}, "invalid_principal"),
        ({"principals": ["two words"]}, "invalid_principal"),
        ({"principals": [""]}, "invalid_principal"),
        ({"principals": [7]}, "invalid_principal"),
        ({"principals": ["sandbox-abc"]}, "principal_is_sandbox_id"),
        ({"principals": "deploy"}, "invalid_type"),
        ({"name": ""}, "invalid_name"),
        ({"name": "x" * 201}, "invalid_name"),
        ({"name": None}, "invalid_type"),
        ({"owner": "me"}, "unknown_field"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_a_ca_that_cannot_be_registered_is_refused_with_400_and_nothing_is_written(
    api: Api, org: ApiOrg, admin: str, pool: Any, body: dict[str, Any], code: str
) -> None:
    sent: dict[str, Any] = {"name": "ci", "public_key": ca_line(), **body}
    if sent["public_key"] == "CERT":
        sent["public_key"] = certificate_line()
    elif sent["public_key"] == "PRIVATE":
        sent["public_key"] = _private_key()
    r = await api.call("POST", BASE, admin, json_body=sent)
    assert (r.status, r.code) == (400, code), r.text
    assert "BEGIN OPENSSH" not in r.text
    assert await count_cas(pool, org) == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"key_id": "alice", "serial": 1}, "key_id_or_serial"),
        ({}, "key_id_or_serial"),
        ({"reason": "why"}, "key_id_or_serial"),
        ({"serial": -1}, "invalid_serial"),
        ({"serial": 2**64}, "invalid_serial"),
        ({"serial": "5"}, "invalid_type"),
        ({"serial": True}, "invalid_type"),
        ({"serial": 1.5}, "invalid_type"),
        ({"key_id": ""}, "invalid_key_id"),
        ({"key_id": "k" * 1025}, "invalid_key_id"),
        ({"key_id": "esc\x1b[31m"}, "invalid_key_id"),
        ({"key_id": "alice", "reason": "r" * 501}, "invalid_reason"),
        ({"key_id": "alice", "cert": "x"}, "unknown_field"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_a_revocation_that_names_no_single_certificate_is_refused_with_400(
    api: Api, org: ApiOrg, admin: str, pool: Any, body: dict[str, Any], code: str
) -> None:
    ca = (await register(api, admin)).body
    r = await api.call("POST", f"{BASE}/{ca['id']}/revocations", admin, json_body=body)
    assert (r.status, r.code) == (400, code), r.text
    assert await count_revocations(pool, org) == 0


async def test_malformed_and_oversized_bodies_are_refused_like_on_every_route(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    json_header = {"Content-Type": "application/json"}
    bad = await api.call("POST", BASE, admin, data=b'{"name": "ci", ', headers=json_header)
    assert (bad.status, bad.code) == (400, "invalid_json")
    not_object = await api.call("POST", BASE, admin, data=b"[]", headers=json_header)
    assert (not_object.status, not_object.code) == (400, "invalid_json")
    no_body = await api.call("POST", BASE, admin)
    assert (no_body.status, no_body.code) == (400, "body_required")
    form = await api.call(
        "POST", BASE, admin, data=b"name=ci", headers={"Content-Type": "text/plain"}
    )
    assert form.status == 415
    big = await register(api, admin, name="x" * (MAX_BODY + 1))
    assert (big.status, big.code) == (413, "payload_too_large")
    ca = (await register(api, admin)).body
    empty = await api.call("PATCH", f"{BASE}/{ca['id']}", admin, json_body={})
    assert (empty.status, empty.code) == (400, "nothing_to_update")
    assert await count_cas(pool, org) == 1


# --- organizations stay apart ------------------------------------------------------------------


async def test_another_organizations_ca_is_invisible_exactly_like_an_unknown_id(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    theirs = (await register(api, admin, name="org A's CA")).body
    revoked = await api.call(
        "POST", f"{BASE}/{theirs['id']}/revocations", admin, json_body={"key_id": "alice"}
    )
    rid = revoked.body["id"]
    other = await make_org(pool)
    b_admin, _ = await other.api_key(["*"], name="org B admin")
    mine = (await register(api, b_admin, name="org B's CA")).body

    unknown = str(uuid.uuid4())
    attempts: list[tuple[str, str, Any]] = [
        ("GET", f"{BASE}/{{ca}}", None),
        ("PATCH", f"{BASE}/{{ca}}", {"principals": ["pwned"]}),
        ("DELETE", f"{BASE}/{{ca}}", None),
        ("POST", f"{BASE}/{{ca}}/revocations", {"serial": 1}),
        ("GET", f"{BASE}/{{ca}}/revocations", None),
        ("DELETE", f"{BASE}/{{ca}}/revocations/{{rid}}", None),
    ]
    for method, template, body in attempts:
        foreign = await api.call(
            method, template.format(ca=theirs["id"], rid=rid), b_admin, json_body=body
        )
        missing = await api.call(
            method, template.format(ca=unknown, rid=uuid.uuid4()), b_admin, json_body=body
        )
        assert foreign.status == 404, (method, template, foreign.text)
        assert (foreign.status, foreign.body) == (missing.status, missing.body), (method, template)
    # Org B's own CA id with org A's revocation id: still nothing.
    cross = await api.call("DELETE", f"{BASE}/{mine['id']}/revocations/{rid}", b_admin)
    assert cross.status == 404

    assert [c["id"] for c in (await api.call("GET", BASE, b_admin)).body["data"]] == [mine["id"]]
    assert [c["id"] for c in (await api.call("GET", BASE, admin)).body["data"]] == [theirs["id"]]
    # Org A's CA and its revocation are untouched.
    still = await api.call("GET", f"{BASE}/{theirs['id']}", admin)
    assert (still.status, still.body["principals"]) == (200, [])
    listed = await api.call("GET", f"{BASE}/{theirs['id']}/revocations", admin)
    assert [r["id"] for r in listed.body["data"]] == [rid]
    assert await count_revocations(pool, org) == 1


# --- who may write -----------------------------------------------------------------------------


async def test_an_ssh_key_read_api_key_reads_cas_but_cannot_write(
    api: Api, org: ApiOrg, admin: str, pool: Any
) -> None:
    ca = (await register(api, admin)).body
    rid = (
        await api.call("POST", f"{BASE}/{ca['id']}/revocations", admin, json_body={"serial": 3})
    ).body["id"]
    reader, _ = await org.api_key(["ssh-key:read"], name="reader")
    assert (await api.call("GET", BASE, reader)).status == 200
    assert (await api.call("GET", f"{BASE}/{ca['id']}", reader)).status == 200
    assert (await api.call("GET", f"{BASE}/{ca['id']}/revocations", reader)).status == 200
    writes: list[tuple[str, str, Any]] = [
        ("POST", BASE, {"name": "mine", "public_key": ca_line()}),
        ("PATCH", f"{BASE}/{ca['id']}", {"principals": ["x"]}),
        ("DELETE", f"{BASE}/{ca['id']}", None),
        ("POST", f"{BASE}/{ca['id']}/revocations", {"serial": 4}),
        ("DELETE", f"{BASE}/{ca['id']}/revocations/{rid}", None),
    ]
    for method, path, body in writes:
        r = await api.call(method, path, reader, json_body=body)
        assert (r.status, r.code) == (403, "insufficient_scope"), (method, path, r.text)
    assert await count_cas(pool, org) == 1
    assert await count_revocations(pool, org) == 1
    # An ssh-key:write key (no read) may write.
    writer, _ = await org.api_key(["ssh-key:write"], name="writer")
    assert (await register(api, writer)).status == 201
    assert (await api.call("GET", BASE, writer)).status == 403


# --- members signed in through WorkOS ----------------------------------------------------------


@pytest.fixture(scope="module")
def jwks() -> Iterator[tuple[JwksServer, Issuer]]:
    key = SigningKey.rsa("ca-tests")
    with JwksServer([key]) as server:
        yield server, Issuer(key)


@pytest.fixture(scope="module")
async def wapi(pool: Any, jwks: tuple[JwksServer, Issuer]) -> AsyncIterator[Api]:
    server, api = await start_api(pool, jwks[0].url)
    yield api
    await close_api(server, api)


@pytest.fixture
async def morg(pool: Any, jwks: tuple[JwksServer, Issuer]) -> MemberOrg:
    return await member_org(pool, jwks[1])


@pytest.mark.parametrize("role", ["developer", "member", "viewer"])
async def test_a_member_who_may_only_manage_their_own_keys_cannot_touch_a_ca(
    wapi: Api, morg: MemberOrg, pool: Any, role: str
) -> None:
    owner = morg.token("owner")
    ca = (await register(wapi, owner)).body
    rid = (
        await wapi.call("POST", f"{BASE}/{ca['id']}/revocations", owner, json_body={"serial": 1})
    ).body["id"]
    token = morg.token(role)
    # Reading is fine: the CA is listed like the organization's SSH keys are.
    assert (await wapi.call("GET", BASE, token)).status == 200
    assert (await wapi.call("GET", f"{BASE}/{ca['id']}/revocations", token)).status == 200
    writes: list[tuple[str, str, Any]] = [
        ("POST", BASE, {"name": "mine", "public_key": ca_line()}),
        ("PATCH", f"{BASE}/{ca['id']}", {"principals": ["x"]}),
        ("DELETE", f"{BASE}/{ca['id']}", None),
        ("POST", f"{BASE}/{ca['id']}/revocations", {"serial": 2}),
        ("DELETE", f"{BASE}/{ca['id']}/revocations/{rid}", None),
    ]
    for method, path, body in writes:
        r = await wapi.call(method, path, token, json_body=body)
        assert (r.status, r.code) == (403, "insufficient_permission"), (method, path, r.text)
        assert "WWW-Authenticate" in r.headers
    assert await count_cas(pool, morg.org) == 1
    assert await count_revocations(pool, morg.org) == 1
    unchanged = (await wapi.call("GET", f"{BASE}/{ca['id']}", owner)).body
    assert unchanged["principals"] == []


@pytest.mark.parametrize("role", ["admin", "owner"])
async def test_an_admin_or_owner_member_registers_a_ca_recorded_as_theirs(
    wapi: Api, morg: MemberOrg, role: str
) -> None:
    alice = user_id()
    token = morg.token(role, user=alice)
    r = await register(wapi, token, principals=["deploy"])
    assert r.status == 201, r.text
    assert (r.body["created_by"], r.body["created_by_type"]) == (alice, "member")
    [event] = events(wapi, "api.ssh_ca.create", r.body["id"])
    assert event.actor == alice and event.details["actor_type"] == "member"
    revoked = await wapi.call(
        "POST", f"{BASE}/{r.body['id']}/revocations", token, json_body={"key_id": "bob"}
    )
    assert revoked.status == 201, revoked.text
    assert revoked.body["created_by"] == alice
    assert (await wapi.call("DELETE", f"{BASE}/{r.body['id']}", token)).status == 204
