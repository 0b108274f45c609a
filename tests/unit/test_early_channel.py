"""An upstream session channel opened before its requests are known
(gateway/upstream/early.py), against a real asyncssh server on loopback.

The first test is also the canary for the asyncssh internal EarlyChannel leans on: if
``SSHClientChannel.create`` stops opening the channel through ``self._open``, it sends a second
CHANNEL_OPEN on an open channel and ``start`` fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncssh
import pytest

from gateway import asyncssh_patches
from gateway.upstream.early import EarlyChannel


@dataclass
class Seen:
    """What the server was asked for, in order."""

    events: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class RecordingSession(asyncssh.SSHServerSession[bytes]):
    def __init__(self, seen: Seen) -> None:
        self._seen = seen
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan
        self._seen.events.append("open")

    def pty_requested(self, term_type: str, term_size: object, term_modes: object) -> bool:
        self._seen.events.append(f"pty {term_type}")
        return True

    def exec_requested(self, command: str) -> bool:
        self._seen.events.append(f"exec {command}")
        return True

    def session_started(self) -> None:
        assert self._chan is not None
        env = self._chan.get_environment()
        self._seen.events.append(f"started LANG={env.get('LANG')}")
        self._chan.write(b"ran\n")
        self._chan.exit(7)

    def connection_lost(self, exc: Exception | None) -> None:
        self._seen.events.append("closed")
        self._seen.closed.set()


class Server(asyncssh.SSHServer):
    def __init__(self, seen: Seen) -> None:
        self._seen = seen

    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: this is about channels

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        return RecordingSession(self._seen)


@dataclass
class Pair:
    conn: asyncssh.SSHClientConnection
    seen: Seen


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    asyncssh_patches.apply()
    seen = Seen()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        lambda: Server(seen), "127.0.0.1", 0, server_host_keys=[host_key], encoding=None
    )
    port = server.sockets[0].getsockname()[1]
    conn = await asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u")
    try:
        yield Pair(conn, seen)
    finally:
        conn.close()
        server.close()
        await server.wait_closed()


class Collect(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.data = b""
        self.exit_status: int | None = None
        self.done = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


async def test_the_channel_opens_first_and_its_requests_go_out_only_when_started(
    pair: Pair,
) -> None:
    chan = EarlyChannel(pair.conn, 256 * 1024)
    await chan.open()
    await asyncio.sleep(0.05)  # anything sent would have arrived by now
    assert pair.seen.events == ["open"]

    collect = Collect()
    _, session = await chan.start(
        lambda: collect,
        "run-this",
        env={b"LANG": b"C.UTF-8"},
        request_pty="force",
        term_type="xterm",
        term_size=(80, 24, 0, 0),
        encoding=None,  # fixed when the channel was made: ignored here
        window=1,
    )
    assert session is collect
    await asyncio.wait_for(collect.done.wait(), 5)
    assert collect.data == b"ran\n"
    assert collect.exit_status == 7
    assert pair.seen.events[:4] == ["open", "pty xterm", "exec run-this", "started LANG=C.UTF-8"]


async def test_an_early_channel_never_started_is_closed_without_running_anything(
    pair: Pair,
) -> None:
    chan = EarlyChannel(pair.conn, 256 * 1024)
    await chan.open()
    chan.close()
    await asyncio.wait_for(pair.seen.closed.wait(), 5)
    await chan.wait_closed()
    assert pair.seen.events == ["open", "closed"]


async def test_a_channel_the_server_closed_before_the_requests_is_refused_to_start(
    pair: Pair,
) -> None:
    chan = EarlyChannel(pair.conn, 256 * 1024)
    await chan.open()
    chan.close()
    await chan.wait_closed()
    with pytest.raises(asyncssh.ChannelOpenError):
        await chan.start(Collect, "never")
    assert not any(e.startswith("exec") for e in pair.seen.events)
