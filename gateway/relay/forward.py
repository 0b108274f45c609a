"""Forwarding channels tunnelled through the sandbox (``ssh -L``, ``-D``, ``-W``).

The TCP connection is opened *from inside the sandbox* over the upstream SSH connection, and
bytes flow between the two channels with asyncssh's own ``SSHForwarder`` pair. ``TunnelEnd``
is the client-facing end: an ``SSHForwarder`` that also reports, once, when its channel is
gone, so the caller can release the upstream lease and count the channel (this is what
``SSHServerConnection.forward_tunneled_connection`` does, plus that one callback). Each tunnel
reserves its windows from the process's buffer budget (gateway/relay/budget.py) while open;
over budget, the channel open fails with ``buffer_budget_exhausted``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import asyncssh
from asyncssh.forward import SSHForwarder

from gateway import messages
from gateway.relay import budget


class TunnelEnd(SSHForwarder):
    def __init__(
        self, peer: SSHForwarder, on_close: Callable[[], None], hold: budget.Hold | None = None
    ) -> None:
        super().__init__(peer)
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
    factory = cast(Any, SSHForwarder)
    try:
        _, peer = await upstream.create_connection(factory, dest_host, dest_port)
    except BaseException:
        hold.release()
        raise
    return TunnelEnd(cast(SSHForwarder, peer), on_close, hold)
