"""When a new channel on a live connection may reuse the connection's last valid verdict
instead of asking the database (gateway/ssh/revocation.py ``check_channel``): the rules, with a
stand-in for the database that counts queries. The real thing, with real ssh and PostgreSQL, is
tests/integration/revocation/test_channel_checks.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.errors import UpstreamError
from gateway.ssh.registry import Identity, Registry
from gateway.ssh.revocation import Revocation

ORG = uuid.UUID(int=1)
OTHER_ORG = uuid.UUID(int=2)
KEY = uuid.UUID(int=11)


@dataclass
class Conn:
    conn_id: str = "c1"
    session_count: int = 1
    ended: list[str] = field(default_factory=list)

    def notify_sessions(self, text: str) -> None:
        pass

    def close_sessions(self, text: str, reason: str) -> None:
        self.ended.append(reason)

    def close(self) -> None:
        pass

    __hash__ = object.__hash__


@dataclass
class Database:
    """Answers every grant with ``reason`` (None: valid); ``during`` runs while a query is in
    flight, as a notification arriving meanwhile would."""

    reason: str | None = None
    expires_at: dt.datetime | None = None
    queries: int = 0
    during: Callable[[], None] | None = None

    async def fetch(self, _sql: str, sandbox_ids: list[str], *_rest: Any) -> list[dict[str, Any]]:
        self.queries += 1
        await asyncio.sleep(0)
        if self.during is not None:
            self.during()
        return [
            {"n": n, "reason": self.reason, "expires_at": self.expires_at}
            for n in range(1, len(sandbox_ids) + 1)
        ]


@dataclass
class Change:
    kind: str
    org_id: Any = ORG
    sandbox_id: str | None = None
    key_id: Any = None
    at: float | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(
    *, reuse: float = 30.0, listener: str = "listening", mode: str = "strict"
) -> tuple[Revocation, Database, Conn, Identity, Clock]:
    registry = Registry()
    conn = Conn()
    identity = Identity(org_id=ORG, sandbox_id="sandbox-a", key_id=KEY, fingerprint="SHA256:x")
    registry.add(conn)
    registry.authenticated(conn, identity)
    database = Database()
    clock = Clock()
    revocation = Revocation(
        registry,
        database,
        mode=mode,
        reuse_seconds=lambda: reuse,
        clock=clock,  # type: ignore[arg-type]
    )
    revocation.listener_state = lambda: listener
    return revocation, database, conn, identity, clock


async def test_a_second_channel_on_a_connection_reuses_its_valid_verdict() -> None:
    revocation, database, conn, identity, _ = setup()
    await revocation.check_channel(conn, identity)
    await revocation.check_channel(conn, identity)
    await revocation.check_channel(conn, identity)
    assert database.queries == 1


async def test_with_reuse_off_every_channel_asks_the_database() -> None:
    revocation, database, conn, identity, _ = setup(reuse=0)
    for _ in range(3):
        await revocation.check_channel(conn, identity)
    assert database.queries == 3


async def test_while_the_listener_is_down_every_channel_asks_the_database() -> None:
    revocation, database, conn, identity, _ = setup(listener="listening", mode="best_effort")
    await revocation.check_channel(conn, identity)
    revocation.listener_state = lambda: "reconnecting"
    await revocation.check_channel(conn, identity)
    await revocation.check_channel(conn, identity)
    assert database.queries == 3
    # Back up: what was verified before the outage is not trusted, the next channel asks.
    revocation.listener_state = lambda: "listening"
    await revocation.check_channel(conn, identity)
    assert database.queries == 4


@pytest.mark.parametrize(
    "change",
    [
        Change("ssh_key", key_id=KEY),
        Change("cert_authority", key_id=KEY),
        Change("sandbox", sandbox_id="sandbox-a"),
        Change("org"),
        Change("all", org_id=None),
    ],
    ids=["its key", "its CA", "its sandbox", "its org", "everything"],
)
async def test_a_change_concerning_the_connection_makes_the_next_channel_ask(
    change: Change,
) -> None:
    revocation, database, conn, identity, _ = setup()
    await revocation.check_channel(conn, identity)
    revocation.on_change(change)
    await asyncio.sleep(0.01)  # the queued re-check of the connection runs (a query)
    before = database.queries
    await revocation.check_channel(conn, identity)
    # The re-check after the change found the grant valid: that fresh verdict is reused.
    assert database.queries == before
    assert before == 2


async def test_a_channel_opened_while_a_change_is_being_checked_asks_the_database() -> None:
    revocation, database, conn, identity, _ = setup()
    await revocation.check_channel(conn, identity)
    revocation.on_change(Change("ssh_key", key_id=KEY))  # queued, not yet checked
    await revocation.check_channel(conn, identity)
    assert database.queries == 2


async def test_a_change_about_another_org_or_key_keeps_the_verdict() -> None:
    revocation, database, conn, identity, _ = setup()
    await revocation.check_channel(conn, identity)
    revocation.on_change(Change("org", org_id=OTHER_ORG))
    revocation.on_change(Change("ssh_key", key_id=uuid.UUID(int=99)))
    revocation.on_change(Change("sandbox", sandbox_id="sandbox-b"))
    await revocation.check_channel(conn, identity)
    assert database.queries == 1


async def test_a_verdict_whose_query_raced_a_change_is_not_kept() -> None:
    revocation, database, conn, identity, _ = setup()
    database.during = lambda: revocation.on_change(Change("org", org_id=OTHER_ORG))
    await revocation.check_channel(conn, identity)
    database.during = None
    await revocation.check_channel(conn, identity)
    assert database.queries == 2


async def test_a_verdict_is_reused_for_reuse_seconds_only() -> None:
    revocation, database, conn, identity, clock = setup(reuse=30)
    await revocation.check_channel(conn, identity)
    clock.now += 29.9
    await revocation.check_channel(conn, identity)
    assert database.queries == 1
    clock.now += 0.2
    await revocation.check_channel(conn, identity)
    assert database.queries == 2


async def test_a_key_that_expired_since_its_verdict_is_asked_about_again() -> None:
    revocation, database, conn, identity, _ = setup()
    database.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    await revocation.check_channel(conn, identity)
    await revocation.check_channel(conn, identity)
    assert database.queries == 2


async def test_a_refusal_is_never_reused() -> None:
    revocation, database, conn, identity, _ = setup()
    database.reason = "key_revoked"
    with pytest.raises(UpstreamError):
        await revocation.check_channel(conn, identity)
    assert conn.ended == ["key_revoked"]
    # The connection is ending: later channels are refused whatever the database says.
    database.reason = None
    with pytest.raises(UpstreamError):
        await revocation.check_channel(conn, identity)
    assert database.queries == 1
