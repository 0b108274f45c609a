"""Flow control in the relay: a slow sandbox must stop the client, whatever asyncssh resumes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from gateway import asyncssh_patches
from gateway.relay.session import ClientSide

HIGH_WATER = 65536


@pytest.fixture(autouse=True, scope="module")
def patched() -> None:
    """The relay runs on patched asyncssh in the gateway (gateway/cli.py calls apply())."""
    asyncssh_patches.apply()


class FakeClientChan:
    def __init__(self) -> None:
        self.paused = False

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


class FakeConn:
    def __init__(self) -> None:
        self.up: FakeUpChan | None = None

    async def create_session(self, factory: Any, command: Any, **kwargs: Any) -> Any:
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
