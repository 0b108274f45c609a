"""An upstream session channel opened before the client has said what it wants.

Why: a client opens a session channel and sends its pty, env and exec/shell/subsystem requests
one round trip later. Opening the sandbox's channel at the client's CHANNEL_OPEN, while the
access check runs beside it (gateway/ssh/channels.py), takes the upstream open off the
session's critical path (bench/README.md, "first session after idle"). Nothing starts in the
sandbox before the client's request has arrived and the check has passed: a session channel
without a request runs nothing, and an unused one is closed.

asyncssh opens a session channel and sends its requests in one call
(``SSHClientChannel.create``). ``EarlyChannel`` splits that call: ``open()`` sends
CHANNEL_OPEN now; ``start()`` runs ``create()`` later, whose ``_open`` then returns the
confirmation ``open()`` already has, so only the requests go out. This leans on asyncssh's
private ``_open`` (verified on the version gateway/asyncssh_patches.py pins);
tests/unit/test_early_channel.py fails if ``create()`` stops opening through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import asyncssh
from asyncssh.packet import SSHPacket

# asyncssh's default maximum data packet, what every pooled upstream connection uses.
MAX_PKTSIZE = 32768


class EarlyChannel(asyncssh.SSHClientChannel[bytes]):
    """A session channel on ``conn`` whose open and whose requests are two steps."""

    def __init__(self, conn: asyncssh.SSHClientConnection, window: int) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(conn, loop, "strict", None, "strict", window, MAX_PKTSIZE)
        self._confirmation: SSHPacket | None = None

    async def open(self) -> None:
        """Send CHANNEL_OPEN and wait for the sandbox's answer (ChannelOpenError if refused)."""
        self._confirmation = await asyncssh.SSHClientChannel._open(self, b"session")

    async def _open(self, chantype: bytes, *args: bytes) -> SSHPacket:
        """What ``create()`` calls first: the channel is open already."""
        if self._confirmation is None or chantype != b"session":
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, "early channel used before it opened"
            )
        if self.is_closing():
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, "the sandbox closed the session channel"
            )
        return self._confirmation

    async def start(
        self,
        session_factory: Callable[[], asyncssh.SSHClientSession[bytes]],
        command: str | None,
        *,
        subsystem: str | None = None,
        env: Mapping[bytes, bytes] | None = None,
        request_pty: bool | str = False,
        term_type: str | None = None,
        term_size: tuple[int, int, int, int] | None = None,
        term_modes: Mapping[int, int] | None = None,
        **_ignored: Any,
    ) -> tuple[EarlyChannel, asyncssh.SSHClientSession[bytes]]:
        """The requests, as ``SSHClientConnection.create_session`` would send them.

        Agent and X11 forwarding are never asked for here: a session that wants the user's
        agent runs on a dedicated upstream connection instead (gateway/upstream/dedicated.py).
        ``encoding`` and ``window`` were fixed when the channel was made."""
        pty = bool(term_type) if request_pty is True else request_pty == "force"
        session = await self.create(
            session_factory,
            command,
            subsystem,
            dict(env or {}),
            pty,
            term_type,
            term_size,
            dict(term_modes or {}),
            False,
            None,
            None,
            False,
            False,
        )
        return self, session
