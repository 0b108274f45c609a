"""New sessions on a live connection, as a ControlMaster user meets them: the first asks the
database, the next reuse that answer while nothing concerning the connection has changed
(gateway/ssh/revocation.py ``check_channel``), and a session asked for right after the key is
revoked never runs, though the sandbox's channel may already have been opened for it
(gateway/upstream/early.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant
from tests.integration.revocation.support import ControlMaster, gateway_metric, wait_until
from tests.integration.support import GatewayFactory, client_for


def _checks(gw: GatewayProcess, result: str) -> float:
    return gateway_metric(gw.metrics_port, "rtgw_channel_checks_total", result=result)


@contextmanager
def _master(gw: GatewayProcess, tenant: Tenant, tmp_path: Path) -> Iterator[ControlMaster]:
    """A running ControlMaster of the tenant's key to its sandbox, stopped afterwards."""
    assert tenant.key is not None
    master = ControlMaster(
        client_for(gw, tmp_path), tenant.key, tenant.sandbox_id, tmp_path / "cm.sock"
    )
    master.start()
    try:
        yield master
    finally:
        master.stop()


def _muxed(
    master: ControlMaster, tenant: Tenant, command: str
) -> subprocess.CompletedProcess[bytes]:
    return master.ssh("-o", "ControlMaster=no", f"{tenant.sandbox_id}@127.0.0.1", command)


def test_sessions_on_one_connection_ask_the_database_once(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw = gateway_factory({})
    with _master(gw, tenant, tmp_path) as master:
        for n in range(3):
            r = _muxed(master, tenant, f"echo {n}")
            assert r.returncode == 0, r.stderr
            assert r.stdout == f"{n}\n".encode()
    assert _checks(gw, "queried") == 1
    assert _checks(gw, "reused") == 2


def test_a_session_asked_for_right_after_its_key_is_revoked_never_runs(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw = gateway_factory({})
    with _master(gw, tenant, tmp_path) as master:
        r = _muxed(master, tenant, "echo warm")
        assert r.returncode == 0, r.stderr  # the verdict is now held for reuse

        tenant.revoke(tenant.key_id)
        r = _muxed(master, tenant, "echo RAN")
        assert r.returncode == 255, (r.stdout, r.stderr)
        assert b"RAN" not in r.stdout
        wait_until("the ControlMaster to exit", lambda: not master.alive(), 5)


def test_with_the_access_cache_off_every_session_asks_the_database(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw = gateway_factory({"RTGW_REVOCATION_ACCESS_CACHE_SECONDS": "0"})
    with _master(gw, tenant, tmp_path) as master:
        for _ in range(3):
            r = _muxed(master, tenant, "true")
            assert r.returncode == 0, r.stderr
    assert _checks(gw, "queried") == 3
    assert _checks(gw, "reused") == 0
