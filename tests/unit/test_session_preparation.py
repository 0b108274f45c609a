"""A session's early upstream channel is never left open in the sandbox when its session will not
use it (gateway/ssh/channels.py ``Channels._prepare``): whichever of the access check and the
channel's open finishes first, and whenever the preparation is cancelled. The opening and the
check are stand-ins here (the concurrency is the logic under test); the real thing with ssh and
sshd is tests/integration/revocation/test_channel_checks.py."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
import structlog

from gateway.errors import UpstreamError
from gateway.ssh.channels import AuditedSession, Channels
from gateway.upstream.early import EarlyChannel


class Chan:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Prepared(Channels):
    """Channels whose check and open are driven by the test."""

    def __init__(self) -> None:
        super().__init__(
            cast(Any, None),
            conn_id="c1",
            accepted=cast(Any, None),
            peer=None,
            peer_port=None,
            log=structlog.get_logger("test"),
            on_idle_while_draining=lambda: None,
        )
        self.chan = Chan()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.checked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def _open_early(self, session: AuditedSession) -> EarlyChannel:
        await self.opened
        return cast(EarlyChannel, self.chan)

    async def _admit_now(self) -> None:
        await self.checked


SESSION = cast(AuditedSession, object())


async def test_a_refusal_after_the_channel_opened_closes_it() -> None:
    prepared = Prepared()
    task = asyncio.ensure_future(prepared._prepare(SESSION))
    prepared.opened.set_result(None)
    await asyncio.sleep(0.01)
    prepared.checked.set_exception(UpstreamError("access_ended", "key_revoked"))
    with pytest.raises(UpstreamError):
        await task
    await asyncio.sleep(0)
    assert prepared.chan.closed


async def test_a_refusal_before_the_channel_opened_stops_the_open() -> None:
    prepared = Prepared()
    task = asyncio.ensure_future(prepared._prepare(SESSION))
    await asyncio.sleep(0.01)
    prepared.checked.set_exception(UpstreamError("revocation_unverified", "listener down"))
    with pytest.raises(UpstreamError):
        await task
    await asyncio.sleep(0.01)
    assert prepared.opened.cancelled()  # the open waited on was given up
    assert not prepared.chan.closed  # never opened: nothing to close


async def test_a_session_that_ends_just_as_its_channel_opened_closes_it() -> None:
    prepared = Prepared()
    prepared.checked.set_result(None)
    task = asyncio.ensure_future(prepared._prepare(SESSION))
    await asyncio.sleep(0.01)
    prepared.opened.set_result(None)
    task.cancel()  # the session ended in the same loop turn
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert prepared.chan.closed


async def test_a_checked_and_opened_channel_is_handed_over_open() -> None:
    prepared = Prepared()
    prepared.checked.set_result(None)
    prepared.opened.set_result(None)
    chan = await prepared._prepare(SESSION)
    assert chan is cast(EarlyChannel, prepared.chan)
    assert not prepared.chan.closed
