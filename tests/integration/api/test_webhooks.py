"""``POST /v1/webhooks/workos`` as WorkOS calls it: signed deliveries are recorded before the
answer and processed once; bad, stale and replayed signatures are refused; a member's removal
revokes the keys they registered (and only those) and stops their session token; an
organization's deletion disables it. (Live SSH sessions ending: tests/integration/revocation/
test_member_removed.py.)"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from keystore import access, sandboxes, workos
from keystore.access import Grant
from tests.integration.api.support import Api, public_line
from tests.integration.api.workos_support import (
    WEBHOOK_SECRET,
    Delivery,
    Issuer,
    JwksServer,
    MemberOrg,
    SigningKey,
    close_api,
    member_org,
    membership_deleted,
    organization_deleted,
    post_webhook,
    start_api,
    user_id,
    workos_org_id,
)


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with JwksServer([SigningKey.rsa()]) as server:
        yield server


@pytest.fixture(scope="module")
def issuer(jwks: JwksServer) -> Issuer:
    return Issuer(jwks.keys[0])


@pytest.fixture(scope="module")
async def wapi(pool: Any, jwks: JwksServer) -> AsyncIterator[Api]:
    server, api = await start_api(pool, jwks.url)
    yield api
    await close_api(server, api)


@pytest.fixture
async def morg(pool: Any, issuer: Issuer) -> MemberOrg:
    return await member_org(pool, issuer)


async def stored(pool: Any, event_id: str) -> Any:
    return await pool.fetchrow("SELECT * FROM workos_events WHERE id = $1", event_id)


async def processed(pool: Any, event_id: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        row = await stored(pool, event_id)
        if row is not None and row["processed_at"] is not None:
            return row
        assert time.monotonic() < deadline, f"event {event_id} not processed: {row}"
        await asyncio.sleep(0.05)


async def register(api: Api, token: str, name: str = "laptop") -> dict[str, Any]:
    r = await api.call(
        "POST", "/v1/ssh-keys", token, json_body={"name": name, "public_key": public_line()}
    )
    assert r.status == 201, r.text
    return dict(r.body)


async def active_ids(pool: Any, org: MemberOrg) -> set[str]:
    rows = await pool.fetch(
        "SELECT id FROM ssh_keys WHERE org_id = $1 AND revoked_at IS NULL", org.id
    )
    return {str(r["id"]) for r in rows}


# --- signatures --------------------------------------------------------------------------------


async def test_a_signed_delivery_is_recorded_before_the_answer_and_acknowledged(
    wapi: Api, pool: Any
) -> None:
    delivery = Delivery.of("user.created", {"id": user_id()})
    r = await post_webhook(wapi, delivery)
    assert (r.status, r.body) == (200, {"received": True, "duplicate": False})
    row = await stored(pool, delivery.event_id)
    assert row is not None and row["event"] == "user.created"
    assert json.loads(row["payload"])["data"] == json.loads(delivery.body)["data"]
    assert (await processed(pool, delivery.event_id))["outcome"] == "ignored"


def _bad(delivery: Delivery, header: str | None) -> Delivery:
    headers = {k: v for k, v in delivery.headers.items() if k != workos.SIGNATURE_HEADER}
    if header is not None:
        headers[workos.SIGNATURE_HEADER] = header
    return Delivery(delivery.body, headers)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("no header", "missing_signature"),
        ("not t=,v1=", "malformed_signature"),
        ("another secret", "invalid_signature"),
        ("body changed after signing", "invalid_signature"),
        ("signature of another timestamp", "invalid_signature"),
        ("181 s old", "stale_signature"),
        ("181 s ahead", "stale_signature"),
    ],
)
async def test_bad_and_stale_signatures_are_refused_and_nothing_is_recorded(
    wapi: Api, pool: Any, morg: MemberOrg, case: str, code: str
) -> None:
    member = user_id()
    await register(wapi, morg.token("developer", user=member))
    good = membership_deleted(morg.workos_id, member)
    now_ms = int(time.time() * 1000)
    _, _, v1 = good.headers[workos.SIGNATURE_HEADER].partition(", ")
    forged = {
        "no header": _bad(good, None),
        "not t=,v1=": _bad(good, "sha256=abc"),
        "another secret": membership_deleted(
            morg.workos_id, member, event_id=good.event_id, secret="whsec_other"
        ),
        "body changed after signing": Delivery(
            good.body.replace(member.encode(), user_id().encode()), good.headers
        ),
        "signature of another timestamp": _bad(good, f"t={now_ms + 1000}, {v1}"),
        "181 s old": membership_deleted(
            morg.workos_id, member, event_id=good.event_id, at_ms=now_ms - 181_000
        ),
        "181 s ahead": membership_deleted(
            morg.workos_id, member, event_id=good.event_id, at_ms=now_ms + 181_000
        ),
    }[case]
    r = await post_webhook(wapi, forged)
    assert (r.status, r.code) == (400, code), r.text
    assert await stored(pool, good.event_id) is None
    assert len(await active_ids(pool, morg)) == 1


async def test_a_replayed_delivery_is_acknowledged_but_processed_once(
    wapi: Api, pool: Any, morg: MemberOrg
) -> None:
    member = user_id()
    await register(wapi, morg.token("developer", user=member))
    delivery = membership_deleted(morg.workos_id, member)
    first = await post_webhook(wapi, delivery)
    assert first.body == {"received": True, "duplicate": False}
    row = await processed(pool, delivery.event_id)
    assert (row["outcome"], row["attempts"]) == ("revoked 1", 1)
    # The same bytes again, within the tolerance (a retry by WorkOS, or an attacker's replay).
    again = await post_webhook(wapi, delivery)
    assert (again.status, again.body) == (200, {"received": True, "duplicate": True})
    await asyncio.sleep(0.3)
    assert (await stored(pool, delivery.event_id))["attempts"] == 1
    audits = [e for e in wapi.events if e.details.get("event_id") == delivery.event_id]
    assert len(audits) == 1


async def test_webhooks_without_a_secret_answer_404(api: Api) -> None:
    r = await post_webhook(api, membership_deleted(workos_org_id(), user_id()))
    assert (r.status, r.code) == (404, "not_configured")


async def test_a_signed_body_that_is_not_an_event_is_refused(wapi: Api) -> None:
    body = b'{"hello": "world"}'
    headers = {
        "Content-Type": "application/json",
        workos.SIGNATURE_HEADER: workos.sign(body, WEBHOOK_SECRET),
    }
    r = await post_webhook(wapi, Delivery(body, headers))
    assert (r.status, r.code) == (400, "invalid_event")


# --- what events do ----------------------------------------------------------------------------


async def test_a_members_removal_revokes_exactly_the_keys_they_registered_in_that_org(
    wapi: Api, pool: Any, morg: MemberOrg, issuer: Issuer
) -> None:
    leaver, stayer = user_id(), user_id()
    gone = [await register(wapi, morg.token("developer", user=leaver), f"k{i}") for i in range(2)]
    kept = await register(wapi, morg.token("developer", user=stayer))
    api_token, _ = await morg.org.api_key(["ssh-key:*"])
    automation = await register(wapi, api_token, "ci")
    # The same person in another organization keeps their keys there.
    elsewhere = await member_org(pool, issuer)
    theirs = await register(wapi, elsewhere.token("developer", user=leaver))

    delivery = membership_deleted(morg.workos_id, leaver)
    assert (await post_webhook(wapi, delivery)).status == 200
    assert (await processed(pool, delivery.event_id))["outcome"] == "revoked 2"

    assert await active_ids(pool, morg) == {kept["id"], automation["id"]}
    assert await active_ids(pool, elsewhere) == {theirs["id"]}
    audit = next(e for e in wapi.events if e.details.get("event_id") == delivery.event_id)
    assert (audit.action, audit.actor, audit.target, audit.org_id) == (
        "workos.membership.deleted",
        "workos",
        leaver,
        morg.id,
    )
    assert sorted(audit.details["revoked_keys"]) == sorted(k["id"] for k in gone)


async def test_a_removed_members_token_can_no_longer_register_keys(
    wapi: Api, pool: Any, morg: MemberOrg
) -> None:
    leaver = user_id()
    token = morg.token("developer", user=leaver, iat=int(time.time()) - 5)
    await register(wapi, token)
    delivery = membership_deleted(morg.workos_id, leaver)
    await post_webhook(wapi, delivery)
    await processed(pool, delivery.event_id)
    r = await wapi.call(
        "POST", "/v1/ssh-keys", token, json_body={"name": "again", "public_key": public_line()}
    )
    assert (r.status, r.code) == (401, "member_removed")
    assert (await wapi.call("GET", "/v1/ssh-keys", token)).code == "member_removed"
    assert await active_ids(pool, morg) == set()
    # Invited back later: a token issued after the removal works again.
    await asyncio.sleep(1.1)
    fresh = morg.token("developer", user=leaver, iat=int(time.time()) + 1)
    await register(wapi, fresh)


async def test_an_organizations_deletion_disables_it(wapi: Api, pool: Any, morg: MemberOrg) -> None:
    api_token, _ = await morg.org.api_key(["*"])
    member = morg.token("owner")
    key = await register(wapi, member)
    sandbox_id = f"sandbox-{morg.org.slug}"
    project = await pool.fetchval(
        "SELECT id FROM projects WHERE org_id = $1 AND is_default", morg.id
    )
    await sandboxes.add_sandbox(
        pool,
        sandbox_id=sandbox_id,
        org_id=morg.id,
        project_id=project,
        upstream_host="127.0.0.1",
        upstream_port=22,
        login_user="dev",
        host_keys=[public_line().rsplit(" ", 1)[0]],
    )
    before = await sandboxes.access_for(pool, sandbox_id)
    assert before is not None and len(before.keys) == 1

    delivery = organization_deleted(morg.workos_id)
    assert (await post_webhook(wapi, delivery)).status == 200
    assert (await processed(pool, delivery.event_id))["outcome"] == "disabled"

    for token, code in [(api_token, "organization_disabled"), (member, "organization_disabled")]:
        r = await wapi.call("GET", "/v1/ssh-keys", token)
        assert (r.status, r.code) == (401, code)
    after = await sandboxes.access_for(pool, sandbox_id)
    assert after is not None and after.keys == ()
    [check] = await access.check_grants(pool, [Grant(sandbox_id, morg.id, before.keys[0].id)])
    assert check.reason == access.ORG_DISABLED
    assert key["id"] in await active_ids(pool, morg)  # keys are kept, the org is what is off
    # A second delivery of the deletion (another event id) changes nothing.
    again = organization_deleted(morg.workos_id)
    await post_webhook(wapi, again)
    assert (await processed(pool, again.event_id))["outcome"] == "already_disabled"


async def test_events_for_organizations_this_gateway_does_not_know_are_recorded_and_ignored(
    wapi: Api, pool: Any
) -> None:
    for delivery in (
        membership_deleted(workos_org_id(), user_id()),
        organization_deleted(workos_org_id()),
    ):
        assert (await post_webhook(wapi, delivery)).status == 200
        assert (await processed(pool, delivery.event_id))["outcome"] == "unknown_organization"


async def test_an_event_recorded_before_a_crash_is_processed_at_the_next_start(
    pool: Any, morg: MemberOrg, jwks: JwksServer
) -> None:
    """Recorded, acknowledged, then the process died before applying it: the next start
    applies it."""
    member = user_id()
    server, api = await start_api(pool, jwks.url)
    try:
        await register(api, morg.token("developer", user=member))
    finally:
        await close_api(server, api)
    delivery = membership_deleted(morg.workos_id, member)
    event = workos.parse_event(delivery.body)
    await pool.execute(
        "INSERT INTO workos_events (id, event, payload) VALUES ($1, $2, $3::jsonb)",
        event.id,
        event.event,
        delivery.body.decode(),
    )
    server, api = await start_api(pool, jwks.url)
    try:
        assert (await processed(pool, event.id))["outcome"] == "revoked 1"
        assert await active_ids(pool, morg) == set()
    finally:
        await close_api(server, api)
