"""keystore.access: re-checking live grants in one query, scoped to the sandbox's organization;
and AuthorizedKey.expires_at from sandboxes.access_for."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from keystore import access, sandboxes, ssh_keys
from keystore.access import Grant


class CountingDb:
    """Wraps a pool and counts the statements sent: a re-check is one round trip."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.calls = 0

    async def fetch(self, *args: Any) -> Any:
        self.calls += 1
        return await self.pool.fetch(*args)


async def test_reports_exactly_the_invalid_grants(make_org: Any, pool: Any) -> None:
    org = await make_org()
    good_key, _ = await org.add_key()
    revoked_key, _ = await org.add_key()
    expired_key, _ = await org.add_key(expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    deleted_key, _ = await org.add_key()
    stopped = await org.add_sandbox()
    deleted_sandbox = await org.add_sandbox()
    moved = await org.add_sandbox()
    elsewhere = await make_org()
    gone = await make_org()
    gone_key, _ = await gone.add_key()

    await ssh_keys.revoke_key(pool, org.id, str(revoked_key))
    await pool.execute(
        "UPDATE ssh_keys SET expires_at = now() - interval '1 second' WHERE id = $1", expired_key
    )
    await pool.execute("DELETE FROM ssh_keys WHERE id = $1", deleted_key)
    await sandboxes.set_status(pool, org.id, stopped, "stopped")
    await pool.execute("DELETE FROM sandboxes WHERE id = $1", deleted_sandbox)
    await pool.execute(
        "UPDATE sandboxes SET org_id = $2, project_id = $3 WHERE id = $1",
        moved,
        elsewhere.id,
        elsewhere.project_id,
    )
    await pool.execute("DELETE FROM organizations WHERE id = $1", gone.id)

    valid = [
        Grant(org.sandbox_id, org.id, good_key),
        Grant(org.sandbox_id, org.id, good_key, "127.0.0.1", 2222, "dev"),
    ]
    expected = {
        Grant(org.sandbox_id, org.id, revoked_key): access.KEY_REVOKED,
        Grant(org.sandbox_id, org.id, expired_key): access.KEY_EXPIRED,
        Grant(org.sandbox_id, org.id, deleted_key): access.KEY_DELETED,
        Grant(org.sandbox_id, org.id, uuid.uuid4()): access.KEY_DELETED,
        Grant(stopped, org.id, good_key): access.SANDBOX_STOPPED,
        Grant(deleted_sandbox, org.id, good_key): access.SANDBOX_DELETED,
        Grant(moved, org.id, good_key): access.SANDBOX_MOVED,
        Grant(gone.sandbox_id, gone.id, gone_key): access.ORG_DELETED,
        Grant(org.sandbox_id, org.id, good_key, "127.0.0.2", 2222, "dev"): access.TARGET_CHANGED,
        Grant(org.sandbox_id, org.id, good_key, None, 22, None): access.TARGET_CHANGED,
        Grant(org.sandbox_id, org.id, good_key, None, None, "root"): access.TARGET_CHANGED,
    }
    grants = [*valid[:1], *expected, *valid[1:]]
    db = CountingDb(pool)
    invalid = await access.invalid_grants(db, grants)
    assert db.calls == 1
    assert [(c.grant, c.reason) for c in invalid] == list(expected.items())  # input order

    checks = await access.check_grants(pool, grants)
    assert [c.grant for c in checks] == grants
    assert [c.valid for c in checks] == [True] + [False] * len(expected) + [True]


async def test_a_key_never_counts_for_another_orgs_sandbox(make_org: Any) -> None:
    a, b = await make_org(), await make_org()
    a_key, _ = await a.add_key()
    b_key, _ = await b.add_key()
    checks = await access.check_grants(
        a.db,
        [
            Grant(a.sandbox_id, a.id, a_key),  # valid
            Grant(a.sandbox_id, a.id, b_key),  # b's key on a's sandbox, claimed for org a
            Grant(a.sandbox_id, b.id, b_key),  # b's key on a's sandbox, claimed for org b
            Grant(b.sandbox_id, a.id, a_key),  # a's key on b's sandbox
        ],
    )
    assert [c.reason for c in checks] == [
        None,
        access.KEY_DELETED,
        access.SANDBOX_MOVED,
        access.SANDBOX_MOVED,
    ]


async def test_key_expiry_is_reported_for_rescheduling(make_org: Any, pool: Any) -> None:
    org = await make_org()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    key_id, _ = await org.add_key(expires_at=later)
    (check,) = await access.check_grants(pool, [Grant(org.sandbox_id, org.id, key_id)])
    assert check.valid and check.key_expires_at == later
    assert await access.check_grants(pool, []) == []


async def test_access_for_carries_each_keys_expiry(make_org: Any, pool: Any) -> None:
    org = await make_org()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    forever, _ = await org.add_key()
    expiring, _ = await org.add_key(expires_at=later)
    found = await sandboxes.access_for(pool, org.sandbox_id)
    assert found is not None
    assert {k.id: k.expires_at for k in found.keys} == {forever: None, expiring: later}
