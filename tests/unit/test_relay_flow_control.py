"""Flow control in the relay: a slow sandbox must stop the client, whatever asyncssh resumes;
and every relayed channel reserves its windows from the process's buffer budget."""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import Iterator
from typing import Any

import asyncssh
import pytest
import structlog

from gateway import asyncssh_patches, messages
from gateway.daemon import metrics
from gateway.relay import budget, forward
from gateway.relay.session import ClientSide

HIGH_WATER = 65536


@pytest.fixture(autouse=True, scope="module")
def patched() -> None:
    """The relay runs on patched asyncssh in the gateway (gateway/cli.py calls apply())."""
    asyncssh_patches.apply()


@pytest.fixture
def buffers(monkeypatch: pytest.MonkeyPatch) -> Iterator[budget.BufferBudget]:
    """A budget of its own, room for exactly two relayed channels."""
    own = budget.BufferBudget(2 * budget.relay_cost())
    monkeypatch.setattr(budget, "BUFFERS", own)
    yield own


class FakeClientChan:
    def __init__(self) -> None:
        self.paused = False
        self.stderr = b""
        self.exit_status: int | None = None

    def get_recv_window(self) -> int:
        return budget.DEFAULT_WINDOW

    def write_stderr(self, data: bytes) -> None:
        self.stderr += data

    def exit(self, status: int) -> None:
        self.exit_status = status

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_environment_bytes(self) -> dict[bytes, bytes]:
        return {}


class FakeUpChan:
    """Reports pause_writing once more than HIGH_WATER bytes are queued, like asyncssh."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.queued = 0
        self.paused = False

    def write(self, data: bytes, datatype: Any = None) -> None:
        self.queued += len(data)
        if not self.paused and self.queued > HIGH_WATER:
            self.paused = True
            self.session.pause_writing()

    def drain(self) -> None:
        self.queued = 0
        if self.paused:
            self.paused = False
            self.session.resume_writing()

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeConn:
    def __init__(self) -> None:
        self.up: FakeUpChan | None = None
        self.kwargs: dict[str, Any] = {}

    async def create_session(self, factory: Any, command: Any, **kwargs: Any) -> Any:
        self.kwargs = kwargs
        session = factory()
        self.up = FakeUpChan(session)
        session.connection_made(self.up)
        return self.up, session


def make(conn: FakeConn) -> tuple[ClientSide, FakeClientChan]:
    async def upstream() -> Any:
        return conn

    side = ClientSide(
        upstream=upstream,
        describe=lambda code, detail: f"{code}: {detail}",
        log=structlog.get_logger(),
        on_end=lambda summary: None,
    )
    chan = FakeClientChan()
    side.connection_made(chan)  # type: ignore[arg-type]
    side.exec_requested("cat")
    return side, chan


async def test_data_before_upstream_pauses_client_and_full_upstream_keeps_it_paused() -> None:
    conn = FakeConn()
    side, chan = make(conn)
    side.session_started()
    chan.resume_reading()  # what asyncssh does right after session_started()
    side.data_received(b"x" * (HIGH_WATER + 1), None)
    assert chan.paused  # no upstream yet: the rest stays in the SSH window
    await asyncio.sleep(0.01)  # the upstream channel opens, pending data fills it
    assert conn.up is not None and conn.up.paused
    assert chan.paused  # not resumed behind the upstream's back
    conn.up.drain()
    assert not chan.paused


async def test_small_pending_data_resumes_the_client() -> None:
    conn = FakeConn()
    side, chan = make(conn)
    side.session_started()
    chan.resume_reading()
    side.data_received(b"x" * 100, None)
    await asyncio.sleep(0.01)
    assert conn.up is not None and conn.up.queued == 100
    assert not chan.paused


# --- the buffer budget ------------------------------------------------------------------------


def test_a_relayed_pair_costs_its_two_windows_and_two_send_buffers() -> None:
    # asyncssh's defaults: 2 MiB windows, 64 KiB high water, 32 KiB packets.
    assert budget.DEFAULT_WINDOW == asyncssh.connection._DEFAULT_WINDOW
    assert budget.MAX_PACKET == asyncssh.connection._DEFAULT_MAX_PKTSIZE
    limits = inspect.getsource(asyncssh.channel.SSHChannel.set_write_buffer_limits)
    assert f"else {budget.SEND_HIGH_WATER}" in limits
    assert budget.relay_cost() == 2 * (2 * 1024 * 1024 + 65536 + 32768)
    assert budget.relay_cost(1024, 4096) == 1024 + 4096 + 2 * (65536 + 32768)


async def test_sessions_reserve_the_budget_and_one_past_it_is_refused(
    buffers: budget.BufferBudget,
) -> None:
    refused = metrics.RELAY_BUFFER_REFUSALS.labels("session")
    before = refused._value.get()
    conns, sides = [FakeConn() for _ in range(3)], []
    for conn in conns:
        side, chan = make(conn)
        side.session_started()
        sides.append((side, chan))
    await asyncio.sleep(0.01)
    assert buffers.reserved == 2 * budget.relay_cost()
    # The first two relay, with the window their reservation assumed upstream too.
    assert conns[0].up is not None and conns[1].up is not None
    assert conns[0].kwargs["window"] == budget.DEFAULT_WINDOW
    # The third: refused before any upstream work, one stderr line, exit 255, counted.
    third_side, third = sides[2]
    assert conns[2].up is None
    assert third.exit_status == messages.GATEWAY_EXIT_STATUS
    assert third.stderr.startswith(b"runtools: the gateway is relaying as much data")
    assert b"opened no new session" in third.stderr
    assert third_side.summary.reason == messages.BUFFER_BUDGET_EXHAUSTED.code
    assert refused._value.get() == before + 1
    # A session that ends gives its share back; the refused one had none to give.
    third_side.connection_lost(None)
    sides[0][0].connection_lost(None)
    assert buffers.reserved == budget.relay_cost()
    sides[0][0].connection_lost(None)  # twice: nothing more
    assert buffers.reserved == budget.relay_cost()
    side, _ = make(FakeConn())
    side.session_started()
    assert buffers.reserved == 2 * budget.relay_cost()


async def test_a_session_dropped_without_connection_lost_still_gives_its_share_back(
    buffers: budget.BufferBudget,
) -> None:
    side, _ = make(FakeConn())
    side.session_started()
    await asyncio.sleep(0.01)
    assert buffers.reserved == budget.relay_cost()
    del side
    await asyncio.sleep(0)  # the upstream task finished: nothing else refers to the session
    gc.collect()
    assert buffers.reserved == 0


class FakeUpstream:
    def __init__(self) -> None:
        self.opened = 0

    async def create_connection(self, factory: Any, host: str, port: int) -> Any:
        self.opened += 1
        return None, factory()


async def test_forwarding_channels_reserve_the_budget_and_fail_to_open_past_it(
    buffers: budget.BufferBudget,
) -> None:
    up, closed = FakeUpstream(), []
    ends = [
        await forward.open_tunnel(up, "127.0.0.1", 80, lambda: closed.append(1))  # type: ignore[arg-type]
        for _ in range(2)
    ]
    with pytest.raises(asyncssh.ChannelOpenError) as err:
        await forward.open_tunnel(up, "127.0.0.1", 80, lambda: None)  # type: ignore[arg-type]
    assert err.value.code == asyncssh.OPEN_RESOURCE_SHORTAGE
    assert "opened no new forwarding channel" in err.value.reason
    assert up.opened == 2  # nothing opened inside the sandbox for the refused one
    ends[0].connection_lost(None)
    assert closed == [1] and buffers.reserved == budget.relay_cost()
    await forward.open_tunnel(up, "127.0.0.1", 80, lambda: None)  # type: ignore[arg-type]
    assert buffers.reserved == 2 * budget.relay_cost()
