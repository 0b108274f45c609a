"""The asyncssh patch layer, against real asyncssh connections over loopback.

Three kinds of tests:

- the patched behaviour, in this process, after ``apply()`` (the ``patched`` fixture);
- the start-up rules: the version check and where ``apply()`` is called;
- canaries: asyncssh's *own* behaviour, observed in a fresh interpreter where ``apply()`` never
  ran (``upstream`` fixture). Each fails when upstream no longer does what a patch corrects:
  then the patch has become unnecessary or wrong, and must be re-read (see the module docstring
  of gateway/asyncssh_patches.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import asyncssh
import pytest
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

from gateway import asyncssh_patches, cli
from gateway.asyncssh_patches import PATCHES, VERIFIED_ON, check_version, signature_algorithm
from gateway.daemon import logs
from gateway.errors import GatewayError, IncompatibleLibrary
from gateway.ssh.algorithms import common_options
from gateway.ssh.algorithms import signature_algs as signature_algs_offered

REPO = Path(__file__).resolve().parents[2]
GCM = ["aes128-gcm@openssh.com"]
CBC = ["aes128-cbc"]
BURST = 200  # small packets written in one event-loop turn
STREAM_PACKETS = 64  # full 32 KiB data packets
SINK_WINDOW = 256 * 1024
HUGE_WINDOW = 2**31 - 1  # what a client that wants the gateway to buffer advertises
UNREAD_STREAM = 32 * 1024 * 1024
FLOOD = 8 * 1024 * 1024  # streamed by one connection while another makes 1-byte echoes
DATA_PACKET = 32768  # payload of a full data packet (asyncssh's default maximum)


@pytest.fixture(autouse=True, scope="module")
def patched() -> None:
    """The gateway's processes call apply() at start (gateway/cli.py); these tests do it here."""
    asyncssh_patches.apply()


# --- servers and probes, shared by the patched tests and the canaries -----------------------


class _NoAuth(asyncssh.SSHServer):
    conns: list[asyncssh.SSHServerConnection] = []

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        _NoAuth.conns.append(conn)

    def begin_auth(self, username: str) -> bool:
        return False


class _AnyKey(asyncssh.SSHServer):
    """Accepts every public key: only the signature check (and its algorithm) can refuse."""

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True


async def _handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
    command = process.command or ""
    if command == "echo":  # echo stdin back, then report its sha256 on stderr
        digest = hashlib.sha256()
        while data := await process.stdin.read(65536):
            digest.update(data)
            process.stdout.write(data)
            await process.stdout.drain()
        process.stderr.write(digest.hexdigest().encode())
        process.exit(3)
    elif command.startswith("burst "):  # many small writes in one event-loop turn
        count = int(command.split()[1])
        for i in range(count):
            process.stdout.write(b"%06d\n" % i)
        process.exit(0)
    elif command.startswith("stream "):
        size = int(command.split()[1])
        block = b"x" * 32768
        while size > 0:
            process.stdout.write(block[: min(size, len(block))])
            size -= len(block)
            await process.stdout.drain()
        process.exit(0)
    elif command == "bye-disconnect":
        process.stdout.write(b"bye\n")
        process.channel.get_connection().disconnect(
            asyncssh.DISC_HOST_NOT_ALLOWED_TO_CONNECT, "closing on purpose"
        )
    else:
        process.exit(0)


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[tuple[int, list[str]]]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    options: Any = common_options()
    algs = GCM + CBC
    options["encryption_algs"] = algs
    acceptor = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[key],
        server_factory=_NoAuth,
        process_factory=_handle,
        encoding=None,
        **options,
    )
    try:
        yield acceptor.get_port(), algs
    finally:
        acceptor.close()
        await acceptor.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[str]]]:
    async with _serving() as served:
        yield served


async def _connect(port: int, cipher: list[str]) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        port,
        username="u",
        known_hosts=None,
        client_keys=None,
        agent_path=None,
        config=None,
        encryption_algs=cipher,
    )


async def _transport_writes_for_burst(port: int, count: int) -> tuple[bytes, list[int]]:
    """The server's transport writes while it answers with ``count`` packets in one turn."""
    _NoAuth.conns.clear()
    async with await _connect(port, GCM) as conn:
        await conn.run("true")  # warm up: the server connection now exists
        server_conn: Any = _NoAuth.conns[-1]
        transport = server_conn._transport
        calls: list[int] = []
        original = transport.write

        def counting_write(data: bytes) -> None:
            calls.append(len(data))
            original(data)

        transport.write = counting_write
        result = await conn.run(f"burst {count}", encoding=None)
        transport.write = original
    stdout = result.stdout
    assert isinstance(stdout, bytes)
    return stdout, calls


async def _packets_received(port: int, cipher: list[str], size: int) -> int:
    async with await _connect(port, cipher) as conn:
        await conn.run("true")
        client: Any = conn
        before = client._recv_seq
        result = await conn.run(f"stream {size}", encoding=None)
        assert result.stdout is not None and len(result.stdout) == size
        packets = int(client._recv_seq - before)
    return packets


async def _rsa_login(signature_algs: list[str] | None) -> bool:
    """Does a server whose ``signature_algs`` leave out ssh-rsa let an RSA key log in, the
    client signing with ``signature_algs`` (``["ssh-rsa"]``: SHA-1)?"""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[host_key], server_factory=_AnyKey, **common_options()
    )
    assert "ssh-rsa" not in signature_algs_offered()
    user_key = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    extra: dict[str, Any] = {} if signature_algs is None else {"signature_algs": signature_algs}
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            acceptor.get_port(),
            username="u",
            known_hosts=None,
            client_keys=[user_key],
            agent_path=None,
            config=None,
            **extra,
        ):
            pass
    except asyncssh.PermissionDenied:
        return False
    finally:
        acceptor.close()
        await acceptor.wait_closed()
    return True


class _SlowSink(asyncssh.SSHServerSession[bytes]):
    """Takes one packet per resume_reading(), then pauses again: the worst pause/resume churn."""

    sinks: list[_SlowSink] = []

    def __init__(self) -> None:
        self.chan: Any = None
        self.received = 0
        _SlowSink.sinks.append(self)

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        chan.pause_reading()

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.received += len(data)
        self.chan.pause_reading()

    def buffered(self) -> int:
        return sum(len(item[0]) for item in self.chan._recv_buf)


class _SinkServer(_NoAuth):
    def session_requested(self) -> _SlowSink:
        return _SlowSink()


async def _slow_sink_peak(window: int) -> tuple[int, int]:
    """16 MiB written into a channel whose reader takes one packet per resume, 30 times:
    (bytes the reader got, most bytes ever buffered in the channel)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[key], server_factory=_SinkServer, window=window
    )
    try:
        async with await _connect(acceptor.get_port(), GCM) as conn:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, encoding=None)
            chan.write(b"y" * (16 * 1024 * 1024))
            await asyncio.sleep(0.2)
            sink = _SlowSink.sinks[-1]
            peak = sink.buffered()
            for _ in range(30):  # unpatched asyncssh: + one window per cycle
                sink.chan.resume_reading()
                await asyncio.sleep(0.02)
                peak = max(peak, sink.buffered())
            chan.close()
    finally:
        acceptor.close()
        await acceptor.wait_closed()
    return sink.received, peak


class _Recorder(asyncssh.SSHServerSession[bytes]):
    """Hashes what the client sends (so order is checked too); ``echo`` also sends it back."""

    sessions: list[_Recorder] = []

    def __init__(self) -> None:
        self.chan: Any = None
        self.command: str | None = None
        self.digest = hashlib.sha256()
        self.received = 0
        _Recorder.sessions.append(self)

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.received += len(data)
        self.digest.update(data)
        if self.command == "echo":
            self.chan.write(data)

    def eof_received(self) -> bool:
        self.chan.exit(0)
        return False


class _RecorderServer(_NoAuth):
    def session_requested(self) -> _Recorder:
        return _Recorder()


@contextlib.asynccontextmanager
async def _recording() -> AsyncIterator[int]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    options: Any = {**common_options(), "encryption_algs": GCM}
    acceptor = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[key],
        server_factory=_RecorderServer,
        encoding=None,
        **options,
    )
    try:
        yield acceptor.get_port()
    finally:
        acceptor.close()
        await acceptor.wait_closed()


def _unprocessed(conn: Any) -> int:
    """Bytes received on ``conn`` and not yet processed (0 offset where apply() never ran)."""
    return len(conn._inpbuf) - getattr(conn, "_rtgw_pos", 0)


async def _flood(size: int) -> dict[str, Any]:
    """One connection streams ``size`` random bytes into a server session while a second one
    makes 1-byte echoes, until the stream is in. Reports, on the server: the most stream bytes
    one read callback (a call of ``_recv_data``) of the flooding connection delivered; how many
    echo packets were processed while the flooding connection had more than two full packets
    received but not yet processed; and whether the stream and the echoes arrived intact."""
    _NoAuth.conns.clear()
    _Recorder.sessions.clear()
    payload = os.urandom(size)
    async with _recording() as port:
        async with await _connect(port, GCM) as bulk, await _connect(port, GCM) as interactive:
            flooded: Any = _NoAuth.conns[0]
            echoing: Any = _NoAuth.conns[1]
            bulk_chan, _ = await bulk.create_session(
                asyncssh.SSHClientSession, "sink", encoding=None
            )
            sink = _Recorder.sessions[-1]
            echo = await interactive.create_process("echo", encoding=None)
            per_read: list[int] = []
            beside_backlog = 0
            flood_recv, echo_recv = flooded._recv_data, echoing._recv_data

            def flood_read() -> None:
                before = sink.received
                flood_recv()
                per_read.append(sink.received - before)

            def echo_read() -> None:
                nonlocal beside_backlog
                seq = echoing._recv_seq
                echo_recv()
                if echoing._recv_seq != seq and _unprocessed(flooded) > 2 * DATA_PACKET + 1024:
                    beside_backlog += 1

            flooded._recv_data = flood_read  # both the transport's callback and later turns
            echoing._recv_data = echo_read
            bulk_chan.write(payload)
            bulk_chan.write_eof()
            echoes = b""
            while sink.received < size:
                echo.stdin.write(b"e")
                echoes += await asyncio.wait_for(echo.stdout.readexactly(1), 10)
            await asyncio.wait_for(bulk_chan.wait_closed(), 10)
            echo.stdin.write_eof()
    return {
        "max_stream_bytes_per_read": max(per_read),
        "reads": len(per_read),
        "echoes": len(echoes),
        "echoes_beside_backlog": beside_backlog,
        "intact": sink.received == size
        and sink.digest.digest() == hashlib.sha256(payload).digest()
        and echoes == b"e" * len(echoes),
    }


class _Counting(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.received = 0
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.received += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


async def _unread_transport_peak(port: int, size: int, *, then_read: bool) -> tuple[int, int]:
    """A client advertising a 2 GiB window stops reading its socket while the server streams
    ``size`` bytes: (most bytes the server's transport ever buffered over 1 s, bytes the
    client got once it read again; 0 unless ``then_read``)."""
    _NoAuth.conns.clear()
    async with await _connect(port, GCM) as conn:
        await conn.run("true")  # the server connection now exists
        server: Any = _NoAuth.conns[-1]
        client: Any = conn
        chan, opened = await asyncio.wait_for(
            conn.create_session(_Counting, f"stream {size}", encoding=None, window=HUGE_WINDOW),
            10,
        )
        session = cast(_Counting, opened)
        client._transport.pause_reading()  # the client's socket fills, then the server's
        peak = 0
        for _ in range(50):
            await asyncio.sleep(0.02)
            queued = server._transport.get_write_buffer_size()
            queued += getattr(server, "_rtgw_pending_size", 0)  # 0 where apply() never ran
            peak = max(peak, queued)
        client._transport.resume_reading()
        received = 0
        if then_read:
            await asyncio.wait_for(session.closed, 30)
            received = session.received
        chan.close()
    return peak, received


# --- the patched behaviour --------------------------------------------------------------------


def test_signature_algorithm_name() -> None:
    blob = asyncssh.packet.String(b"ssh-rsa") + asyncssh.packet.String(b"sig")
    assert signature_algorithm(blob) == b"ssh-rsa"
    assert signature_algorithm(b"\xff") is None


def test_apply_is_idempotent() -> None:
    send = asyncssh.connection.SSHConnection._send
    asyncssh_patches.apply()
    assert asyncssh.connection.SSHConnection._send is send


async def test_a_sha1_rsa_user_signature_is_refused_while_sha2_logs_in() -> None:
    assert await _rsa_login(["ssh-rsa"]) is False
    assert await _rsa_login(None) is True  # rsa-sha2-*: the same key, the same server


async def test_large_echo_is_intact(server: tuple[int, list[str]]) -> None:
    """4 MiB through both patched ends, in odd-sized writes: same bytes, same exit status."""
    port, _ = server
    payload = os.urandom(4 * 1024 * 1024 + 12345)
    async with await _connect(port, GCM) as conn:
        result = await conn.run("echo", input=payload, encoding=None)
    assert result.exit_status == 3
    assert result.stdout == payload
    assert result.stderr == hashlib.sha256(payload).hexdigest().encode()


async def test_one_transport_write_per_loop_turn(server: tuple[int, list[str]]) -> None:
    """200 small packets written in one turn leave the server in very few transport writes."""
    port, _ = server
    stdout, calls = await _transport_writes_for_burst(port, BURST)
    assert stdout == b"".join(b"%06d\n" % i for i in range(BURST))
    # Unpatched asyncssh: >= 200 data packets (+ as many MSG_IGNORE) => >= 200 writes.
    assert 1 <= len(calls) <= 20


async def test_disconnect_reason_reaches_client(server: tuple[int, list[str]]) -> None:
    """A DISCONNECT queued in the same turn as the abort is flushed first, reason and all."""
    port, _ = server
    conn = await _connect(port, GCM)
    lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    owner: Any = conn.get_owner()

    original = owner.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        if not lost.done():
            lost.set_result(exc)
        original(exc)

    owner.connection_lost = connection_lost
    await conn.create_session(asyncssh.SSHClientSession, "bye-disconnect")
    exc = await asyncio.wait_for(lost, 10)
    assert isinstance(exc, asyncssh.DisconnectError)
    assert exc.reason.startswith("closing on purpose")


async def test_no_ignore_padding_with_gcm_but_kept_with_cbc(server: tuple[int, list[str]]) -> None:
    port, _ = server
    size = STREAM_PACKETS * 32768
    gcm = await _packets_received(port, GCM, size)
    cbc = await _packets_received(port, CBC, size)
    # Each data packet is one packet with GCM; CBC keeps asyncssh's MSG_IGNORE before each.
    assert gcm < STREAM_PACKETS * 1.5
    assert cbc > STREAM_PACKETS * 1.9


async def test_read_buffer_is_released_when_idle(server: tuple[int, list[str]]) -> None:
    port, _ = server
    async with await _connect(port, GCM) as conn:
        result = await conn.run("stream 3000000", encoding=None)
        assert result.stdout is not None and len(result.stdout) == 3000000
        await asyncio.sleep(0.05)
        client: Any = conn
        assert client._inpbuf == b""
        assert client._rtgw_pos == 0


async def test_paused_channel_never_buffers_more_than_one_window() -> None:
    received, peak = await _slow_sink_peak(SINK_WINDOW)
    assert received > 0
    assert peak <= SINK_WINDOW


async def test_a_client_that_stops_reading_holds_the_server_at_its_high_water_mark(
    server: tuple[int, list[str]],
) -> None:
    """Unpatched asyncssh queues all 32 MiB in the transport (see the canary); patched, the
    transport holds about its 64 KiB high-water mark plus one flush, and every byte still
    arrives once the client reads again (resume_writing flushes the channels)."""
    port, _ = server
    peak, received = await _unread_transport_peak(port, UNREAD_STREAM, then_read=True)
    assert peak < 1024 * 1024
    assert received == UNREAD_STREAM


async def test_a_paused_transport_holds_output_in_the_channel_and_pauses_the_session() -> None:
    """pause_writing() on the connection: the channel keeps what it is given, pauses its
    session past the high-water mark, still sends EOF/CLOSE; resume_writing() sends it all."""

    class Session(asyncssh.SSHClientSession[bytes]):
        paused = 0
        resumed = 0

        def pause_writing(self) -> None:
            Session.paused += 1

        def resume_writing(self) -> None:
            Session.resumed += 1

    async with _serving() as (port, _):
        _NoAuth.conns.clear()
        async with await _connect(port, GCM) as conn:
            chan, _ = await conn.create_session(Session, "echo", encoding=None)
            client: Any = conn
            writes: list[int] = []
            real_write = client._transport.write

            def counting_write(data: bytes) -> None:
                writes.append(len(data))
                real_write(data)

            client._transport.write = counting_write
            client.pause_writing()  # as asyncio does past the transport's high-water mark
            chan.write(b"z" * 50_000)
            assert chan.get_write_buffer_size() == 50_000 and Session.paused == 0
            chan.write(b"z" * 50_000)
            assert chan.get_write_buffer_size() == 100_000 and Session.paused == 1
            await asyncio.sleep(0.05)
            assert sum(writes) < 1000  # nothing of the 100 kB went out
            client.resume_writing()
            assert chan.get_write_buffer_size() == 0 and Session.resumed == 1
            client._transport.write = real_write
            chan.write_eof()
            await asyncio.wait_for(chan.wait_closed(), 10)
            assert chan.get_exit_status() == 3


async def test_a_peer_that_makes_us_write_past_the_read_pause_mark_is_not_read_until_it_drains(
    server: tuple[int, list[str]],
) -> None:
    """Answers a non-reading peer provokes (requests, pings) are not channel output: past
    READ_PAUSE_AT in the paused transport the connection stops reading that peer, and reads
    again once the transport drains."""
    port, _ = server
    _NoAuth.conns.clear()
    async with await _connect(port, GCM) as conn:
        await conn.run("true")
        server_conn: Any = _NoAuth.conns[-1]
        client: Any = conn
        client._transport.pause_reading()
        for _ in range(512):  # 16 MiB of packets that are not channel data
            server_conn.send_packet(MSG_IGNORE, String(b"i" * 32768))
        await asyncio.sleep(0.2)
        assert server_conn._transport.get_write_buffer_size() > asyncssh_patches.READ_PAUSE_AT
        assert server_conn._rtgw_reading_held
        assert not server_conn._transport.is_reading()
        client._transport.resume_reading()
        for _ in range(500):
            if server_conn._transport.is_reading():
                break
            await asyncio.sleep(0.02)
        assert not server_conn._rtgw_reading_held
        assert server_conn._transport.is_reading()
        assert (await conn.run("echo", input=b"still here", encoding=None)).stdout == b"still here"


@pytest.fixture
def others_waiting(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Decide what bounded-work-per-read's peek at the loop answers: ``[True]``, someone else
    always wants the loop; ``[False]``, nobody does; ``[]`` (the default), the real peek."""
    answer: list[bool] = []
    real = asyncssh_patches._others_waiting
    monkeypatch.setattr(
        asyncssh_patches, "_others_waiting", lambda conn: answer[0] if answer else real(conn)
    )
    yield answer


async def test_a_flooding_connection_is_processed_in_bounded_turns_and_others_go_between(
    others_waiting: list[bool],
) -> None:
    """While others want the loop, one read callback handles at most READ_BUDGET of a
    connection (unpatched: the whole 256 KiB read, see the canary); the rest waits for later
    turns, other connections' packets are processed in between, and the stream still arrives
    whole and in order."""
    others_waiting.append(True)
    flood = await _flood(FLOOD)
    assert flood["intact"]
    assert flood["max_stream_bytes_per_read"] <= asyncssh_patches.READ_BUDGET
    assert flood["echoes"] > 0
    # An echo handled while the flooding connection had whole packets waiting: it did not
    # queue behind them (impossible unpatched, where a callback processes all it received).
    assert flood["echoes_beside_backlog"] > 0


async def test_with_the_real_peek_echoes_still_go_between_a_flood(
    others_waiting: list[bool],
) -> None:
    flood = await _flood(FLOOD)
    assert flood["intact"]
    assert flood["echoes_beside_backlog"] > 0


async def test_a_connection_alone_is_not_cut_into_turns(others_waiting: list[bool]) -> None:
    """Nobody else wants the loop: a read is processed whole in its callback, as upstream
    does (no pause, no extra turn: the bound costs nothing to a lone bulk transfer)."""
    others_waiting.append(False)
    flood = await _flood(FLOOD)
    assert flood["intact"]
    assert flood["max_stream_bytes_per_read"] > 2 * asyncssh_patches.READ_BUDGET
    assert flood["echoes_beside_backlog"] == 0


class _PeekingConn:
    """What ``_others_waiting`` reads of a connection (weakly referable, as connections are)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._rtgw_fd = fd


async def test_the_peek_counts_other_readable_sockets_and_backlogs_only() -> None:
    loop = asyncio.get_running_loop()
    own, own_peer = socket.socketpair()
    other, other_peer = socket.socketpair()
    conn = _PeekingConn(loop, own.fileno())
    try:
        for sock in (own, other):
            loop.add_reader(sock, lambda: None)
        loop.add_writer(other_peer, lambda: None)  # writable, always: not a reason to yield
        assert not asyncssh_patches._others_waiting(conn)
        own_peer.send(b"x")  # our own socket readable: more for us, not someone else
        assert not asyncssh_patches._others_waiting(conn)
        other_peer.send(b"x")
        assert asyncssh_patches._others_waiting(conn)
        other.recv(1)
        assert not asyncssh_patches._others_waiting(conn)
        backlogged = _PeekingConn(loop, -1)
        asyncssh_patches._BACKLOGGED.add(backlogged)  # another connection waits for a turn
        assert asyncssh_patches._others_waiting(conn)
        asyncssh_patches._BACKLOGGED.discard(backlogged)
        asyncssh_patches._BACKLOGGED.add(conn)  # our own backlog does not count
        assert not asyncssh_patches._others_waiting(conn)
        asyncssh_patches._BACKLOGGED.discard(conn)
    finally:
        for sock in (own, other):
            loop.remove_reader(sock)
        loop.remove_writer(other_peer)
        for sock in (own, own_peer, other, other_peer):
            sock.close()


async def test_what_a_read_callback_relays_is_written_before_it_returns() -> None:
    """Replies queued while handling a read go out at the end of that callback, not a turn
    later (which, beside a bulk transfer, is after another batch of it)."""
    _NoAuth.conns.clear()
    async with _recording() as port, await _connect(port, GCM) as conn:
        echo = await conn.create_process("echo", encoding=None)
        server: Any = _NoAuth.conns[-1]
        real = server._recv_data
        left_queued: list[bool] = []

        def recv_data() -> None:
            seq = server._recv_seq
            real()
            if server._recv_seq != seq:
                left_queued.append(server._rtgw_pending is not None)

        server._recv_data = recv_data
        for _ in range(20):
            echo.stdin.write(b"e")
            assert await asyncio.wait_for(echo.stdout.readexactly(1), 10) == b"e"
        echo.stdin.write_eof()
    assert left_queued and not any(left_queued)


async def test_a_backlog_is_processed_before_an_eof_closes_the_connection(
    others_waiting: list[bool],
) -> None:
    """A read far over the budget leaves a backlog; an EOF in the same turn (asyncssh closes
    the connection on it) must not lose it."""
    others_waiting.append(True)
    payload = os.urandom(1024 * 1024)  # under the 2 MiB window: sent without waiting for us
    _NoAuth.conns.clear()
    _Recorder.sessions.clear()
    async with _recording() as port:
        conn = await _connect(port, GCM)
        chan, _ = await conn.create_session(asyncssh.SSHClientSession, "sink", encoding=None)
        server: Any = _NoAuth.conns[-1]
        sink = _Recorder.sessions[-1]
        held: list[bytes] = []
        server.data_received = lambda data, datatype=None: held.append(data)  # the transport's
        chan.write(payload)
        stable, size = 0, -1
        while stable < 3 or size < len(payload):
            await asyncio.sleep(0.02)
            stable = stable + 1 if size == sum(map(len, held)) else 0
            size = sum(map(len, held))
        del server.data_received
        server.data_received(b"".join(held))  # everything in one callback ...
        assert 0 < sink.received <= asyncssh_patches.READ_BUDGET
        assert not server._transport.is_reading()  # ... the backlog holds reading ...
        server.eof_received()  # ... and the peer's EOF right behind it
        assert sink.received == len(payload)
        assert sink.digest.digest() == hashlib.sha256(payload).digest()
        conn.abort()


async def test_reading_resumes_only_when_neither_a_backlog_nor_a_full_transport_holds_it(
    server: tuple[int, list[str]],
) -> None:
    """bounded-work-per-read and pause-writing-reaches-channels both pause reading the peer;
    whichever ends first leaves it paused for the other."""
    port, _ = server
    _NoAuth.conns.clear()
    async with await _connect(port, GCM) as conn:
        await conn.run("true")
        peer: Any = _NoAuth.conns[-1]
        transport = peer._transport
        for backlog_ends_first in (True, False):
            peer._rtgw_yielded = peer._rtgw_reading_held = True
            transport.pause_reading()
            if backlog_ends_first:
                asyncssh_patches._next_turn(peer)  # nothing left to process
                assert not transport.is_reading()  # the full transport still holds it
                peer.resume_writing()
            else:
                peer.resume_writing()
                assert not transport.is_reading()  # the backlog still holds it
                asyncssh_patches._next_turn(peer)
            assert transport.is_reading()
            assert not peer._rtgw_yielded and not peer._rtgw_reading_held
        assert (await conn.run("echo", input=b"still here", encoding=None)).stdout == b"still here"


def test_every_patch_is_installed_once_apply_ran() -> None:
    assert asyncssh_patches.applied()
    assert [p.name for p in PATCHES if not p.installed()] == []


# --- start-up: which asyncssh, and where apply() runs ----------------------------------------


def test_patches_apply_silently_on_the_verified_asyncssh() -> None:
    assert check_version(VERIFIED_ON) is None


@pytest.mark.parametrize("found", ["2.24.0", "2.24.9", "2.24.10.post1"])
def test_patches_apply_with_a_warning_on_another_patch_level(found: str) -> None:
    warning = check_version(found, verified="2.24.1")
    assert warning is not None
    assert found in warning and "2.24.1" in warning and "VERIFIED_ON" in warning


@pytest.mark.parametrize("found", ["2.25.0", "2.23.9", "3.24.1", "2.240.1", "unknown", ""])
def test_patches_refuse_an_unverified_asyncssh_minor_version(found: str) -> None:
    with pytest.raises(IncompatibleLibrary) as err:
        check_version(found, verified="2.24.1")
    assert isinstance(err.value, GatewayError)  # the CLI prints it and exits 1
    message = str(err.value)
    assert message.startswith(f"asyncssh {found} is installed but the gateway was verified on ")
    assert "asyncssh 2.24.1" in message
    assert '"asyncssh>=2.24.1,<2.25"' in message  # what to do
    assert (err.value.library, err.value.found, err.value.verified) == ("asyncssh", found, "2.24.1")


def test_the_pyproject_pin_allows_only_the_verified_series() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.startswith("asyncssh")]
    major, minor, _ = VERIFIED_ON.split(".")
    assert pins == [f"asyncssh>={VERIFIED_ON},<{major}.{int(minor) + 1}"]


def test_apply_refuses_an_unverified_asyncssh_before_patching_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncssh_patches, "_APPLIED", False)
    monkeypatch.setattr(asyncssh, "__version__", "2.25.0")
    before = [(p.target, attr, getattr(p.target, attr)) for p in PATCHES for attr in p.originals]
    with pytest.raises(IncompatibleLibrary, match=r"asyncssh 2\.25\.0 is installed"):
        asyncssh_patches.apply()
    assert not asyncssh_patches.applied()
    assert all(getattr(target, attr) is f for target, attr, f in before)


def test_serve_refuses_to_start_on_an_unverified_asyncssh(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(asyncssh_patches, "_APPLIED", False)
    monkeypatch.setattr(asyncssh, "__version__", "2.25.0")
    monkeypatch.setattr(logs, "configure", lambda *args: None)  # leave logging alone
    for name in [n for n in os.environ if n.startswith("RTGW_")]:
        monkeypatch.delenv(name)
    assert cli.main(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("runtools-gateway: asyncssh 2.25.0 is installed but the gateway")
    assert not asyncssh_patches.applied()


# --- canaries: asyncssh's own behaviour, in a process where apply() never ran ----------------


# Importing these (and what they import) must not change asyncssh: only apply() does.
IMPORTED_WITHOUT_PATCHING = (
    "gateway.cli",
    "gateway.ssh.server",
    "gateway.daemon.lifecycle",
    "gateway.daemon.supervisor",
)


def report_unpatched_asyncssh() -> None:
    """Run by the ``upstream`` fixture in a fresh interpreter: one JSON line on stdout."""
    import_errors = {}
    for name in IMPORTED_WITHOUT_PATCHING:
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported by its own test; the canaries still run
            import_errors[name] = repr(exc)
    report: dict[str, Any] = {
        "asyncssh": asyncssh.__version__,
        "import_errors": import_errors,
        "patched_by_imports": [p.name for p in PATCHES if p.installed()],
    }
    if not report["patched_by_imports"]:
        report.update(asyncio.run(_observe_upstream()))
    print(json.dumps(report))


async def _observe_upstream() -> dict[str, Any]:
    async with _serving() as (port, _):
        _, writes = await _transport_writes_for_burst(port, BURST)
        gcm_packets = await _packets_received(port, GCM, STREAM_PACKETS * 32768)
    _, sink_peak = await _slow_sink_peak(SINK_WINDOW)
    async with _serving() as (port, _):
        unread_peak, _ = await _unread_transport_peak(port, UNREAD_STREAM, then_read=False)
    flood = await _flood(FLOOD)
    return {
        "flood": flood,
        "unread_transport_peak": unread_peak,
        "sha1_user_signature_accepted": await _rsa_login(["ssh-rsa"]),
        "writes_for_burst": len(writes),
        "packets_for_gcm_stream": gcm_packets,
        "slow_sink_peak": sink_peak,
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[dict[str, Any]]:
    code = "from tests.unit.test_asyncssh_patches import report_unpatched_asyncssh as r; r()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    yield report


def _canary(upstream: dict[str, Any], name: str, still_there: bool) -> None:
    patch = asyncssh_patches.patch_named(name)
    assert still_there, (
        f"asyncssh {upstream.get('asyncssh', asyncssh.__version__)} no longer shows what patch "
        f"{name!r} corrects ({patch.upstream}): the patch may be unnecessary or wrong; re-read "
        f"it in gateway/asyncssh_patches.py, then drop or port it"
    )


def test_importing_the_entry_point_and_the_daemon_patches_nothing(
    upstream: dict[str, Any],
) -> None:
    assert upstream["import_errors"] == {}
    assert upstream["patched_by_imports"] == []


def test_canary_upstream_still_accepts_sha1_rsa_user_signatures(upstream: dict[str, Any]) -> None:
    _canary(upstream, "refuse-sha1-user-signatures", upstream["sha1_user_signature_accepted"])


def test_canary_upstream_still_writes_once_per_packet(upstream: dict[str, Any]) -> None:
    _canary(upstream, "coalesce-transport-writes", upstream["writes_for_burst"] >= BURST)


def test_canary_upstream_still_processes_a_whole_read_in_one_callback(
    upstream: dict[str, Any],
) -> None:
    # asyncssh handles every complete packet of a read (up to 256 KiB) in the callback that
    # read it: no other connection's packet is processed while one still waits.
    flood = upstream["flood"]
    still_there = (
        flood["intact"]
        and flood["max_stream_bytes_per_read"] > 2 * asyncssh_patches.READ_BUDGET
        and flood["echoes_beside_backlog"] == 0
    )
    _canary(upstream, "bounded-work-per-read", still_there)


def test_canary_upstream_still_reslices_the_receive_buffer_per_packet() -> None:
    # Not observable from outside; the source of asyncssh's own methods (the registry keeps
    # them) must still consume the buffer the way the patch assumes.
    patch = asyncssh_patches.patch_named("receive-buffer-read-offset")
    header = inspect.getsource(patch.original("_recv_pkthdr"))
    body = inspect.getsource(patch.original("_recv_packet"))
    still_there = (
        "self._inpbuf = self._inpbuf[self._recv_blocksize:]" in header
        and "self._inpbuf = self._inpbuf[rem:]" in body
        and "rem = 4 + self._pktlen + self._recv_macsize - self._recv_blocksize" in body
    )
    _canary({}, patch.name, still_there)


def test_canary_upstream_still_sends_ignore_before_every_gcm_packet(
    upstream: dict[str, Any],
) -> None:
    packets = upstream["packets_for_gcm_stream"]
    _canary(upstream, "ignore-padding-only-for-cbc", packets > STREAM_PACKETS * 1.9)


def test_canary_upstream_still_overcredits_a_paused_channel(upstream: dict[str, Any]) -> None:
    peak = upstream["slow_sink_peak"]
    _canary(upstream, "window-credit-for-delivered-data", peak > 2 * SINK_WINDOW)


def test_canary_upstream_still_ignores_transport_back_pressure(upstream: dict[str, Any]) -> None:
    # A client that stops reading: asyncssh's no-op pause_writing lets the server's transport
    # buffer (nearly) the whole stream; the kernel's socket buffers hold the rest.
    peak = upstream["unread_transport_peak"]
    _canary(upstream, "pause-writing-reaches-channels", peak > UNREAD_STREAM // 4)


def test_canary_upstream_channels_still_flush_up_to_the_window_only() -> None:
    # The patch runs asyncssh's own _flush_send_buf with a zero send window: that must still
    # send no data, and still do the high-water check and a pending EOF/CLOSE after the loop.
    patch = asyncssh_patches.patch_named("channel-output-waits-for-transport")
    source = inspect.getsource(patch.original("_flush_send_buf"))
    _, _, after = source.partition("while self._send_buf and self._send_window:")
    still_there = (
        bool(after)
        and "self._pause_resume_writing()" in after
        and "eof_pending" in after
        and "close_pending" in after
        and "transport" not in source
    )
    _canary({}, patch.name, still_there)


def test_canary_upstream_still_has_no_failed_auth_callback() -> None:
    # asyncssh's SSHServer offers begin_auth/auth_completed but nothing for a failure; the
    # original send_userauth_failure only sends the packet.
    patch = asyncssh_patches.patch_named("userauth-failure-hook")
    callbacks = {n for n in dir(asyncssh.SSHServer) if "fail" in n.lower()}
    source = inspect.getsource(patch.original("send_userauth_failure"))
    _canary({}, patch.name, not callbacks and "_owner" not in source)


def test_canary_upstream_gcm_still_builds_its_aead_per_packet() -> None:
    patch = asyncssh_patches.patch_named("gcm-cipher-object-reuse")
    sealing = inspect.getsource(patch.original("encrypt_and_sign"))
    opening = inspect.getsource(patch.original("verify_and_decrypt"))
    still_there = all(
        "AESGCM(self._key)" in source and "self._update_iv()" in source
        for source in (sealing, opening)
    )
    _canary({}, patch.name, still_there)


def test_gcm_ciphers_build_their_aead_once_and_still_seal_and_open_in_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncssh.crypto.cipher import GCMCipher
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    made: list[bytes] = []

    def counting_aesgcm(key: bytes) -> AESGCM:
        made.append(key)
        return AESGCM(key)

    monkeypatch.setattr(asyncssh_patches, "AESGCM", counting_aesgcm)
    key, iv = os.urandom(16), os.urandom(12)
    sender, receiver = GCMCipher("aes128-gcm", key, iv), GCMCipher("aes128-gcm", key, iv)
    packets = [os.urandom(n) for n in (16, 32768, 48)]
    sealed = [sender.encrypt_and_sign(b"\0\0\0\x10", p) for p in packets]
    assert [receiver.verify_and_decrypt(h[:4], h[4:], mac) for h, mac in sealed] == packets
    assert len(made) == 2  # one per cipher, not one per packet
    # The IVs still move in step: an old packet, or a forged tag, does not open.
    header, mac = sealed[0]
    assert receiver.verify_and_decrypt(header[:4], header[4:], mac) is None
    header, mac = sender.encrypt_and_sign(b"\0\0\0\x10", b"x" * 16)
    assert receiver.verify_and_decrypt(header[:4], header[4:], bytes(16)) is None


def test_canary_upstream_chacha_still_makes_a_context_per_keystream_use() -> None:
    patch = asyncssh_patches.patch_named("chacha-one-keystream-per-packet")
    sealing = inspect.getsource(patch.original("encrypt_and_sign"))
    opening = inspect.getsource(patch.original("verify_and_decrypt"))
    still_there = (
        "chacha20(self._key, data, nonce, 1)" in sealing
        and "poly1305(self._key, header + data, nonce)" in sealing
        and "poly1305_verify(self._key, header + data, nonce, tag)" in opening
    )
    _canary({}, patch.name, still_there)


@pytest.mark.parametrize("size", [0, 1, 48, 63, 64, 65, 4096, 32768])
def test_chacha_packets_are_byte_for_byte_asyncssh_own(size: int) -> None:
    """Sealed by the patch and by asyncssh's own code, the same packet is the same bytes; each
    opens the other's; a wrong tag or sequence number opens nothing."""
    from asyncssh.crypto.chacha import ChachaCipher

    patch = asyncssh_patches.patch_named("chacha-one-keystream-per-packet")
    own_seal, own_open = patch.original("encrypt_and_sign"), patch.original("verify_and_decrypt")
    cipher = ChachaCipher(os.urandom(64))
    header, data = os.urandom(4), os.urandom(size)
    for seq in (0, 1, 2**32 - 1, 2**32, 2**64 - 1):
        nonce = seq.to_bytes(8, "big")
        sealed = cipher.encrypt_and_sign(header, data, nonce)
        assert sealed == own_seal(cipher, header, data, nonce)
        body, tag = sealed[0][4:], sealed[1]
        assert cipher.verify_and_decrypt(sealed[0][:4], body, nonce, tag) == data
        assert own_open(cipher, sealed[0][:4], body, nonce, tag) == data
        assert cipher.verify_and_decrypt(sealed[0][:4], body, nonce, bytes(16)) is None
        other = ((seq + 1) % 2**64).to_bytes(8, "big")
        assert cipher.verify_and_decrypt(sealed[0][:4], body, other, tag) is None


def test_every_patch_keeps_asyncssh_own_functions_and_says_what_it_corrects() -> None:
    names = [p.name for p in PATCHES]
    assert len(set(names)) == len(names)
    for patch in PATCHES:
        assert patch.upstream.strip(), patch.name
        for attr, original in patch.originals.items():
            assert original is not None, f"{patch.name}: asyncssh has no {attr}"
            assert original.__module__.startswith("asyncssh."), (patch.name, attr)
            assert original.__qualname__.endswith(f".{attr}"), (patch.name, attr)


def test_every_patch_has_a_canary() -> None:
    source = inspect.getsource(sys.modules[__name__])
    assert [
        p.name
        for p in PATCHES
        if f'patch_named("{p.name}")' not in source
        and f'_canary(upstream, "{p.name}"' not in source
    ] == []


def test_canary_upstream_still_judges_a_kex_guess_by_the_negotiated_algorithm_only() -> None:
    # RFC 4253 7.1 compares both sides' preferred kex and host-key algorithms; asyncssh
    # compares the negotiated kex with the peer's first only (Dropbear's dbclient fails on it).
    patch = asyncssh_patches.patch_named("guessed-kex-per-rfc4253")
    source = inspect.getsource(patch.original("_process_kexinit"))
    still_there = (
        "self._ignore_first_kex = (first_kex_follows and" in source
        and "self._kex.algorithm != peer_kex_algs[0])" in source
        and "host_key_algs[0]" not in source
    )
    _canary({}, patch.name, still_there)


def _kexinit(kex: list[bytes], host_keys: list[bytes], follows: bool) -> bytes:
    names = [b",".join(kex), b",".join(host_keys)] + [b"none"] * 8
    return (
        bytes([20])
        + b"\0" * 16
        + b"".join(len(n).to_bytes(4, "big") + n for n in names)
        + bytes([follows])
        + b"\0\0\0\0"
    )


@pytest.mark.parametrize(
    ("peer_kex", "peer_host_key", "follows", "wrong"),
    [
        (b"curve25519-sha256", b"ssh-ed25519", True, True),  # dbclient vs our mlkem-first list
        (b"mlkem768x25519-sha256", b"ecdsa-sha2-nistp256", True, True),
        (b"mlkem768x25519-sha256", b"ssh-ed25519", True, False),
        (b"curve25519-sha256", b"ssh-rsa", False, False),  # no guess sent: nothing to ignore
    ],
)
def test_a_kex_guess_is_wrong_when_the_preferred_algorithms_differ(
    peer_kex: bytes, peer_host_key: bytes, follows: bool, wrong: bool
) -> None:
    mine = _kexinit([b"mlkem768x25519-sha256", b"curve25519-sha256"], [b"ssh-ed25519"], False)
    peer = _kexinit([peer_kex, b"mlkem768x25519-sha256"], [peer_host_key], follows)
    assert asyncssh_patches.guess_is_wrong(mine, peer) is wrong


def test_canary_upstream_still_decides_certificates_without_the_owner() -> None:
    # asyncssh asks its owner about the CA key only, then lets SSHOpenSSHCertificate.validate
    # judge the certificate, which accepts one naming no principal for any user. The patch
    # keeps the tail of the original path (source-address, the certificate's options).
    patch = asyncssh_patches.patch_named("certificate-decision-by-owner")
    source = inspect.getsource(patch.original("_validate_openssh_certificate"))
    ca = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ssh-ed25519")
    anyone = ca.generate_user_certificate(user, "no-principals", principals=())
    try:
        anyone.validate(asyncssh.public_key.CERT_TYPE_USER, "sandbox-of-anyone")
        accepts_no_principals = True
    except ValueError:
        accepts_no_principals = False
    still_there = (
        accepts_no_principals
        and "self._owner.validate_ca_key(username, cert.signing_key)" in source
        and "cert.validate(CERT_TYPE_USER, cert_user)" in source
        and "cert.options.get('source-address')" in source
        and "self._cert_options = cert.options" in source
        and "validate_certificate" not in source
    )
    _canary({}, patch.name, still_there)
