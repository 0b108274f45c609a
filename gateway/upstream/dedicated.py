"""An upstream connection of one client connection's own (never pooled, never shared).

Channels the *sandbox* opens arrive on the upstream connection, not on a user's: ssh-agent
requests (``auth-agent@openssh.com``) and connections to remote forwardings
(``forwarded-tcpip``, ``forwarded-streamlocal@openssh.com``). On a shared connection they could
not be told apart, so a client connection that asks for agent forwarding or a remote
forwarding gets one connection of its own for those channels; whatever the sandbox opens on
it goes to that client only, and it closes with the client connection (its listeners in the
sandbox go with it). Everything else stays on the shared pool (gateway/upstream/pool.py).

The connection is opened once, lazily, by the first channel that needs it; concurrent callers
share the attempt; a failed attempt is forgotten so the next channel tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import asyncssh

Opener = Callable[[str | None], Coroutine[Any, Any, asyncssh.SSHClientConnection]]


def enable_agent(conn: asyncssh.SSHClientConnection, agent_path: str) -> None:
    """Forward the sandbox's agent requests on ``conn`` to ``agent_path`` from now on.

    asyncssh fixes its agent path at connect time (``agent_forwarding=path``); a connection
    opened first for ``-R`` and later asked for the agent sets the same attribute."""
    conn._agent_forward_path = agent_path  # type: ignore[attr-defined]


class Dedicated:
    def __init__(self, opener: Opener) -> None:
        self._opener = opener
        self._task: asyncio.Task[asyncssh.SSHClientConnection] | None = None
        self._agent_path: str | None = None
        self._closed = False

    @property
    def opened(self) -> bool:
        task = self._task
        return task is not None and task.done() and not task.cancelled() and not task.exception()

    async def get(self, agent_path: str | None = None) -> asyncssh.SSHClientConnection:
        """The connection (opened now if needed); with ``agent_path``, agent requests on it go
        to that socket. Raises what the opener raises (``UpstreamError``)."""
        if self._closed:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, "client connection closed"
            )
        if agent_path is not None:
            self._agent_path = agent_path
        task = self._task
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = self._task = asyncio.get_running_loop().create_task(
                self._opener(self._agent_path)
            )
        elif task.done() and task.result().is_closed():
            task = self._task = asyncio.get_running_loop().create_task(
                self._opener(self._agent_path)
            )
        conn = await asyncio.shield(task)
        if self._closed:
            conn.close()
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, "client connection closed"
            )
        if self._agent_path is not None:
            enable_agent(conn, self._agent_path)
        return conn

    def close(self) -> None:
        """The client connection is gone: the connection (and its listeners) goes too."""
        self._closed = True
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            task.add_done_callback(_close_result)
            return
        _close_result(task)


def _close_result(task: asyncio.Task[asyncssh.SSHClientConnection]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    with contextlib.suppress(Exception):
        task.result().close()
