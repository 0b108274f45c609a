"""Quotas after authentication (gateway/ssh/quotas.py): pure decisions on counts."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from gateway import messages
from gateway.config import Config, QuotasConfig
from gateway.errors import ConfigError
from gateway.ssh import quotas
from gateway.ssh.registry import Identity, Registry


@dataclass(eq=False)
class FakeConn:
    conn_id: str
    session_count: int = 0

    def notify_sessions(self, text: str) -> None: ...

    def close_sessions(self, text: str, reason: str) -> None: ...

    def close(self) -> None: ...


def _limits(**overrides: int) -> dict[str, int]:
    values = {"max_sessions": 10, "max_forwards": 64, "share": 80}
    values.update(overrides)
    return values


def test_defaults_are_sized_for_real_use() -> None:
    config = Config.load(env={})
    q = config.quotas
    assert q.max_forwards_per_connection == 64  # an editor's SOCKS proxy opens dozens
    assert q.max_connections_per_key >= 50  # CI runners behind one NAT, parallel rsync
    capacity = (
        config.upstream.max_connections_per_sandbox * config.upstream.max_sessions_per_connection
    )
    assert capacity == 320
    share = quotas.upstream_share(capacity, q.upstream_share_percent)
    assert share == 80
    # one connection's sessions and forwards fit in its share: the share only bites when a
    # sandbox's capacity is configured smaller
    assert config.ssh.max_sessions_per_connection + q.max_forwards_per_connection <= share
    assert config.upstream.lease_timeout_seconds == 10.0


def test_a_session_over_the_per_connection_limit_is_refused() -> None:
    assert quotas.check_channel("session", sessions=9, forwards=0, **_limits()) is None
    refusal = quotas.check_channel("session", sessions=10, forwards=0, **_limits())
    assert refusal is not None
    assert (refusal.code, refusal.limit, refusal.count) == (
        messages.TOO_MANY_SESSIONS.code,
        10,
        10,
    )


def test_forwarding_channels_have_their_own_limit() -> None:
    assert quotas.check_channel("forward", sessions=10, forwards=63, **_limits()) is None
    refusal = quotas.check_channel("forward", sessions=0, forwards=64, **_limits())
    assert refusal is not None and refusal.code == messages.TOO_MANY_FORWARDS.code
    # sessions are not held back by forwards below the share
    assert quotas.check_channel("session", sessions=0, forwards=64, **_limits()) is None


def test_no_connection_holds_more_than_its_share_of_the_sandbox() -> None:
    small = _limits(share=5)
    assert quotas.check_channel("forward", sessions=2, forwards=2, **small) is None
    for kind in ("session", "forward"):
        refusal = quotas.check_channel(kind, sessions=2, forwards=3, **small)  # type: ignore[arg-type]
        assert refusal is not None
        assert (refusal.code, refusal.limit, refusal.count) == (
            messages.UPSTREAM_SHARE_EXCEEDED.code,
            5,
            5,
        )


@pytest.mark.parametrize(
    ("capacity", "percent", "share"),
    [(320, 25, 80), (80, 25, 20), (10, 50, 5), (3, 25, 1), (320, 100, 320)],
)
def test_the_share_is_a_percentage_of_capacity_and_never_zero(
    capacity: int, percent: int, share: int
) -> None:
    assert quotas.upstream_share(capacity, percent) == share


def test_connections_per_key_and_per_org() -> None:
    q = QuotasConfig(max_connections_per_key=2, max_connections_per_org=3)
    assert quotas.connection_refusal(per_key=1, per_org=2, quotas=q) is None
    by_key = quotas.connection_refusal(per_key=2, per_org=2, quotas=q)
    assert by_key is not None and by_key.code == messages.TOO_MANY_CONNECTIONS_PER_KEY.code
    assert "this key already has 2 connections" in by_key.text
    assert "ControlMaster" in by_key.text  # what to do next
    by_org = quotas.connection_refusal(per_key=0, per_org=3, quotas=q)
    assert by_org is not None and by_org.code == messages.TOO_MANY_CONNECTIONS_PER_ORG.code
    assert by_org.text.startswith("runtools: your organization already has 3 connections")


def test_check_connection_counts_the_registry_but_not_the_connection_itself() -> None:
    q = QuotasConfig(max_connections_per_key=2, max_connections_per_org=3)
    reg = Registry()
    org, key = uuid.uuid4(), uuid.uuid4()
    other_key = uuid.uuid4()

    def login(key_id: uuid.UUID) -> tuple[FakeConn, Identity]:
        conn = FakeConn(uuid.uuid4().hex)
        identity = Identity(org, "sandbox-1", key_id, "SHA256:x")
        reg.add(conn)
        reg.authenticated(conn, identity)
        return conn, identity

    first, identity = login(key)
    assert quotas.check_connection(reg, identity, q, first) is None
    second, _ = login(key)
    assert quotas.check_connection(reg, identity, q, second) is None  # itself not counted
    third = FakeConn("third")
    reg.add(third)  # decided before it is indexed
    refusal = quotas.check_connection(reg, identity, q, third)
    assert refusal is not None and refusal.code == messages.TOO_MANY_CONNECTIONS_PER_KEY.code
    login(other_key)  # the org's third connection
    refusal = quotas.check_connection(reg, Identity(org, "s", uuid.uuid4(), "f"), q, None)
    assert refusal is not None and refusal.code == messages.TOO_MANY_CONNECTIONS_PER_ORG.code
    reg.remove(first)
    assert quotas.check_connection(reg, identity, q, third) is None


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("RTGW_QUOTAS_MAX_FORWARDS_PER_CONNECTION", "0", "quotas.max_forwards_per_connection"),
        ("RTGW_QUOTAS_UPSTREAM_SHARE_PERCENT", "0", "quotas.upstream_share_percent"),
        ("RTGW_QUOTAS_UPSTREAM_SHARE_PERCENT", "101", "quotas.upstream_share_percent"),
        ("RTGW_QUOTAS_MAX_CONNECTIONS_PER_KEY", "0", "quotas.max_connections_per_key"),
        ("RTGW_QUOTAS_MAX_CONNECTIONS_PER_ORG", "-1", "quotas.max_connections_per_org"),
        ("RTGW_UPSTREAM_LEASE_TIMEOUT_SECONDS", "0", "upstream.lease_timeout_seconds"),
        ("RTGW_UPSTREAM_MAX_CONNECTIONS_PER_SANDBOX", "0", "upstream.max_connections_per_sandbox"),
        ("RTGW_UPSTREAM_MAX_CONNECTIONS_TOTAL", "0", "upstream.max_connections_total"),
    ],
)
def test_bad_quota_settings_fail_at_start(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.load(env={variable: value})
    assert err.value.key == key


def test_every_quota_message_says_what_to_do_next() -> None:
    texts = [
        messages.TOO_MANY_SESSIONS.render(limit=10),
        messages.TOO_MANY_FORWARDS.render(limit=64),
        messages.UPSTREAM_SHARE_EXCEEDED.render(limit=80, capacity=320, sandbox="sandbox-x"),
        messages.UPSTREAM_BUSY.render(capacity=320, sandbox="sandbox-x", seconds=10.0, conn_id="c"),
    ]
    for text in texts:
        assert text.startswith("runtools: ")
        assert "Close" in text
    assert "within 10 s" in texts[3] and "sandbox-x" in texts[3]
