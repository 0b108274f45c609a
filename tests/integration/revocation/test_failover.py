"""PostgreSQL fails over under a running gateway: a primary and a streaming replica (throwaway
clusters, ``pg_basebackup -R``), the gateway on a two-host DSN with
``target_session_attrs=read-write``. The primary stops, the replica is promoted: live sessions go
on, new logins work against the new primary within 10 s, revocation follows it, and every audit
row the gateway recorded, before and after, is in the new primary's ``audit_events``."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab.postgres import ThrowawayCluster
from gateway.lab.process import GatewayProcess
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, Upstream, create_tenant, migrate_database, unique
from gateway.lab.user_keys import make_key
from tests.integration.revocation.support import (
    REVOCATION_DEADLINE,
    FreezableRelay,
    LiveSession,
    access_ended_line,
    ended_within,
    http,
    sql,
    wait_until,
)
from tests.integration.support import GatewayFactory, SshClient, client_for

NEW_LOGINS_DEADLINE = 10.0  # seconds from the promotion to the first login that works


@pytest.fixture
def primary() -> Iterator[ThrowawayCluster]:
    cluster = ThrowawayCluster()
    cluster.start()
    try:
        asyncio.run(migrate_database(cluster.dsn))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def replica(primary: ThrowawayCluster) -> Iterator[ThrowawayCluster]:
    cluster = primary.standby()
    try:
        yield cluster
    finally:
        cluster.stop()


def two_host_dsn(first: ThrowawayCluster, second: ThrowawayCluster) -> str:
    return (
        f"postgresql://postgres@127.0.0.1:{first.port},127.0.0.1:{second.port}/runtools"
        "?target_session_attrs=read-write"
    )


Row = tuple[str, str, str, str | None]


def audit_rows(url: str, org_id: object) -> list[Row]:
    """(conn_id, action, result, reason) of the org's ssh.* audit rows."""
    rows = sql(
        url,
        "SELECT details->>'conn_id' AS conn_id, action, result, reason FROM audit_events "
        "WHERE org_id = $1 AND action LIKE 'ssh.%'",
        org_id,
    )
    return [(r["conn_id"], r["action"], r["result"], r["reason"]) for r in rows]


def recorded(gw: GatewayProcess, org_id: object) -> list[Row]:
    """The same, as the gateway logged them when it recorded them (one log line per event)."""
    return [
        (e["conn_id"], e["action"], e["result"], e.get("reason"))
        for e in gw.events("audit")
        if e.get("org_id") == str(org_id) and str(e.get("action", "")).startswith("ssh.")
    ]


def test_failover_keeps_live_sessions_and_new_logins_reach_the_new_primary(
    primary: ThrowawayCluster,
    replica: ThrowawayCluster,
    gateway_factory: GatewayFactory,
    sandbox_sshd: SandboxSshd,
    tmp_path: Path,
    workdir: Path,
) -> None:
    keys = {name: make_key(tmp_path, unique(name)) for name in ("live", "before", "after", "gone")}
    tenant: Tenant = asyncio.run(
        create_tenant(primary.dsn, Upstream.of(sandbox_sshd), key=keys["live"])
    )
    key_ids = {"live": tenant.key_id}
    for name in ("before", "after", "gone"):
        key_ids[name] = tenant.register(keys[name].public_line, name=name)
    wait_until(
        "the replica to have the tenant's keys",
        lambda: sql(replica.dsn, "SELECT count(*) AS n FROM ssh_keys WHERE org_id = $1",
                    tenant.org_id)[0]["n"] == 4,
        10,
    )  # fmt: skip

    gw: GatewayProcess = gateway_factory(database_url=two_host_dsn(primary, replica))
    client: SshClient = client_for(gw, workdir)

    with (
        LiveSession(client, keys["live"], tenant.sandbox_id, "echo started; exec cat", stdin=True)
        as live,
        LiveSession(client, keys["gone"], tenant.sandbox_id) as doomed,
        LiveSession(client, keys["before"], tenant.sandbox_id, "echo started; exec cat",
                    stdin=True) as ending,
    ):  # fmt: skip
        for session in (live, doomed, ending):
            session.wait_started()
        before = client.ssh(keys["before"], tenant.sandbox_id, "echo before", timeout=20)
        assert (before.returncode, before.stdout) == (0, b"before\n"), before.stderr

        # Failover: the primary goes away. A session ends while there is no primary at all:
        # its audit row cannot be written now.
        primary.stop_server("fast")
        ending.close_stdin()
        assert ending.wait_exit(10) == 0, ending.err()
        gw.wait_event("audit_flush_failed", timeout=5)
        # The replica is promoted.
        replica.promote()
        promoted = time.monotonic()

        # New logins work against the new primary, within 10 s of the promotion.
        attempts = 0

        def login() -> bool:
            nonlocal attempts
            attempts += 1
            r = client.ssh(keys["after"], tenant.sandbox_id, "echo after", timeout=15)
            return r.returncode == 0 and r.stdout == b"after\n"

        wait_until("a login through the gateway", login, NEW_LOGINS_DEADLINE, interval=0.2)
        took = time.monotonic() - promoted
        print(f"\nfirst login after the promotion: {took:.2f} s, attempt {attempts}")
        assert took <= NEW_LOGINS_DEADLINE

        # Revocation follows the new primary: its listener is back, and a key revoked there
        # ends its live session.
        wait_until(
            "the listener on the new primary",
            lambda: http("GET", gw.metrics_port, "/readyz")[0] == 200,
            NEW_LOGINS_DEADLINE,
        )
        rows = sql(
            replica.dsn,
            "UPDATE ssh_keys SET revoked_at = now() WHERE id = $1 "
            "RETURNING extract(epoch FROM revoked_at)::float8 AS at",
            key_ids["gone"],
        )
        lag = ended_within(doomed, float(rows[0]["at"]), REVOCATION_DEADLINE)
        print(f"revocation on the new primary: session ended {lag:.3f} s after")
        assert lag <= REVOCATION_DEADLINE
        assert "was revoked" in access_ended_line(doomed)

        # The live session went on through all of it.
        assert live.running, live.err()
        live.send(b"after-failover\n")
        live.wait_output("after-failover")
        live.close_stdin()
        assert live.wait_exit(10) == 0, live.err()
        assert live.err() == "", live.err()

    # Every audit row the gateway recorded (before, during and after) is on the new primary,
    # once: the writer kept what it could not write and wrote it after.
    def all_written() -> list[Any]:
        expected = Counter(recorded(gw, tenant.org_id))
        return [expected] if Counter(audit_rows(replica.dsn, tenant.org_id)) == expected else []

    try:
        wait_until("the audit rows on the new primary", all_written, 10)
    except TimeoutError:
        pytest.fail(
            f"recorded: {sorted(recorded(gw, tenant.org_id))}\n"
            f"written:  {sorted(audit_rows(replica.dsn, tenant.org_id))}\n{gw.log_tail()}"
        )
    actions = Counter((a, result, reason) for _, a, result, reason in recorded(gw, tenant.org_id))
    print("audit rows:", dict(actions))
    # live, doomed, ending, before, and the login that worked after the promotion, each from
    # auth to session end (the refused attempts before it had no sandbox, hence no org).
    assert actions[("ssh.auth", "ok", None)] >= 5, actions
    assert actions[("ssh.session.start", "ok", None)] == actions[("ssh.auth", "ok", None)]
    assert actions[("ssh.session.end", "ok", None)] == 4, actions
    assert actions[("ssh.session.end", "error", "key_revoked")] == 1, actions
    print("audit flushes that failed and were retried:", len(gw.events("audit_flush_failed")))


def test_failover_from_a_primary_that_vanished_without_a_word(
    primary: ThrowawayCluster,
    replica: ThrowawayCluster,
    gateway_factory: GatewayFactory,
    sandbox_sshd: SandboxSshd,
    tmp_path: Path,
    workdir: Path,
) -> None:
    """The old primary does not shut down: it drops off the network (every packet to it is
    lost), so the gateway's pooled and listener connections to it hang instead of failing.
    Logins still reach the new primary within 10 s and live sessions go on."""
    keys = {name: make_key(tmp_path, unique(name)) for name in ("live", "after", "gone")}
    tenant: Tenant = asyncio.run(
        create_tenant(primary.dsn, Upstream.of(sandbox_sshd), key=keys["live"])
    )
    gone_id = tenant.register(keys["gone"].public_line, name="gone")
    tenant.register(keys["after"].public_line, name="after")
    wait_until(
        "the replica to have the tenant's keys",
        lambda: sql(replica.dsn, "SELECT count(*) AS n FROM ssh_keys WHERE org_id = $1",
                    tenant.org_id)[0]["n"] == 3,
        10,
    )  # fmt: skip
    relay = FreezableRelay("127.0.0.1", primary.port)
    try:
        dsn = (
            f"postgresql://postgres@127.0.0.1:{relay.port},127.0.0.1:{replica.port}/runtools"
            "?target_session_attrs=read-write"
        )
        gw: GatewayProcess = gateway_factory(database_url=dsn)
        client: SshClient = client_for(gw, workdir)
        with (
            LiveSession(client, keys["live"], tenant.sandbox_id, "echo started; exec cat",
                        stdin=True) as live,
            LiveSession(client, keys["gone"], tenant.sandbox_id) as doomed,
        ):  # fmt: skip
            live.wait_started()
            doomed.wait_started()

            relay.freeze()
            replica.promote()
            promoted = time.monotonic()

            def login() -> bool:
                r = client.ssh(keys["after"], tenant.sandbox_id, "echo after", timeout=20)
                return r.returncode == 0 and r.stdout == b"after\n"

            wait_until("a login through the gateway", login, NEW_LOGINS_DEADLINE, interval=0.2)
            took = time.monotonic() - promoted
            print(f"\nfirst login after the old primary vanished: {took:.2f} s")
            assert took <= NEW_LOGINS_DEADLINE

            wait_until(
                "the listener on the new primary",
                lambda: http("GET", gw.metrics_port, "/readyz")[0] == 200,
                NEW_LOGINS_DEADLINE,
            )
            rows = sql(
                replica.dsn,
                "UPDATE ssh_keys SET revoked_at = now() WHERE id = $1 "
                "RETURNING extract(epoch FROM revoked_at)::float8 AS at",
                gone_id,
            )
            lag = ended_within(doomed, float(rows[0]["at"]), REVOCATION_DEADLINE)
            assert lag <= REVOCATION_DEADLINE
            assert "was revoked" in access_ended_line(doomed)

            assert live.running, live.err()
            live.send(b"still-here\n")
            live.wait_output("still-here")
            live.close_stdin()
            assert live.wait_exit(10) == 0, live.err()
            assert live.err() == "", live.err()
    finally:
        relay.close()
