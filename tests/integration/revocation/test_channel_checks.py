"""New sessions on a live connection, as a ControlMaster user meets them: the first asks the
database, the next reuse that answer while nothing concerning the connection has changed
(gateway/ssh/revocation.py ``check_channel``), and a session asked for right after the key is
revoked never runs, though the sandbox's channel may already have been opened for it
(gateway/upstream/early.py)."""

from __future__ import annotations

from pathlib import Path

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant
from tests.integration.revocation.support import ControlMaster, http, metric_value, wait_until
from tests.integration.support import GatewayFactory, client_for


def _checks(gw: GatewayProcess, result: str) -> float:
    status, text = http("GET", gw.metrics_port, "/metrics")
    assert status == 200
    return metric_value(str(text), "rtgw_channel_checks_total", result=result) or 0.0


def test_sessions_on_one_connection_ask_the_database_once(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw = gateway_factory({})
    client = client_for(gw, tmp_path)
    assert tenant.key is not None
    master = ControlMaster(client, tenant.key, tenant.sandbox_id, tmp_path / "cm.sock")
    master.start()
    try:
        for n in range(3):
            r = master.ssh("-o", "ControlMaster=no", f"{tenant.sandbox_id}@127.0.0.1", f"echo {n}")
            assert r.returncode == 0, r.stderr
            assert r.stdout == f"{n}\n".encode()
    finally:
        master.stop()
    assert _checks(gw, "queried") == 1
    assert _checks(gw, "reused") == 2


def test_a_session_asked_for_right_after_its_key_is_revoked_never_runs(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw = gateway_factory({})
    client = client_for(gw, tmp_path)
    assert tenant.key is not None
    master = ControlMaster(client, tenant.key, tenant.sandbox_id, tmp_path / "cm.sock")
    master.start()
    try:
        login = f"{tenant.sandbox_id}@127.0.0.1"
        r = master.ssh("-o", "ControlMaster=no", login, "echo warm")
        assert r.returncode == 0, r.stderr  # the verdict is now held for reuse

        tenant.revoke(tenant.key_id)
        r = master.ssh("-o", "ControlMaster=no", login, "echo RAN")
        assert r.returncode == 255, (r.stdout, r.stderr)
        assert b"RAN" not in r.stdout
        wait_until("the ControlMaster to exit", lambda: not master.alive(), 5)
    finally:
        master.stop()


def test_with_the_access_cache_off_every_session_asks_the_database(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw = gateway_factory({"RTGW_REVOCATION_ACCESS_CACHE_SECONDS": "0"})
    client = client_for(gw, tmp_path)
    assert tenant.key is not None
    master = ControlMaster(client, tenant.key, tenant.sandbox_id, tmp_path / "cm.sock")
    master.start()
    try:
        for _ in range(3):
            r = master.ssh("-o", "ControlMaster=no", f"{tenant.sandbox_id}@127.0.0.1", "true")
            assert r.returncode == 0, r.stderr
    finally:
        master.stop()
    assert _checks(gw, "queried") == 3
    assert _checks(gw, "reused") == 0
