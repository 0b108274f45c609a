"""keystore.access: re-checking live grants in one query, scoped to the sandbox's organization;
and AuthorizedKey.expires_at from sandboxes.access_for."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncssh

from keystore import access, sandboxes, ssh_keys
from keystore.access import Grant
from keystore.keys import parse_public_key


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


async def _add_ca(pool: Any, org_id: uuid.UUID, principals: list[str] | None = None) -> Any:
    key = asyncssh.generate_private_key("ssh-ed25519")
    parsed = parse_public_key(key.export_public_key().decode())
    return await pool.fetchval(
        "INSERT INTO ssh_cert_authorities (org_id, name, algorithm, bits, fingerprint, "
        "public_key, principals) VALUES ($1, 'ca', $2, $3, $4, $5, $6) RETURNING id",
        org_id,
        parsed.algorithm,
        parsed.bits,
        parsed.fingerprint,
        parsed.public_key,
        principals or [],
    )


def _cert_grant(
    org: Any,
    ca_id: Any,
    key_id: str = "alice",
    serial: int = 1,
    principals: tuple[str, ...] | None = None,
) -> Grant:
    return Grant(
        org.sandbox_id,
        org.id,
        ca_id,
        credential=access.CERTIFICATE,
        cert_key_id=key_id,
        cert_serial=serial,
        cert_principals=principals,
    )


async def test_certificate_grants_end_with_their_ca_or_their_revocation(
    make_org: Any, pool: Any
) -> None:
    org = await make_org()
    live = await _add_ca(pool, org.id)
    revoked_ca = await _add_ca(pool, org.id)
    deleted_ca = await _add_ca(pool, org.id)
    await pool.execute(
        "UPDATE ssh_cert_authorities SET revoked_at = now() WHERE id = $1", revoked_ca
    )
    await pool.execute("DELETE FROM ssh_cert_authorities WHERE id = $1", deleted_ca)
    await pool.execute(
        "INSERT INTO ssh_cert_revocations (org_id, ca_id, cert_key_id) VALUES ($1, $2, 'mallory')",
        org.id,
        live,
    )
    await pool.execute(
        "INSERT INTO ssh_cert_revocations (org_id, ca_id, serial) "
        "VALUES ($1, $2, 18446744073709551615)",
        org.id,
        live,
    )
    grants = {
        _cert_grant(org, live): None,
        _cert_grant(org, live, "mallory", 2): access.CERTIFICATE_REVOKED,
        _cert_grant(org, live, "eve", 2**64 - 1): access.CERTIFICATE_REVOKED,
        _cert_grant(org, revoked_ca): access.CA_REVOKED,
        _cert_grant(org, deleted_ca): access.CA_DELETED,
        # A CA's id is not a key's: the same id as a plain-key grant names no key.
        Grant(org.sandbox_id, org.id, live): access.KEY_DELETED,
    }
    checks = await access.check_grants(pool, list(grants))
    assert [c.reason for c in checks] == list(grants.values())


async def test_a_ca_never_counts_for_another_orgs_sandbox(make_org: Any, pool: Any) -> None:
    a, b = await make_org(), await make_org()
    a_ca = await _add_ca(pool, a.id)
    checks = await access.check_grants(
        pool,
        [
            _cert_grant(a, a_ca),  # valid
            Grant(
                b.sandbox_id,
                b.id,
                a_ca,
                credential=access.CERTIFICATE,
                cert_key_id="x",
                cert_serial=1,
            ),  # a's CA claimed for org b's sandbox
            _cert_grant(b, a_ca),  # the same, via the helper
        ],
    )
    assert [c.reason for c in checks] == [None, access.CA_DELETED, access.CA_DELETED]
    found = await sandboxes.access_for(pool, b.sandbox_id)
    assert found is not None and found.cas == ()
    mine = await sandboxes.access_for(pool, a.sandbox_id)
    assert mine is not None and [ca.id for ca in mine.cas] == [a_ca]


async def test_access_for_carries_each_cas_principals_and_revocations(
    make_org: Any, pool: Any
) -> None:
    org = await make_org()
    ca_id = await _add_ca(pool, org.id, ["team-infra"])
    await pool.execute(
        "INSERT INTO ssh_cert_revocations (org_id, ca_id, cert_key_id) VALUES ($1, $2, 'gone')",
        org.id,
        ca_id,
    )
    await pool.execute(
        "INSERT INTO ssh_cert_revocations (org_id, ca_id, serial) VALUES ($1, $2, 42)",
        org.id,
        ca_id,
    )
    found = await sandboxes.access_for(pool, org.sandbox_id)
    assert found is not None
    (ca,) = found.cas
    assert ca.principals == ("team-infra",)
    assert ca.revoked_key_ids == frozenset({"gone"})
    assert ca.revoked_serials == frozenset({42})
    await pool.execute("UPDATE organizations SET disabled_at = now() WHERE id = $1", org.id)
    disabled = await sandboxes.access_for(pool, org.sandbox_id)
    assert disabled is not None and disabled.cas == () and disabled.keys == ()


async def test_a_certificate_let_in_by_a_ca_principal_ends_when_the_ca_drops_it(
    make_org: Any, pool: Any
) -> None:
    org, other = await make_org(), await make_org()
    ca = await _add_ca(pool, org.id, ["team-infra", "oncall"])
    # Another organization's CA still granting the same principal changes nothing here.
    await _add_ca(pool, other.id, ["team-infra"])

    def via(*principals: str) -> Grant:
        return _cert_grant(org, ca, principals=principals)

    named = _cert_grant(org, ca)  # the certificate names the sandbox itself: no principal to lose
    checks = await access.check_grants(pool, [via("team-infra"), via("oncall"), named])
    assert [c.reason for c in checks] == [None, None, None]

    await pool.execute("UPDATE ssh_cert_authorities SET principals = '{oncall}' WHERE id = $1", ca)
    grants = {
        via("team-infra"): access.CERTIFICATE_PRINCIPAL_REMOVED,
        via("team-infra", "oncall"): None,  # still let in by the other one
        via("oncall"): None,
        named: None,
    }
    checks = await access.check_grants(pool, list(grants))
    assert [c.reason for c in checks] == list(grants.values())
