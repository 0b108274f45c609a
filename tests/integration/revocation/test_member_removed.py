"""When someone leaves the organization, the keys they registered stop opening sandboxes, and
their live sessions end: WorkOS calls the webhook of a real gateway (``runtools-gateway serve``
with ``RTGW_WORKOS_*``), and real ``ssh`` sessions through it are watched. Two members, Alice
and Bob, registered their own keys through the API with their session tokens; Alice's removal
ends her session within 2 s and leaves Bob's running on the same upstream connection. Then
the organization's deletion disables it: Bob's session ends too, and logins are refused.
Lags are measured from the moment the webhook was answered."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant, run_db
from gateway.lab.user_keys import UserKey, make_key
from keystore import access, changes, orgs
from keystore import db as keystore_db
from tests.integration.api.workos_support import (
    ISSUER,
    WEBHOOK_SECRET,
    Delivery,
    Issuer,
    JwksServer,
    SigningKey,
    membership_deleted,
    organization_deleted,
    user_id,
    workos_org_id,
)
from tests.integration.revocation.support import (
    REVOCATION_DEADLINE,
    LiveSession,
    access_ended_line,
    ended_within,
    http,
    sql,
    wait_until,
)
from tests.integration.support import GatewayFactory, client_for


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with JwksServer([SigningKey.rsa()]) as server:
        yield server


@pytest.fixture
def workos_gateway(gateway_factory: GatewayFactory, jwks: JwksServer) -> GatewayProcess:
    gw: GatewayProcess = gateway_factory(
        {
            "RTGW_WORKOS_JWKS_URL": jwks.url,
            "RTGW_WORKOS_ISSUER": ISSUER,
            "RTGW_WORKOS_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
    )
    return gw


def deliver(port: int, delivery: Delivery) -> tuple[int, Any, float]:
    """POST the delivery to the gateway's webhook; (status, body, time.time() of the answer)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/webhooks/workos",
        data=delivery.body,
        headers=delivery.headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310 - http: only
            status, raw = int(reply.status), reply.read()
    except urllib.error.HTTPError as exc:
        status, raw = int(exc.code), exc.read()
    return status, json.loads(raw), time.time()


def register(port: int, token: str, key: UserKey, name: str) -> dict[str, Any]:
    status, body = http(
        "POST",
        port,
        "/v1/ssh-keys",
        token=token,
        body={"name": name, "public_key": key.public_line},
    )
    assert status == 201, body
    return dict(body)


def test_a_member_removed_in_workos_loses_their_live_session_and_others_keep_theirs(
    tenant: Tenant,
    workos_gateway: GatewayProcess,
    jwks: JwksServer,
    database_url: str,
    tmp_path: Path,
    workdir: Path,
) -> None:
    gw = workos_gateway
    mapped = workos_org_id()
    run_db(database_url, lambda c: orgs.set_workos_org_id(c, tenant.slug, mapped))
    issuer = Issuer(jwks.keys[0])
    alice, bob = user_id(), user_id()
    alice_key, bob_key = make_key(tmp_path, "alice"), make_key(tmp_path, "bob")
    as_alice = issuer.token(alice, mapped, role="developer")
    as_bob = issuer.token(bob, mapped, role="member")
    registered = register(gw.api_port, as_alice, alice_key, "alice laptop")
    assert (registered["created_by"], registered["created_by_type"]) == (alice, "member")
    register(gw.api_port, as_bob, bob_key, "bob laptop")

    client = client_for(gw, workdir)
    with (
        LiveSession(client, alice_key, tenant.sandbox_id) as alices,
        LiveSession(
            client,
            bob_key,
            tenant.sandbox_id,
            "echo started $SSH_CONNECTION; exec cat",
            stdin=True,
        ) as bobs,
    ):
        upstream_a = alices.wait_started()
        upstream_b = bobs.wait_started()
        assert upstream_a == upstream_b, (upstream_a, upstream_b)  # one shared upstream

        status, body, answered = deliver(gw.api_port, membership_deleted(mapped, alice))
        assert (status, body) == (200, {"received": True, "duplicate": False})

        lag = ended_within(alices, answered, REVOCATION_DEADLINE)
        assert lag <= REVOCATION_DEADLINE, f"Alice's session ended {lag:.3f} s after the webhook"
        assert alices.proc.returncode == 255, alices.err()
        line = access_ended_line(alices)
        assert f"your access to {tenant.sandbox_id} ended" in line and "was revoked" in line

        # Bob's session, on the same upstream connection, goes on.
        assert bobs.running, bobs.err()
        bobs.send(b"still-here\n")
        bobs.wait_output("still-here")
        assert "your access" not in bobs.err()

        # Alice can neither log in again nor register another key with her old token.
        again = client.ssh(alice_key, tenant.sandbox_id, "echo in", timeout=30)
        assert again.returncode == 255 and b"in" not in again.stdout
        status, body = http(
            "POST",
            gw.api_port,
            "/v1/ssh-keys",
            token=as_alice,
            body={"name": "sneaky", "public_key": make_key(tmp_path, "sneaky").public_line},
        )
        assert (status, body["error"]["code"]) == (401, "member_removed")

        # The audit trail says what happened, to the org's admins.
        as_admin = issuer.token(user_id(), mapped, role="admin")

        def removal_audited() -> Any:
            status, page = http(
                "GET",
                gw.api_port,
                "/v1/audit-events?action=workos.membership.deleted",
                token=as_admin,
            )
            return status == 200 and page["data"]

        [event] = wait_until("the removal in the audit trail", removal_audited, 10)
        assert (event["actor"], event["target"]) == ("workos", alice)
        assert event["details"]["revoked_keys"] == [registered["id"]]

        # Then WorkOS deletes the organization: disabled, Bob's session ends too.
        status, _, answered = deliver(gw.api_port, organization_deleted(mapped))
        assert status == 200
        lag = ended_within(bobs, answered, REVOCATION_DEADLINE)
        assert lag <= REVOCATION_DEADLINE, f"Bob's session ended {lag:.3f} s after the webhook"
        assert f"your access to {tenant.sandbox_id} ended" in access_ended_line(bobs)

    rows = sql(database_url, "SELECT disabled_at FROM organizations WHERE id = $1", tenant.org_id)
    assert rows[0]["disabled_at"] is not None
    refused = client.ssh(bob_key, tenant.sandbox_id, "echo in", timeout=30)
    assert refused.returncode == 255 and b"in" not in refused.stdout
    assert tenant.key is not None  # the tenant's own key, registered by the lab: refused too
    refused = client.ssh(tenant.key, tenant.sandbox_id, "echo in", timeout=30)
    assert refused.returncode == 255 and b"in" not in refused.stdout


def test_disabling_an_organization_notifies_like_a_delete_and_its_grants_end(
    tenant: Tenant, database_url: str
) -> None:
    """The trigger of migration 0003: one ``org`` notification when disabled_at changes, none
    for other updates of the organization; check_grants then reports org_disabled."""

    async def go() -> list[changes.AccessChange]:
        received: asyncio.Queue[str] = asyncio.Queue()
        listener = await keystore_db.connect_raw(database_url)
        await listener.add_listener(
            changes.CHANNEL, lambda _c, _p, _ch, payload: received.put_nowait(payload)
        )
        try:
            async with keystore_db.connect(database_url) as conn:
                await orgs.set_workos_org_id(conn, tenant.slug, workos_org_id())
                assert await orgs.disable_org(conn, tenant.org_id)
                assert not await orgs.disable_org(conn, tenant.org_id)  # already: no change
                [check] = await access.check_grants(
                    conn, [access.Grant(tenant.sandbox_id, tenant.org_id, tenant.key_id)]
                )
                assert check.reason == access.ORG_DISABLED
            seen: list[changes.AccessChange] = []
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    payload = await asyncio.wait_for(received.get(), 0.2)
                except TimeoutError:
                    continue
                change = changes.parse_change(payload)
                if change.org_id == tenant.org_id:
                    seen.append(change)
            return seen
        finally:
            await listener.close()

    seen = asyncio.run(go())
    assert [(c.kind, c.op, c.changed) for c in seen] == [("org", "update", ("disabled_at",))]
