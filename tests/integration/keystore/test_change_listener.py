"""keystore.changes.ChangeListener against a real PostgreSQL: it hears the triggers, comes back
by itself when its backend is terminated or the network goes away or freezes, re-runs
``on_subscribed`` after every resubscription, and follows a multi-host DSN."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from keystore import access, ssh_keys
from keystore import db as keystore_db
from keystore.access import Grant
from keystore.changes import AccessChange, ChangeListener
from tests.integration.keystore.support import WAIT

FAST: dict[str, Any] = {
    "health_interval_seconds": 0.3,
    "health_timeout_seconds": 0.5,
    "connect_timeout_seconds": 1.0,
    "backoff_initial_seconds": 0.05,
    "backoff_max_seconds": 0.3,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_hosts(url: str, hostlist: str, query: str = "") -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{userinfo}@{hostlist}", query=query).geturl()


async def until(predicate: Callable[[], bool], seconds: float = WAIT) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), seconds)


class Relay:
    """A loopback TCP forwarder in this event loop that can be cut (sockets closed, port
    refusing) or frozen (sockets open, nothing forwarded), then restored on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        dst.close()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in self._writers:
            w.close()
        self._writers.clear()


@pytest.fixture
async def relay(database_url: str) -> AsyncIterator[Relay]:
    r = Relay(urlsplit(database_url).port or 5432)
    await r.start()
    yield r
    r.flowing.set()
    await r.cut()


class Recorder:
    def __init__(self) -> None:
        self.changes: asyncio.Queue[AccessChange] = asyncio.Queue()
        self.subscribed = 0

    def on_change(self, change: AccessChange) -> None:  # a plain function works
        self.changes.put_nowait(change)

    async def on_subscribed(self) -> None:  # and so does a coroutine function
        self.subscribed += 1

    async def change_for(self, key_id: Any, *, inserts: bool = False) -> AccessChange:
        """The next change naming ``key_id`` (registrations skipped unless ``inserts``)."""

        async def go() -> AccessChange:
            while True:
                change = await self.changes.get()
                if change.key_id == key_id and (inserts or change.op != "insert"):
                    return change

        return await asyncio.wait_for(go(), WAIT)


async def test_hears_a_revocation_and_comes_back_after_terminate(
    database_url: str, make_org: Any, pool: Any
) -> None:
    rec = Recorder()
    listener = ChangeListener(database_url, rec.on_change, on_subscribed=rec.on_subscribed, **FAST)
    before: str = listener.state
    assert before == "connecting"
    await listener.start()
    try:
        assert listener.state == "listening"
        assert rec.subscribed == 1 and listener.subscriptions == 1
        assert listener.listening_since is not None and listener.down_since is None
        org = await make_org()
        key_id, fingerprint = await org.add_key()
        await ssh_keys.revoke_key(pool, org.id, str(key_id))
        change = await rec.change_for(key_id)
        assert (change.kind, change.org_id, change.fingerprint) == ("ssh_key", org.id, fingerprint)
        assert listener.last_notification_at is not None

        first_pid = listener.backend_pid
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", first_pid)
        await until(lambda: listener.subscriptions == 2 and listener.state == "listening")
        assert rec.subscribed == 2
        assert listener.backend_pid != first_pid
        states = await pool.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            "runtools-gateway-listener",
        )
        assert listener.backend_pid in {r["pid"] for r in states}

        second, _ = await org.add_key()
        await pool.execute("DELETE FROM ssh_keys WHERE id = $1", second)
        assert (await rec.change_for(second)).op == "delete"
    finally:
        await listener.close()
    after: str = listener.state
    assert after == "down"
    assert not await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", listener.backend_pid
    )


async def test_recheck_after_an_outage_sees_what_was_missed(
    database_url: str, make_org: Any, pool: Any, relay: Relay
) -> None:
    org = await make_org()
    key_id, _ = await org.add_key()
    grant = Grant(org.sandbox_id, org.id, key_id)
    verdicts: list[str | None] = []

    async def recheck() -> None:  # what the gateway does: re-check every live grant
        (check,) = await access.check_grants(pool, [grant])
        verdicts.append(check.reason)

    url = with_hosts(database_url, f"127.0.0.1:{relay.port}")
    listener = ChangeListener(url, lambda change: None, on_subscribed=recheck, **FAST)
    await listener.start()
    try:
        assert verdicts == [None]
        await relay.cut()  # the database goes away: noticed through the closed socket
        await until(lambda: listener.state != "listening")
        assert listener.down_since is not None and listener.last_error
        await ssh_keys.revoke_key(pool, org.id, str(key_id))  # nobody is listening
        await asyncio.sleep(0.5)  # a few failed attempts
        assert listener.state != "listening"
        await relay.start()
        assert await listener.wait_listening(WAIT)
        assert verdicts == [None, access.KEY_REVOKED]
    finally:
        await listener.close()


async def test_a_frozen_connection_is_found_by_the_health_check(
    database_url: str, relay: Relay
) -> None:
    rec = Recorder()
    url = with_hosts(database_url, f"127.0.0.1:{relay.port}")
    listener = ChangeListener(url, rec.on_change, on_subscribed=rec.on_subscribed, **FAST)
    await listener.start()
    try:
        assert listener.state == "listening"
        relay.flowing.clear()  # packets vanish; no socket is closed
        await until(lambda: listener.state != "listening")
        assert "health check" in (listener.last_error or "")
        relay.flowing.set()
        await until(lambda: rec.subscribed == 2 and listener.state == "listening")
    finally:
        await listener.close()


async def test_a_failing_recheck_fails_the_subscription_until_it_passes(
    database_url: str,
) -> None:
    calls = 0

    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("database hiccup")

    listener = ChangeListener(database_url, lambda change: None, on_subscribed=flaky, **FAST)
    await listener.start()
    try:
        assert listener.state != "listening"  # the first attempt did not count
        assert "database hiccup" in (listener.last_error or "")
        assert await listener.wait_listening(WAIT)
        assert calls == 3 and listener.subscriptions == 1
    finally:
        await listener.close()


async def test_multi_host_dsn_skips_dead_and_silent_hosts(
    database_url: str, make_org: Any, pool: Any
) -> None:
    real = urlsplit(database_url).port
    dead = free_port()  # nothing listens: refused at once
    silent = socket.socket()  # accepts TCP, never answers: only a per-host timeout gets past it
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    silent_port = silent.getsockname()[1]
    hosts = f"127.0.0.1:{dead},127.0.0.1:{silent_port},127.0.0.1:{real}"
    url = with_hosts(database_url, hosts, "target_session_attrs=read-write")
    assert keystore_db.dsn_hosts(url) == [
        ("127.0.0.1", dead),
        ("127.0.0.1", silent_port),
        ("127.0.0.1", real),
    ]
    try:
        multi_pool = await keystore_db.create_pool(
            url, min_size=1, max_size=2, connect_timeout_seconds=1.0
        )
        try:
            assert await multi_pool.fetchval("SELECT NOT pg_is_in_recovery()")
        finally:
            await multi_pool.close()

        rec = Recorder()
        listener = ChangeListener(url, rec.on_change, on_subscribed=rec.on_subscribed, **FAST)
        await listener.start()
        try:
            assert listener.state == "listening"
            org = await make_org()
            key_id, _ = await org.add_key()
            await ssh_keys.revoke_key(pool, org.id, str(key_id))
            await rec.change_for(key_id)
        finally:
            await listener.close()
    finally:
        silent.close()
