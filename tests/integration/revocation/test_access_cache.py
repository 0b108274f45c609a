"""The login access cache as users meet it (gateway/ssh/access.py CachedAccess): repeat logins
of a sandbox need no database lookup, yet a key registered a moment ago opens it at once and a
key revoked a moment ago is refused at once, because every change notifies the cache."""

from __future__ import annotations

from pathlib import Path

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant, unique
from gateway.lab.user_keys import make_key
from tests.integration.revocation.support import gateway_metric
from tests.integration.support import GatewayFactory, client_for


def _lookups(gw: GatewayProcess, result: str) -> float:
    return gateway_metric(gw.metrics_port, "rtgw_access_cache_lookups_total", result=result)


def test_repeat_logins_are_answered_from_memory_and_changes_apply_at_once(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw: GatewayProcess = gateway_factory({})
    client = client_for(gw, tmp_path)
    assert tenant.key is not None
    for _ in range(3):
        assert client.ssh(tenant.key, tenant.sandbox_id, "true").returncode == 0
    assert _lookups(gw, "miss") == 1
    assert _lookups(gw, "hit") == 2

    # Registered a moment ago (the insert notifies): opens the sandbox at once.
    newcomer = make_key(tmp_path, unique("newcomer"))
    tenant.register(newcomer.public_line, name="newcomer")
    r = client.ssh(newcomer, tenant.sandbox_id, "echo hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"

    # Revoked a moment ago: refused at once, though the sandbox was cached.
    assert client.ssh(tenant.key, tenant.sandbox_id, "true").returncode == 0
    tenant.revoke(tenant.key_id)
    r = client.ssh(tenant.key, tenant.sandbox_id, "echo nope")
    assert r.returncode == 255
    assert b"nope" not in r.stdout


def test_with_the_cache_off_every_login_queries(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw: GatewayProcess = gateway_factory({"RTGW_REVOCATION_ACCESS_CACHE_SECONDS": "0"})
    client = client_for(gw, tmp_path)
    assert tenant.key is not None
    for _ in range(2):
        assert client.ssh(tenant.key, tenant.sandbox_id, "true").returncode == 0
    assert _lookups(gw, "bypass") == 2
    assert _lookups(gw, "hit") == 0
