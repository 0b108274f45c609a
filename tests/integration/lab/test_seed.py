"""gateway.lab.seed, the one seeding used by the demo, the tests and the bench."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Upstream, create_tenant, run_db, unique
from gateway.lab.user_keys import UserKey, make_key
from keystore import orgs, sandboxes, ssh_keys
from keystore.errors import InvalidPublicKey


def test_a_tenant_is_an_org_with_a_sandbox_on_the_sshd_and_its_keys(
    database_url: str, sandbox_sshd: SandboxSshd, user_key: UserKey, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    other = make_key(tmp_path, "other", comment="other@laptop")
    slug, sid = unique("org"), unique("sandbox")
    tenant = asyncio.run(
        create_tenant(
            database_url,
            Upstream.of(sandbox_sshd),
            slug=slug,
            org_name="Seeded",
            sandbox_id=sid,
            key=user_key,
            key_lines=[other.public_line],
        )
    )
    assert (tenant.slug, tenant.sandbox_id, tenant.key) == (slug, sid, user_key)
    assert [k.name for k in tenant.keys] == ["me@test", "other@laptop"]  # named by comment
    assert tenant.key_id == tenant.keys[0].id

    org = run_db(database_url, lambda c: orgs.get_org(c, slug))
    assert (org.id, org.name) == (tenant.org_id, "Seeded")
    (row,) = run_db(database_url, lambda c: sandboxes.list_sandboxes(c, tenant.org_id))
    assert (row.id, row.status, row.upstream_host, row.upstream_port, row.login_user) == (
        sid,
        "running",
        sandbox_sshd.host,
        sandbox_sshd.port,
        sandbox_sshd.login_user,
    )
    keys = run_db(database_url, lambda c: ssh_keys.list_keys(c, tenant.org_id))
    assert {k.fingerprint for k in keys} == {k.fingerprint for k in tenant.keys}


def test_tenant_helpers_register_revoke_and_manage_sandboxes(
    database_url: str, sandbox_sshd: SandboxSshd, user_key: UserKey, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    upstream = Upstream.of(sandbox_sshd)
    tenant = asyncio.run(create_tenant(database_url, upstream, key=user_key, key_name="laptop"))
    assert [k.name for k in tenant.keys] == ["laptop"]

    extra = tenant.register(make_key(tmp_path, "extra").public_line, "extra key")
    tenant.revoke(tenant.key_id)
    active = run_db(database_url, lambda c: ssh_keys.list_keys(c, tenant.org_id))
    assert [(k.id, k.name) for k in active] == [(extra, "extra key")]

    tenant.set_status("stopped")
    second = tenant.add_sandbox(replace(upstream, port=1))
    rows = run_db(database_url, lambda c: sandboxes.list_sandboxes(c, tenant.org_id))
    assert {(r.id, r.status, r.upstream_port) for r in rows} == {
        (tenant.sandbox_id, "stopped", sandbox_sshd.port),
        (second, "running", 1),
    }


def test_unusable_key_lines_raise_or_are_skipped_with_the_reason(
    database_url: str, sandbox_sshd: SandboxSshd, user_key: UserKey
) -> None:
    upstream = Upstream.of(sandbox_sshd)
    with pytest.raises(InvalidPublicKey):
        asyncio.run(create_tenant(database_url, upstream, key_lines=["not a key"]))
    tenant = asyncio.run(
        create_tenant(
            database_url, upstream, key=user_key, key_lines=["not a key"], skip_invalid=True
        )
    )
    assert len(tenant.keys) == 1
    assert len(tenant.skipped) == 1 and tenant.skipped[0]
