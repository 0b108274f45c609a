"""Forwarding channels tunnelled through the sandbox (``ssh -L``, ``-D``, ``-W``, Unix-socket
``-L``) and back from it (``ssh -R`` TCP and Unix sockets, ``back_to_client``).

The TCP connection is opened *from inside the sandbox* over the upstream SSH connection, and
bytes flow between the two channels with asyncssh's own ``SSHForwarder`` pair. ``TunnelEnd``
is the client-facing end: an ``SSHForwarder`` that also reports, once, when its channel is
gone, so the caller can release the upstream lease and count the channel (this is what
``SSHServerConnection.forward_tunneled_connection`` does, plus that one callback). Each tunnel
reserves its windows from the process's buffer budget (gateway/relay/budget.py) while open;
over budget, the channel open fails with ``buffer_budget_exhausted``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncssh
from asyncssh.forward import SSHForwarder

from gateway import messages
from gateway.relay import budget


@dataclass(slots=True)
class Bytes:
    """Bytes a forwarding channel carried: ``up`` client -> sandbox, ``down`` back."""

    up: int = 0
    down: int = 0


class _Counting(SSHForwarder):
    """An SSHForwarder that adds what it receives to ``count`` (``up`` or ``down``)."""

    def __init__(self, peer: SSHForwarder | None, count: Bytes, way: str) -> None:
        super().__init__(peer)
        self.count = count
        self._way = way

    def data_received(self, data: bytes, datatype: asyncssh.DataType = None) -> None:
        setattr(self.count, self._way, getattr(self.count, self._way) + len(data))
        super().data_received(data, datatype)


def _sandbox_facing(count: Bytes) -> Callable[[], SSHForwarder]:
    return lambda: _Counting(None, count, "down")


class TunnelEnd(_Counting):
    def __init__(
        self,
        peer: SSHForwarder,
        on_close: Callable[[], None],
        hold: budget.Hold | None = None,
        count: Bytes | None = None,
        way: str = "up",
    ) -> None:
        super().__init__(peer, count if count is not None else Bytes(), way)
        self._on_close: Callable[[], None] | None = on_close
        self._hold = hold
        if hold is not None:
            hold.tie_to(self)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if self._hold is not None:
                self._hold.release()
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


async def open_tunnel(
    upstream: asyncssh.SSHClientConnection,
    dest_host: str,
    dest_port: int,
    on_close: Callable[[], None],
) -> TunnelEnd:
    """Open ``dest_host:dest_port`` from inside the sandbox; the end to hand to the client.

    Raises ``asyncssh.ChannelOpenError`` (resource shortage) when the buffer budget is spent.
    """
    hold = budget.BUFFERS.reserve(budget.relay_cost(), "direct-tcpip")
    if hold is None:
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_RESOURCE_SHORTAGE,
            messages.BUFFER_BUDGET_EXHAUSTED.render(what="forwarding channel"),
        )
    count = Bytes()
    factory = cast(Any, _sandbox_facing(count))
    try:
        _, peer = await upstream.create_connection(factory, dest_host, dest_port)
    except BaseException:
        hold.release()
        raise
    return TunnelEnd(cast(SSHForwarder, peer), on_close, hold, count)


async def open_unix_tunnel(
    upstream: asyncssh.SSHClientConnection, dest_path: str, on_close: Callable[[], None]
) -> TunnelEnd:
    """``ssh -L /local.sock:/remote.sock``: connect to ``dest_path`` inside the sandbox."""
    hold = _reserve()
    count = Bytes()
    try:
        _, peer = await upstream.create_unix_connection(
            cast(Any, _sandbox_facing(count)), dest_path
        )
    except BaseException:
        hold.release()
        raise
    return TunnelEnd(cast(SSHForwarder, peer), on_close, hold, count)


def _reserve() -> budget.Hold:
    hold = budget.BUFFERS.reserve(budget.relay_cost(), "forward")
    if hold is None:
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_RESOURCE_SHORTAGE,
            messages.BUFFER_BUDGET_EXHAUSTED.render(what="forwarding channel"),
        )
    return hold


class _ClientEnd(_Counting):
    """The client-facing end of a remote forwarding's connection. It exists (and may be
    sent bytes, an EOF or a close by the client) before its peer does: whatever came
    meanwhile is handed to the peer when it is set."""

    def __init__(self, count: Bytes) -> None:
        super().__init__(None, count, "up")
        self._lost = False

    def set_peer(self, peer: SSHForwarder) -> None:
        super().set_peer(peer)
        data, self._inpbuf = self._inpbuf, b""
        if data:
            peer.write(data)
        if self._eof_received:
            peer.write_eof()
        if self._lost:
            self._peer = None
            peer.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        super().connection_lost(exc)


class _SandboxEnd(TunnelEnd):
    """The sandbox-facing end of a remote forwarding's connection. The channel back to the
    client opens first and the client's side may send (a service's greeting), end or close
    before asyncssh has handed this end its own channel: keep all of that until then."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._pending_close = False
        self._paused = False
        self._started = False
        super().__init__(*args, **kwargs)

    def write(self, data: bytes) -> None:
        if self._transport is None and not self._started:
            self._pending.append(data)
            return
        super().write(data)

    def write_eof(self) -> None:
        if self._transport is None and not self._started:
            self._pending_eof = True
            return
        super().write_eof()

    def pause_reading(self) -> None:
        if self._transport is None:
            self._paused = True
            return
        super().pause_reading()

    def resume_reading(self) -> None:
        if self._transport is None:
            self._paused = False
            return
        super().resume_reading()

    def close(self) -> None:
        if self._transport is None and not self._started:
            self._pending_close = True
            return
        super().close()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._started = True
        pending, self._pending = self._pending, []
        for data in pending:
            self.write(data)
        if self._paused:
            self._paused = False
            super().pause_reading()
        if self._pending_eof:
            self.write_eof()
        if self._pending_close:
            self.close()


async def back_to_client(
    open_on_client: Callable[[Callable[[], SSHForwarder]], Awaitable[tuple[Any, Any]]],
    on_close: Callable[[Bytes], None],
) -> SSHForwarder:
    """A connection the sandbox made to a remote forwarding (``ssh -R``): open the matching
    channel back to the client (``open_on_client(factory)``, a ``forwarded-tcpip`` or
    ``forwarded-streamlocal`` open on the client connection) and return the sandbox-facing
    end. ``on_close(bytes)`` runs once when it ends; ``up`` counts client -> sandbox."""
    hold = _reserve()
    count = Bytes()
    try:
        _, client_end = await open_on_client(lambda: _ClientEnd(count))
    except BaseException:
        hold.release()
        raise
    return _SandboxEnd(
        cast(SSHForwarder, client_end), lambda: on_close(count), hold, count, way="down"
    )
