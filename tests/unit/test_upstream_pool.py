"""The upstream connection pool, with fake connections (no network)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.upstream.pool import UpstreamPool
from gateway.upstream.target import Target


class FakeConn:
    def __init__(self, n: int) -> None:
        self.n = n
        self._closed = asyncio.Event()

    def is_closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class Connector:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.opened: list[FakeConn] = []
        self.delay = delay
        self.fail = fail

    async def __call__(self, target: Target) -> FakeConn:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise OSError("unreachable")
        conn = FakeConn(len(self.opened))
        self.opened.append(conn)
        return conn


def target(name: str = "sandbox-a") -> Target:
    return Target(sandbox_id=name, host="127.0.0.1", port=22, user="dev", host_keys=("k",))


async def test_sessions_share_one_connection_up_to_max_sessions() -> None:
    connect = Connector()
    pool = UpstreamPool(connect, max_sessions=3)
    leases = [await pool.acquire(target()) for _ in range(4)]
    assert [lease.conn for lease in leases[:3]] == [connect.opened[0]] * 3
    assert leases[3].conn is connect.opened[1]
    assert pool.stats()["connections"] == 2
    await pool.close()


async def test_concurrent_acquires_share_one_connect() -> None:
    connect = Connector(delay=0.05)
    pool = UpstreamPool(connect, max_sessions=10)
    pool.warm(target())
    leases = await asyncio.gather(*(pool.acquire(target()) for _ in range(5)))
    assert len(connect.opened) == 1
    assert {id(lease.conn) for lease in leases} == {id(connect.opened[0])}
    await pool.close()


async def test_targets_never_share() -> None:
    connect = Connector()
    pool = UpstreamPool(connect)
    a = await pool.acquire(target("sandbox-a"))
    b = await pool.acquire(target("sandbox-b"))
    assert a.conn is not b.conn
    await pool.close()


async def test_closed_connection_is_never_handed_out() -> None:
    connect = Connector()
    pool = UpstreamPool(connect)
    first = await pool.acquire(target())
    first.conn.close()
    await asyncio.sleep(0.01)
    second = await pool.acquire(target())
    assert second.conn is not first.conn
    first.release()  # releasing a lease on a dead connection is harmless
    await pool.close()


async def test_release_and_idle_timeout_close_the_connection() -> None:
    connect = Connector()
    pool = UpstreamPool(connect, idle_seconds=0.1)
    lease = await pool.acquire(target())
    lease.release()
    lease.release()  # idempotent
    assert not connect.opened[0].is_closed()
    await asyncio.sleep(0.3)
    assert connect.opened[0].is_closed()
    assert pool.stats()["connections"] == 0
    await pool.close()


async def test_per_target_limit_waits_for_a_release() -> None:
    connect = Connector()
    pool = UpstreamPool(connect, max_sessions=1, max_conns_per_target=1)
    first = await pool.acquire(target())
    waiter = asyncio.ensure_future(pool.acquire(target()))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    first.release()
    second = await asyncio.wait_for(waiter, 1)
    assert second.conn is first.conn
    await pool.close()


async def test_total_limit_evicts_least_recently_idle() -> None:
    connect = Connector()
    pool = UpstreamPool(connect, max_total=2)
    a = await pool.acquire(target("sandbox-a"))
    a.release()
    b = await pool.acquire(target("sandbox-b"))
    await pool.acquire(target("sandbox-c"))
    assert a.conn.is_closed() and not b.conn.is_closed()
    await pool.close()


async def test_report_full_moves_next_session_to_a_new_connection() -> None:
    connect = Connector()
    pool = UpstreamPool(connect, max_sessions=10)
    first = await pool.acquire(target())
    second = await pool.acquire(target())
    second.report_full()  # the sandbox refused this channel: MaxSessions is lower than 10
    second.release()
    third = await pool.acquire(target())
    assert third.conn is not first.conn
    await pool.close()


async def test_connect_errors_propagate_and_leave_nothing_behind() -> None:
    pool = UpstreamPool(Connector(fail=True))
    with pytest.raises(OSError):
        await pool.acquire(target())
    assert pool.stats() == {"targets": 0, "connections": 0, "leases": 0, "opening": 0}
    await pool.close()


class _CountingLease:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def test_lease_book_releases_each_lease_once_whatever_the_order() -> None:
    from gateway.upstream.pool import LeaseBook

    book = LeaseBook()
    a, b = _CountingLease(), _CountingLease()
    book.hold("session-a", a)  # type: ignore[arg-type]
    book.hold("session-b", b)  # type: ignore[arg-type]
    book.release("session-a")
    book.release("session-a")
    book.release_all()
    book.release("session-b")
    assert (a.released, b.released) == (1, 1)


def test_lease_stored_after_the_client_left_is_released_at_once() -> None:
    """A channel whose upstream arrived after connection_lost must not keep a pool slot."""
    from gateway.upstream.pool import LeaseBook

    book = LeaseBook()
    book.release_all()  # the client connection is gone ...
    late = _CountingLease()
    book.hold("forward", late)  # type: ignore[arg-type]  # ... then its lease arrives
    assert late.released == 1 and len(book) == 0
