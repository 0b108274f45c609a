"""The upstream connection pool, with fake connections (no network)."""

from __future__ import annotations

import asyncio

import pytest

from gateway import messages
from gateway.errors import UpstreamError
from gateway.upstream.pool import LeaseBook, PoolLimits, UpstreamPool
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
    assert pool.stats() == {
        "targets": 0,
        "connections": 0,
        "leases": 0,
        "opening": 0,
        "waiting": 0,
    }
    await pool.close()


class _CountingLease:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def test_lease_book_releases_each_lease_once_whatever_the_order() -> None:
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
    book = LeaseBook()
    assert book.hold("early", _CountingLease())  # type: ignore[arg-type]
    book.release_all()  # the client connection is gone ...
    late = _CountingLease()
    held = book.hold("forward", late)  # type: ignore[arg-type]  # ... then its lease arrives
    assert not held  # the caller opens no channel for nobody
    assert late.released == 1 and len(book) == 0


# --- capacity, waits with a bound, cancellation (issue 9 findings 3 and 4, issue 12 finding 3) ---


async def test_a_burst_opens_the_connections_it_needs_at_once_not_one_after_another() -> None:
    connect = Connector(delay=0.2)
    pool = UpstreamPool(connect, max_sessions=10, max_conns_per_target=32)
    t0 = asyncio.get_running_loop().time()
    leases = await asyncio.gather(*(pool.acquire(target()) for _ in range(81)))
    elapsed = asyncio.get_running_loop().time() - t0
    assert len(connect.opened) == 9  # 81 channels, 10 per connection
    assert elapsed < 0.2 * 2  # the nine connects ran side by side
    assert len({id(lease.conn) for lease in leases}) == 9
    assert pool.stats()["leases"] == 81
    await pool.close()


async def test_the_default_capacity_is_sized_for_real_use() -> None:
    limits = PoolLimits()
    assert (limits.max_sessions, limits.max_conns_per_target) == (10, 32)
    assert limits.per_target == 320


async def test_a_full_sandbox_refuses_after_the_lease_timeout_with_a_reason_code() -> None:
    pool = UpstreamPool(
        Connector(), max_sessions=1, max_conns_per_target=1, lease_timeout_seconds=0.1
    )
    held = await pool.acquire(target())
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamError) as err:
        await pool.acquire(target())
    assert err.value.reason_code == messages.UPSTREAM_BUSY.code
    assert 0.09 < asyncio.get_running_loop().time() - t0 < 1
    assert pool.stats()["waiting"] == 0 and pool.stats()["leases"] == 1
    held.release()
    assert pool.stats()["leases"] == 0
    await pool.close()


async def test_waiters_are_served_in_arrival_order() -> None:
    pool = UpstreamPool(Connector(), max_sessions=1, max_conns_per_target=1)
    held = await pool.acquire(target())
    order: list[int] = []

    async def wait(i: int) -> None:
        lease = await pool.acquire(target())
        order.append(i)
        lease.release()

    waiters = [asyncio.ensure_future(wait(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    held.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert order == [0, 1, 2, 3, 4]
    await pool.close()


async def test_a_waiter_cancelled_while_waiting_leaves_no_lease() -> None:
    pool = UpstreamPool(Connector(), max_sessions=1, max_conns_per_target=1)
    held = await pool.acquire(target())
    waiters = [asyncio.ensure_future(pool.acquire(target())) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert pool.stats()["waiting"] == 50
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert pool.stats()["waiting"] == 0
    held.release()
    assert pool.stats()["leases"] == 0
    again = await asyncio.wait_for(pool.acquire(target()), 1)  # the slot is free
    again.release()
    await pool.close()


async def test_a_lease_handed_to_a_waiter_that_is_cancelled_at_that_moment_goes_back() -> None:
    pool = UpstreamPool(Connector(), max_sessions=1, max_conns_per_target=1)
    held = await pool.acquire(target())
    waiter = asyncio.ensure_future(pool.acquire(target()))
    await asyncio.sleep(0.01)
    held.release()  # hands the slot to the waiter ...
    waiter.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.stats()["leases"] == 0 and pool.stats()["waiting"] == 0
    await pool.close()


async def test_a_failed_connect_fails_its_waiters_and_a_failed_warm_up_logs_nothing() -> None:
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        connect = Connector(delay=0.01, fail=True)
        pool = UpstreamPool(connect)
        pool.warm(target())
        results = await asyncio.gather(
            *(pool.acquire(target()) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, OSError) for r in results)
        pool.warm(target("sandbox-b"))
        await asyncio.sleep(0.05)
        import gc

        gc.collect()
        await asyncio.sleep(0)
        assert errors == []
        assert pool.stats()["opening"] == 0 and pool.stats()["targets"] == 0
        await pool.close()
    finally:
        asyncio.get_running_loop().set_exception_handler(None)


async def test_report_full_sends_the_retry_to_another_connection_and_retires_a_useless_one() -> (
    None
):
    connect = Connector()
    pool = UpstreamPool(connect, max_sessions=10)
    only = await pool.acquire(target())
    only.report_full()  # refused although alone: this connection takes no channel at all
    only.release()
    assert only.conn.is_closed()
    retry = await pool.acquire(target())
    assert retry.conn is not only.conn
    await pool.close()


async def test_report_full_caps_a_connection_at_what_it_carries() -> None:
    connect = Connector()
    pool = UpstreamPool(connect, max_sessions=10)
    accepted = [await pool.acquire(target()) for _ in range(3)]
    refused = await pool.acquire(target())
    refused.report_full()  # the sandbox's MaxSessions is 3
    refused.release()
    nxt = await pool.acquire(target())
    assert nxt.conn is not accepted[0].conn
    accepted[0].release()
    back = await pool.acquire(target())  # a freed slot on the first connection is used again
    assert back.conn is accepted[0].conn
    await pool.close()


async def test_limits_are_read_at_each_use() -> None:
    limits = PoolLimits(max_sessions=1, max_conns_per_target=1, lease_timeout_seconds=0.05)
    current = [limits]
    pool = UpstreamPool(Connector(), limits=lambda: current[0])
    await pool.acquire(target())
    with pytest.raises(UpstreamError):
        await pool.acquire(target())
    current[0] = PoolLimits(max_sessions=1, max_conns_per_target=2, lease_timeout_seconds=0.05)
    second = await pool.acquire(target())  # a reload raised the cap: a new connection opens
    assert pool.stats()["connections"] == 2
    second.release()
    await pool.close()


async def test_every_change_reaches_the_observer() -> None:
    seen: list[dict[str, int]] = []
    pool = UpstreamPool(Connector(), on_change=seen.append)
    lease = await pool.acquire(target())
    assert seen[-1]["leases"] == 1 and seen[-1]["connections"] == 1
    lease.release()
    assert seen[-1]["leases"] == 0
    await pool.close()


async def test_close_fails_waiters_with_a_reason_code() -> None:
    pool = UpstreamPool(Connector(), max_sessions=1, max_conns_per_target=1)
    await pool.acquire(target())
    waiter = asyncio.ensure_future(pool.acquire(target()))
    await asyncio.sleep(0.01)
    await pool.close()
    with pytest.raises(UpstreamError) as err:
        await waiter
    assert err.value.reason_code == messages.GATEWAY_DRAINING.code


async def test_a_sandbox_with_a_logged_in_client_keeps_one_upstream_warm() -> None:
    """The first session after a pause must not pay a new upstream handshake (issue 12)."""
    connect = Connector()
    pool = UpstreamPool(connect, idle_seconds=0.1)
    t1 = target()
    pool.pin(t1)  # a client of this sandbox is logged in
    lease = await pool.acquire(t1)
    lease.release()
    await asyncio.sleep(0.3)  # well past idle_seconds
    assert pool.stats()["connections"] == 1
    again = await pool.acquire(t1)
    assert again.conn is lease.conn and len(connect.opened) == 1  # no new handshake
    again.release()
    pool.unpin(t1)  # the client left: the idle connection closes as before
    await asyncio.sleep(0.3)
    assert pool.stats()["connections"] == 0
    await pool.close()
