"""The registry of live connections: found by org, key and sandbox; nothing left behind."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from gateway.ssh.registry import Identity, Registry


@dataclass(eq=False)
class FakeConn:
    conn_id: str
    session_count: int = 0
    closed: bool = False
    notices: list[str] = field(default_factory=list)

    def notify_sessions(self, text: str) -> None:
        self.notices.append(text)

    def close_sessions(self, text: str, reason: str) -> None:
        self.notices.append(f"{reason}: {text}")

    def close(self) -> None:
        self.closed = True


def _identity(org: uuid.UUID, sandbox: str) -> Identity:
    return Identity(org, sandbox, uuid.uuid4(), "SHA256:" + uuid.uuid4().hex)


def test_connections_are_found_by_org_key_and_sandbox() -> None:
    reg = Registry()
    acme, globex = uuid.uuid4(), uuid.uuid4()
    a, b, c = FakeConn("a"), FakeConn("b"), FakeConn("c")
    for conn in (a, b, c):
        reg.add(conn)
    ia = _identity(acme, "sandbox-1")
    reg.authenticated(a, ia)
    reg.authenticated(b, _identity(acme, "sandbox-2"))
    assert set(reg.by_org(acme)) == {a, b}
    assert reg.by_org(globex) == []
    assert reg.by_key(ia.key_id) == [a]
    assert reg.by_sandbox("sandbox-2") == [b]
    assert reg.unauthenticated_count == 1  # c has not logged in
    assert reg.identity(a) == ia and reg.identity(c) is None


def test_a_closed_connection_leaves_no_trace_in_any_index() -> None:
    reg = Registry()
    org = uuid.uuid4()
    a = FakeConn("a")
    reg.add(a)
    ident = _identity(org, "sandbox-1")
    reg.authenticated(a, ident)
    reg.remove(a)
    assert len(reg) == 0
    assert reg.by_org(org) == [] and reg.by_key(ident.key_id) == []
    assert reg.by_sandbox("sandbox-1") == []
    assert reg.unauthenticated_count == 0


def test_a_connection_gone_during_auth_is_not_indexed() -> None:
    reg = Registry()
    a = FakeConn("a")
    reg.add(a)
    reg.remove(a)
    reg.authenticated(a, _identity(uuid.uuid4(), "sandbox-1"))
    assert len(reg) == 0 and reg.by_sandbox("sandbox-1") == []


def test_unauthenticated_count_follows_adds_logins_and_removals() -> None:
    reg = Registry()
    conns = [FakeConn(str(i)) for i in range(5)]
    for conn in conns:
        reg.add(conn)
    reg.add(conns[0])  # twice: counted once
    assert reg.unauthenticated_count == 5
    reg.authenticated(conns[0], _identity(uuid.uuid4(), "sandbox-1"))
    reg.remove(conns[1])
    assert reg.unauthenticated_count == 3
    assert len(reg) == 4


def test_iterating_while_closing_is_safe() -> None:
    reg = Registry()
    for i in range(3):
        reg.add(FakeConn(str(i)))
    for conn in reg:
        reg.remove(conn)
    assert len(reg) == 0


def test_audit_rows_from_one_source_are_rate_limited_and_suppressions_counted() -> None:
    from gateway.audit.ratelimit import SourceRateLimit

    now = [0.0]
    limit = SourceRateLimit(3, clock=lambda: now[0], max_sources=2)
    assert [limit.allow("10.0.0.1")[0] for _ in range(5)] == [True, True, True, False, False]
    assert limit.allow("10.0.0.2") == (True, 0)  # another source has its own budget
    now[0] += 20.0  # one token back (3 a minute)
    assert limit.allow("10.0.0.1") == (True, 2)  # the row written says 2 were suppressed
    limit.allow("10.0.0.3")
    assert len(limit) == 2  # bounded: the least recently seen source was forgotten
    assert limit.suppressed_total == 2
