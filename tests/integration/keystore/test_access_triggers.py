"""Migration 0002: every change that can end live access raises a notification on
``rtgw_access``, whoever writes it. Writes here are plain SQL, as another service would make."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from keystore import changes, ssh_keys
from keystore import db as keystore_db
from keystore.changes import AccessChange
from tests.integration.keystore.support import Inbox, Org, unique


def about(org: Org) -> Callable[[AccessChange], bool]:
    return lambda change: change.org_id == org.id


def assert_fresh(change: AccessChange) -> None:
    assert change.at is not None
    assert abs(time.time() - change.at) < 60  # the database's clock_timestamp, as epoch seconds


async def test_plain_sql_revoke_notifies_with_the_key(
    make_org: Any, pool: Any, inbox: Inbox
) -> None:
    org = await make_org()
    key_id, fingerprint = await org.add_key()
    await pool.execute("UPDATE ssh_keys SET revoked_at = now() WHERE id = $1", key_id)
    change, before, payload = await inbox.until(about(org))
    assert before == []
    assert change == AccessChange(
        kind="ssh_key",
        org_id=org.id,
        op="update",
        key_id=key_id,
        fingerprint=fingerprint,
        changed=("revoked_at",),
        at=change.at,
    )
    assert_fresh(change)
    assert len(payload.encode()) < 8000


async def test_keystore_revoke_notifies_too(make_org: Any, pool: Any, inbox: Inbox) -> None:
    org = await make_org()
    key_id, _ = await org.add_key()
    await ssh_keys.revoke_key(pool, org.id, str(key_id))
    change, _, _ = await inbox.until(about(org))
    assert (change.kind, change.key_id, change.changed) == ("ssh_key", key_id, ("revoked_at",))


async def test_key_delete_and_expiry_change_notify(make_org: Any, pool: Any, inbox: Inbox) -> None:
    org = await make_org()
    key_id, fingerprint = await org.add_key()
    await pool.execute(
        "UPDATE ssh_keys SET expires_at = now() + interval '1 hour' WHERE id = $1", key_id
    )
    change, _, _ = await inbox.until(about(org))
    assert (change.kind, change.op, change.key_id, change.changed) == (
        "ssh_key",
        "update",
        key_id,
        ("expires_at",),
    )
    await pool.execute("DELETE FROM ssh_keys WHERE id = $1", key_id)
    change, _, _ = await inbox.until(about(org))
    assert (change.kind, change.op, change.key_id, change.fingerprint) == (
        "ssh_key",
        "delete",
        key_id,
        fingerprint,
    )
    assert change.changed == ()


async def test_writes_that_cannot_narrow_access_stay_quiet(
    make_org: Any, pool: Any, inbox: Inbox
) -> None:
    org = await make_org()
    key_id, _ = await org.add_key()
    await ssh_keys.touch_last_used(pool, org.id, key_id)  # every login does this
    await pool.execute("UPDATE ssh_keys SET name = 'renamed' WHERE id = $1", key_id)
    await pool.execute("UPDATE sandboxes SET updated_at = now() WHERE id = $1", org.sandbox_id)
    # Same value again: not a change.
    await pool.execute("UPDATE sandboxes SET status = 'running' WHERE id = $1", org.sandbox_id)
    await pool.execute("UPDATE ssh_keys SET expires_at = NULL WHERE id = $1", key_id)
    async with pool.acquire() as conn:  # rolled back: never delivered
        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE ssh_keys SET revoked_at = now() WHERE id = $1", key_id)
        await tx.rollback()
    await pool.execute("UPDATE sandboxes SET status = 'stopped' WHERE id = $1", org.sandbox_id)
    change, before, _ = await inbox.until(about(org))
    assert before == []
    assert (change.kind, change.sandbox_id, change.changed) == (
        "sandbox",
        org.sandbox_id,
        ("status",),
    )


async def test_sandbox_stop_delete_and_target_change(
    make_org: Any, pool: Any, inbox: Inbox
) -> None:
    org = await make_org()
    other = await org.add_sandbox()
    await pool.execute("UPDATE sandboxes SET status = 'stopped' WHERE id = $1", org.sandbox_id)
    change, _, _ = await inbox.until(about(org))
    assert change == AccessChange(
        kind="sandbox",
        org_id=org.id,
        op="update",
        sandbox_id=org.sandbox_id,
        changed=("status",),
        at=change.at,
    )
    assert_fresh(change)
    await pool.execute(
        "UPDATE sandboxes SET upstream_port = 2200, login_user = 'root' WHERE id = $1", other
    )
    change, _, _ = await inbox.until(about(org))
    assert (change.sandbox_id, change.changed) == (other, ("upstream_port", "login_user"))
    await pool.execute("DELETE FROM sandboxes WHERE id = $1", org.sandbox_id)
    change, _, _ = await inbox.until(about(org))
    assert (change.kind, change.op, change.sandbox_id) == ("sandbox", "delete", org.sandbox_id)


async def test_sandbox_moved_to_another_org_names_the_old_org(
    make_org: Any, pool: Any, inbox: Inbox
) -> None:
    org, other = await make_org(), await make_org()
    await pool.execute(
        "UPDATE sandboxes SET org_id = $2, project_id = $3 WHERE id = $1",
        org.sandbox_id,
        other.id,
        other.project_id,
    )
    change, _, _ = await inbox.until(lambda c: c.sandbox_id == org.sandbox_id)
    assert (change.kind, change.org_id, change.changed) == ("sandbox", org.id, ("org_id",))


async def test_org_delete_notifies_once_for_its_keys_and_sandboxes(
    make_org: Any, pool: Any, inbox: Inbox
) -> None:
    org, control = await make_org(), await make_org()
    await org.add_key()
    await org.add_key()
    await org.add_sandbox()
    control_key, _ = await control.add_key()
    await pool.execute("DELETE FROM organizations WHERE id = $1", org.id)
    # A later change elsewhere: everything the delete raised has arrived before it.
    await pool.execute("UPDATE ssh_keys SET revoked_at = now() WHERE id = $1", control_key)
    _, before, _ = await inbox.until(lambda c: c.key_id == control_key)
    mine = [c for c in before if c.org_id == org.id]
    assert mine == [AccessChange(kind="org", org_id=org.id, op="delete", at=mine[0].at)]


async def test_payload_is_the_documented_json(make_org: Any, pool: Any, inbox: Inbox) -> None:
    org = await make_org()
    await pool.execute("UPDATE sandboxes SET status = 'stopped' WHERE id = $1", org.sandbox_id)
    _, _, payload = await inbox.until(about(org))
    data = json.loads(payload)
    assert set(data) == {"kind", "op", "org_id", "sandbox_id", "changed", "at"}
    assert data["org_id"] == str(org.id)
    assert isinstance(data["at"], float | int)


@pytest.mark.parametrize("table", ["ssh_keys", "sandboxes", "organizations"])
async def test_truncate_asks_for_a_full_recheck(scratch_database: str, table: str) -> None:
    box = Inbox()
    async with keystore_db.connect(scratch_database) as conn:
        await conn.add_listener(changes.CHANNEL, box.received)
        await conn.execute(f"TRUNCATE {table} CASCADE")
        change, _, _ = await box.until(lambda c: c.kind == "all")
    assert (change.op, change.org_id) == ("truncate", None)
    assert_fresh(change)


async def test_notify_payload_from_another_writer_parses(pool: Any, inbox: Inbox) -> None:
    sandbox_id = unique("sandbox")
    await pool.execute(
        "SELECT pg_notify($1, json_build_object('kind', 'sandbox', 'org_id', gen_random_uuid(),"
        " 'sandbox_id', $2::text)::text)",
        changes.CHANNEL,
        sandbox_id,
    )
    change, _, _ = await inbox.until(lambda c: c.sandbox_id == sandbox_id)
    assert change.op is None and change.at is None


async def test_registering_a_key_or_a_ca_notifies_so_caches_widen_at_once(
    make_org: Any, pool: Any, database_url: str
) -> None:
    """Migration 0005: inserts notify too (op "insert"), for gateways that cache access."""
    box = Inbox(inserts=True)
    conn = await keystore_db.connect_raw(database_url)
    await conn.add_listener(changes.CHANNEL, box.received)
    try:
        org = await make_org()
        key_id, fingerprint = await org.add_key()
        change, _, _ = await box.until(lambda c: c.key_id == key_id)
        assert (change.kind, change.op, change.org_id, change.fingerprint) == (
            "ssh_key",
            "insert",
            org.id,
            fingerprint,
        )
        ca_id = await pool.fetchval(
            "INSERT INTO ssh_cert_authorities (org_id, name, algorithm, bits, fingerprint, "
            "public_key) SELECT org_id, 'ca', algorithm, bits, fingerprint, public_key "
            "FROM ssh_keys WHERE id = $1 RETURNING id",
            key_id,
        )
        change, _, _ = await box.until(lambda c: c.key_id == ca_id)
        assert (change.kind, change.op, change.org_id) == ("cert_authority", "insert", org.id)
        await pool.execute(
            "INSERT INTO ssh_cert_revocations (org_id, ca_id, serial) VALUES ($1, $2, 5)",
            org.id,
            ca_id,
        )
        change, _, _ = await box.until(lambda c: c.key_id == ca_id)
        assert (change.kind, change.op, change.changed) == (
            "cert_authority",
            "update",
            ("revocations",),
        )
    finally:
        await conn.close()
