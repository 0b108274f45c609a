"""Live revocation as users and operators meet it: real ssh sessions through the gateway end
within 2 s of the change, whoever wrote it (the key API, the CLI, plain SQL), with one line on
stderr saying why; a ControlMaster cannot open another session; other keys' sessions on the same
shared upstream connection go on. Lags are measured from the database's own timestamp of the
change (``revoked_at = now()``, the writing transaction's start) to the ssh process's exit."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, Upstream
from gateway.lab.user_keys import make_key
from tests.integration.revocation.support import (
    REVOCATION_DEADLINE,
    ControlMaster,
    ExtraKey,
    LiveSession,
    access_ended_line,
    cli,
    ended_within,
    http,
    sql,
    wait_until,
)
from tests.integration.support import GatewayFactory, SshClient, client_for

LAGS: dict[str, float] = {}  # measured lags, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def report_lags() -> Iterator[None]:
    yield
    if LAGS:
        print("\nrevocation lags (s):", {k: round(v, 3) for k, v in LAGS.items()})


# --- revoking a key, three ways ------------------------------------------------------------

Revoke = Callable[[Tenant], float]  # revokes tenant.key; returns revoked_at (epoch seconds)


def revoked_at(database_url: str, key_id: object) -> float:
    rows = sql(
        database_url,
        "SELECT extract(epoch FROM revoked_at)::float8 AS at FROM ssh_keys WHERE id = $1",
        key_id,
    )
    assert rows and rows[0]["at"] is not None, "the key is not revoked"
    return float(rows[0]["at"])


def revocation_story(
    *,
    revoke: Revoke,
    what: str,
    tenant: Tenant,
    other_key: ExtraKey,
    client: SshClient,
    tmp_path: Path,
) -> None:
    """Key A has a plain session and a ControlMaster with a session on it; key B of the same
    org has a session on the same sandbox. Revoking A ends A's sessions and master within 2 s
    with one stderr line, and leaves B's session working on the same upstream connection."""
    assert tenant.key is not None
    master = ControlMaster(client, tenant.key, tenant.sandbox_id, tmp_path / "cm.sock")
    master.start()
    try:
        with (
            LiveSession(client, tenant.key, tenant.sandbox_id) as plain,
            master.session("echo started; exec sleep 30") as muxed,
            LiveSession(
                client,
                other_key.key,
                tenant.sandbox_id,
                "echo started $SSH_CONNECTION; exec cat",
                stdin=True,
            ) as survivor,
        ):
            upstream_a = plain.wait_started()
            muxed.wait_started()
            upstream_b = survivor.wait_started()
            # One shared upstream connection to the sandbox carries both keys' sessions.
            assert upstream_a == upstream_b, (upstream_a, upstream_b)

            at = revoke(tenant)

            lag = ended_within(plain, at, REVOCATION_DEADLINE)
            muxed_lag = ended_within(muxed, at, REVOCATION_DEADLINE)
            LAGS[what] = lag
            LAGS[f"{what} (ControlMaster session)"] = muxed_lag
            assert lag <= REVOCATION_DEADLINE, f"{what}: session ended {lag:.3f} s after"
            assert muxed_lag <= REVOCATION_DEADLINE, f"{what}: muxed ended {muxed_lag:.3f} s after"
            for ended in (plain, muxed):
                assert ended.proc.returncode == 255, ended.err()
                line = access_ended_line(ended)
                assert f"your access to {tenant.sandbox_id} ended" in line, line
                assert "was revoked" in line, line

            # The ControlMaster's connection is gone: no other session opens through it, and
            # a fresh connection with the revoked key is refused.
            wait_until("the ControlMaster to exit", lambda: not master.alive(), 5)
            again = master.ssh(
                "-o", "ControlMaster=no", f"{tenant.sandbox_id}@127.0.0.1", "echo in"
            )
            assert again.returncode == 255, again
            assert b"in" not in again.stdout

            # Key B's session, on the same upstream connection, still works end to end.
            assert survivor.running, survivor.err()
            survivor.send(b"still-here\n")
            survivor.wait_output("still-here")
            survivor.close_stdin()
            assert survivor.wait_exit(10) == 0, survivor.err()
            assert "your access" not in survivor.err()
    finally:
        master.stop()


def test_key_revoked_through_the_api_ends_its_live_session(
    tenant: Tenant,
    other_key: ExtraKey,
    api_token: str,
    gateway: GatewayProcess,
    ssh_client: SshClient,
    tmp_path: Path,
    database_url: str,
) -> None:
    def revoke(t: Tenant) -> float:
        status, body = http("DELETE", gateway.api_port, f"/v1/ssh-keys/{t.key_id}", token=api_token)
        assert status == 204, body
        return revoked_at(database_url, t.key_id)

    revocation_story(
        revoke=revoke,
        what="api",
        tenant=tenant,
        other_key=other_key,
        client=ssh_client,
        tmp_path=tmp_path,
    )


def test_key_revoked_through_the_cli_ends_its_live_session(
    tenant: Tenant,
    other_key: ExtraKey,
    ssh_client: SshClient,
    tmp_path: Path,
    database_url: str,
) -> None:
    def revoke(t: Tenant) -> float:
        r = cli(database_url, "ssh-key", "revoke", str(t.key_id), "--org", t.slug)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("revoked SHA256:"), r.stdout
        return revoked_at(database_url, t.key_id)

    revocation_story(
        revoke=revoke,
        what="cli",
        tenant=tenant,
        other_key=other_key,
        client=ssh_client,
        tmp_path=tmp_path,
    )


def test_key_revoked_with_plain_sql_ends_its_live_session(
    tenant: Tenant,
    other_key: ExtraKey,
    ssh_client: SshClient,
    tmp_path: Path,
    database_url: str,
) -> None:
    def revoke(t: Tenant) -> float:
        rows = sql(
            database_url,
            "UPDATE ssh_keys SET revoked_at = now() WHERE id = $1 "
            "RETURNING extract(epoch FROM revoked_at)::float8 AS at",
            t.key_id,
        )
        return float(rows[0]["at"])

    revocation_story(
        revoke=revoke,
        what="sql",
        tenant=tenant,
        other_key=other_key,
        client=ssh_client,
        tmp_path=tmp_path,
    )


# --- expiry ---------------------------------------------------------------------------------


def set_expiry(database_url: str, key_id: object, seconds: float) -> float:
    rows = sql(
        database_url,
        "UPDATE ssh_keys SET expires_at = now() + make_interval(secs => $2) WHERE id = $1 "
        "RETURNING extract(epoch FROM expires_at)::float8 AS at",
        key_id,
        seconds,
    )
    return float(rows[0]["at"])


def assert_expired_on_time(session: LiveSession, expires_at: float, what: str) -> None:
    lag = ended_within(session, expires_at, REVOCATION_DEADLINE)
    LAGS[what] = lag
    assert lag >= -0.05, f"ended {-lag:.3f} s before the key expired"
    assert lag <= REVOCATION_DEADLINE, f"ended {lag:.3f} s after the key expired"
    assert session.proc.returncode == 255, session.err()
    assert "expired" in access_ended_line(session)


def test_key_whose_expiry_is_set_during_a_session_ends_it_when_it_passes(
    tenant: Tenant, ssh_client: SshClient, database_url: str
) -> None:
    assert tenant.key is not None
    with LiveSession(ssh_client, tenant.key, tenant.sandbox_id) as session:
        session.wait_started()
        expires_at = set_expiry(database_url, tenant.key_id, 2.5)
        time.sleep(1.0)
        assert session.running, "ended before its key expired"
        assert_expired_on_time(session, expires_at, "expiry set during the session")


def test_key_expiring_soon_at_login_ends_the_session_when_it_passes(
    tenant: Tenant, ssh_client: SshClient, database_url: str
) -> None:
    assert tenant.key is not None
    expires_at = set_expiry(database_url, tenant.key_id, 4.0)
    with LiveSession(ssh_client, tenant.key, tenant.sandbox_id) as session:
        session.wait_started()
        assert time.time() < expires_at - 0.5, "the login took too long for this test"
        assert_expired_on_time(session, expires_at, "expiry set before login")


# --- the sandbox stops --------------------------------------------------------------------


def test_sandbox_set_stopped_with_the_cli_ends_its_live_sessions(
    tenant: Tenant,
    other_key: ExtraKey,
    sandbox_sshd: SandboxSshd,
    ssh_client: SshClient,
    database_url: str,
) -> None:
    assert tenant.key is not None
    elsewhere = tenant.add_sandbox(Upstream.of(sandbox_sshd))
    with (
        LiveSession(ssh_client, tenant.key, tenant.sandbox_id) as first,
        LiveSession(ssh_client, other_key.key, tenant.sandbox_id) as second,
        LiveSession(ssh_client, tenant.key, elsewhere) as unrelated,
    ):
        for session in (first, second, unrelated):
            session.wait_started()
        r = cli(database_url, "sandbox", "set-status", tenant.sandbox_id, "stopped")
        assert r.returncode == 0, r.stderr
        rows = sql(
            database_url,
            "SELECT extract(epoch FROM updated_at)::float8 AS at, status FROM sandboxes "
            "WHERE id = $1",
            tenant.sandbox_id,
        )
        assert rows[0]["status"] == "stopped"
        at = float(rows[0]["at"])
        for n, session in enumerate((first, second)):
            lag = ended_within(session, at, REVOCATION_DEADLINE)
            LAGS[f"sandbox stopped (session {n + 1})"] = lag
            assert lag <= REVOCATION_DEADLINE, f"session ended {lag:.3f} s after the stop"
            assert session.proc.returncode == 255, session.err()
            assert f"{tenant.sandbox_id} was stopped" in access_ended_line(session)
        # Another sandbox of the same org, on the same sshd, is not concerned.
        time.sleep(0.3)
        assert unrelated.running, unrelated.err()
        assert "your access" not in unrelated.err()


# --- two gateways, one database -------------------------------------------------------------


def test_key_registered_and_revoked_through_one_gateway_ends_the_session_on_another(
    tenant: Tenant,
    api_token: str,
    gateway: GatewayProcess,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    workdir: Path,
) -> None:
    other: GatewayProcess = gateway_factory()
    assert other.ssh_port != gateway.ssh_port
    key = make_key(tmp_path, "registered-through-the-api")
    status, body = http(
        "POST",
        gateway.api_port,
        "/v1/ssh-keys",
        token=api_token,
        body={"name": "via-api", "public_key": key.public_line},
    )
    assert status == 201, body
    key_id = body["id"]
    on_first = client_for(gateway, workdir)
    on_second = client_for(other, workdir)
    with (
        LiveSession(on_second, key, tenant.sandbox_id) as there,
        LiveSession(on_first, key, tenant.sandbox_id) as here,
    ):
        there.wait_started()
        here.wait_started()
        status, body = http("DELETE", gateway.api_port, f"/v1/ssh-keys/{key_id}", token=api_token)
        assert status == 204, body
        at = revoked_at(tenant.database_url, key_id)
        for name, session in (("other gateway", there), ("same gateway", here)):
            lag = ended_within(session, at, REVOCATION_DEADLINE)
            LAGS[f"api, session on the {name}"] = lag
            assert lag <= REVOCATION_DEADLINE, f"{name}: ended {lag:.3f} s after the revocation"
            assert session.proc.returncode == 255, session.err()
            assert "was revoked" in access_ended_line(session)
    # The second gateway refuses the key at login too.
    refused = on_second.ssh(key, tenant.sandbox_id, "echo in")
    assert refused.returncode == 255 and b"in" not in refused.stdout
