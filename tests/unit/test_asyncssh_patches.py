"""The asyncssh patch layer, against real asyncssh connections over loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncssh
import pytest

from gateway import asyncssh_patches
from gateway.asyncssh_patches import signature_algorithm
from gateway.ssh.algorithms import common_options

asyncssh_patches.apply()

GCM = ["aes128-gcm@openssh.com"]
CBC = ["aes128-cbc"]


class _NoAuth(asyncssh.SSHServer):
    conns: list[asyncssh.SSHServerConnection] = []

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        _NoAuth.conns.append(conn)

    def begin_auth(self, username: str) -> bool:
        return False


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


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[str]]]:
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
    yield acceptor.get_port(), algs
    acceptor.close()
    await acceptor.wait_closed()


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


def test_signature_algorithm_name() -> None:
    blob = asyncssh.packet.String(b"ssh-rsa") + asyncssh.packet.String(b"sig")
    assert signature_algorithm(blob) == b"ssh-rsa"
    assert signature_algorithm(b"\xff") is None


def test_apply_is_idempotent() -> None:
    send = asyncssh.connection.SSHConnection._send
    asyncssh_patches.apply()
    assert asyncssh.connection.SSHConnection._send is send


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
        result = await conn.run("burst 200", encoding=None)
        transport.write = original
    assert result.stdout == b"".join(b"%06d\n" % i for i in range(200))
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


async def _packets_received(port: int, cipher: list[str], size: int) -> int:
    async with await _connect(port, cipher) as conn:
        await conn.run("true")
        client: Any = conn
        before = client._recv_seq
        result = await conn.run(f"stream {size}", encoding=None)
        assert len(result.stdout) == size
        return int(client._recv_seq - before)


async def test_no_ignore_padding_with_gcm_but_kept_with_cbc(server: tuple[int, list[str]]) -> None:
    port, _ = server
    size = 64 * 32768  # 64 full data packets
    gcm = await _packets_received(port, GCM, size)
    cbc = await _packets_received(port, CBC, size)
    # Each data packet is one packet with GCM; CBC keeps asyncssh's MSG_IGNORE before each.
    assert gcm < 64 * 1.5
    assert cbc > 64 * 1.9


async def test_read_buffer_is_released_when_idle(server: tuple[int, list[str]]) -> None:
    port, _ = server
    async with await _connect(port, GCM) as conn:
        result = await conn.run("stream 3000000", encoding=None)
        assert len(result.stdout) == 3000000
        await asyncio.sleep(0.05)
        client: Any = conn
        assert client._inpbuf == b""
        assert client._rtgw_pos == 0


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


async def test_paused_channel_never_buffers_more_than_one_window() -> None:
    window = 256 * 1024
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
            assert sink.received > 0
            assert peak <= window
            chan.close()
    finally:
        acceptor.close()
        await acceptor.wait_closed()
