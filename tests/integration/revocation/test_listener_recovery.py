"""The access-change listener is lost and comes back: a revocation committed while nobody was
listening (so its notification went nowhere) still ends the session, through the re-check that
follows every resubscription. Meanwhile strict mode refuses new channels on live connections,
and /readyz and the metrics say so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, Upstream, create_tenant, unique
from gateway.lab.user_keys import make_key
from tests.integration.revocation.support import (
    REVOCATION_DEADLINE,
    ControlMaster,
    HeldConnection,
    LiveSession,
    access_ended_line,
    ended_within,
    http,
    metric_value,
    wait_until,
)
from tests.integration.support import GatewayFactory, SshClient, client_for

LISTENER = "runtools-gateway-listener"
# After its connection is lost the listener retries at once, then backs off (0.2 s doubling,
# at most 5 s, with jitter): the longest it may take to come back once the database lets it.
RESUBSCRIBE_DEADLINE = 7.0
LISTENING = {"mode": "strict", "listener": "listening", "healthy": True}


@pytest.fixture
def lone_gateway(gateway_factory: GatewayFactory, scratch_database: str) -> GatewayProcess:
    """A gateway alone on its database: the one listener connection there is its own."""
    return gateway_factory(database_url=scratch_database)


@pytest.fixture
def held(scratch_database: str) -> Iterator[HeldConnection]:
    with HeldConnection(scratch_database) as conn:
        yield conn


@pytest.fixture
def admin(database_url: str) -> Iterator[HeldConnection]:
    """A connection to the session database, to act on the scratch one from outside."""
    with HeldConnection(database_url) as conn:
        yield conn


def readyz(gw: GatewayProcess) -> tuple[int, dict[str, object]]:
    status, body = http("GET", gw.metrics_port, "/readyz")
    assert isinstance(body, dict), body
    return status, body


def metrics(gw: GatewayProcess) -> str:
    status, body = http("GET", gw.metrics_port, "/metrics")
    assert status == 200 and isinstance(body, str), body
    return body


def listener_pids(held: HeldConnection) -> list[int]:
    rows = held.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = $1",
        LISTENER,
    )
    return [int(r["pid"]) for r in rows]


def test_listener_terminated_comes_back_and_ends_a_session_revoked_while_it_was_down(
    lone_gateway: GatewayProcess,
    scratch_database: str,
    sandbox_sshd: SandboxSshd,
    held: HeldConnection,
    admin: HeldConnection,
    tmp_path: Path,
    workdir: Path,
) -> None:
    gw = lone_gateway
    tenant: Tenant = asyncio.run(
        create_tenant(
            scratch_database, Upstream.of(sandbox_sshd), key=make_key(tmp_path, unique("a"))
        )
    )
    assert tenant.key is not None
    second = make_key(tmp_path, unique("b"))
    second_id = tenant.register(second.public_line)
    third = make_key(tmp_path, unique("c"))
    tenant.register(third.public_line)
    client: SshClient = client_for(gw, workdir)
    database = scratch_database.rsplit("/", 1)[1].partition("?")[0]

    status, body = readyz(gw)
    assert status == 200, body
    assert body["revocation"] == LISTENING
    first_pids = listener_pids(held)
    assert len(first_pids) == 1, first_pids

    master = ControlMaster(client, third, tenant.sandbox_id, tmp_path / "cm.sock")
    master.start()
    try:
        with (
            LiveSession(client, tenant.key, tenant.sandbox_id) as notified,
            LiveSession(client, second, tenant.sandbox_id) as missed,
            master.session("echo started; exec cat", stdin=True) as busy,
        ):
            for session in (notified, missed, busy):
                session.wait_started()

            # While listening: a revocation arrives as a notification; its lag is measured.
            at = float(
                held.fetchval(
                    "UPDATE ssh_keys SET revoked_at = now() WHERE id = $1 "
                    "RETURNING extract(epoch FROM revoked_at)::float8",
                    tenant.key_id,
                )
            )
            assert ended_within(notified, at, REVOCATION_DEADLINE) <= REVOCATION_DEADLINE
            assert "was revoked" in access_ended_line(notified)

            # The listener's connection is killed; the database refuses it a new one for now.
            admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
            try:
                assert admin.fetchval("SELECT pg_terminate_backend($1)", first_pids[0])
                wait_until("the listener to be seen down", lambda: readyz(gw)[0] == 503, 5)
                status, body = readyz(gw)
                revocation, checks = body["revocation"], body["checks"]
                assert isinstance(revocation, dict) and isinstance(checks, dict), body
                assert revocation["listener"] != "listening", body
                assert revocation["healthy"] is False, body
                assert checks["revocation"] is False and checks["database"] is True, body

                # Revoked now, and nobody hears it: the notification is lost.
                held.execute("UPDATE ssh_keys SET revoked_at = now() WHERE id = $1", second_id)
                # Strict mode: a live connection may not open another session meanwhile.
                with master.session("echo started") as refused:
                    assert refused.wait_exit(10) == 255, refused.err()
                    assert "cannot confirm right now" in refused.err(), refused.err()
                    assert "started" not in refused.out()
                time.sleep(0.3)
                assert missed.running, f"ended without a listener?\n{missed.err()}"
            finally:
                admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
            back = time.time()

            # It comes back by itself, re-checks every live connection, ends the revoked one.
            lag = ended_within(missed, back, RESUBSCRIBE_DEADLINE)
            assert lag <= RESUBSCRIBE_DEADLINE, f"ended {lag:.3f} s after it could return"
            assert missed.proc.returncode == 255, missed.err()
            assert "was revoked" in access_ended_line(missed)
            wait_until("/readyz to be ready again", lambda: readyz(gw)[0] == 200, 5)
            assert readyz(gw)[1]["revocation"] == LISTENING
            new_pids = listener_pids(held)
            assert len(new_pids) == 1 and new_pids != first_pids, (first_pids, new_pids)
            reconciled = gw.wait_event("reconciled", lambda e: e.get("ended") == 1, timeout=5)
            assert reconciled["connections"] >= 2

            # The valid key's session went on through all of it, and its master opens
            # sessions again.
            assert busy.running, busy.err()
            busy.send(b"after\n")
            busy.wait_output("after")
            assert "your access" not in busy.err()
            with master.session("echo started; echo again") as again:
                again.wait_output("again")
                assert again.wait_exit(10) == 0, again.err()
            print(f"\nrevoked while the listener was down: ended {lag:.3f} s after it could return")
    finally:
        master.stop()

    text = metrics(gw)
    assert (metric_value(text, "rtgw_revocation_reconciles_total", result="ok") or 0) >= 2
    assert (metric_value(text, "rtgw_revocation_lag_seconds_count") or 0) >= 1
    assert (metric_value(text, "rtgw_revoked_connections_total", reason="key_revoked") or 0) >= 2
    assert metric_value(text, "rtgw_revocation_listener_up") is not None
