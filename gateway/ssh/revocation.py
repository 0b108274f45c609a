"""Live revocation: access that shrinks in the database ends live sessions within seconds.

The database raises a notification for every change that can end access, whoever wrote it
(keystore/migrations/0002_access_changes.sql); one listener connection per process receives
them (keystore/changes.py). ``Revocation`` finds the connections a change concerns through the
registry (by key, sandbox or organization), re-checks their grants against the database in one
query (keystore/access.py) and ends those no longer allowed: every session gets one stderr line
saying what happened, then the connection closes (a ControlMaster cannot open another session).
Other keys' sessions, on the same shared upstream connection too, are untouched.

Subscribe first, then check: after every (re)subscription the listener calls ``reconcile()``,
which re-checks every live connection, so a change made while the listener was down is not
missed; a periodic reconcile is the safety net. When a pushed change cannot be checked (the
database did not answer), nothing is dropped: a full re-check is retried, backing off from
0.5 s to 10 s, until one succeeds. A key's ``expires_at`` is a timer per connection, re-armed
whenever a check reports a new expiry.

New sessions and forwarding channels on an open connection are checked against the database
when they open (``check_channel``), never against the snapshot taken at login. A connection
whose grant the database found valid less than ``revocation.access_cache_seconds`` ago, with no
change concerning it notified since and the listener healthy, reuses that verdict instead of
asking again (why: the query was the longest step of a session's start, bench/README.md): the
database is as current as the notifications, which reach this process within milliseconds and
drop the verdicts they concern; a verdict whose query raced any change is never kept. While the
listener is down, ``revocation.mode`` decides: ``strict`` (default) refuses new channels on
live connections until a reconcile has succeeded again; ``best_effort`` lets them through on
the per-channel check alone. Either way /readyz and the metrics show the listener's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from gateway import messages
from gateway.daemon import metrics
from gateway.errors import UpstreamError
from gateway.ssh.registry import Identity, LiveConnection, Registry
from keystore import access
from keystore.db import Executor
from keystore.errors import Unavailable

log = structlog.get_logger("gateway.ssh.revocation")

# How long the stderr line and exit status get to reach the client before the connection closes.
_CLOSE_GRACE_SECONDS = 0.3
# After a pushed change could not be checked: first retry of the full re-check, and the most
# it backs off to while the database stays unavailable.
_CATCH_UP_FIRST_SECONDS = 0.5
_CATCH_UP_MAX_SECONDS = 10.0


class Change(Protocol):
    """One notification (keystore.changes.AccessChange fits)."""

    @property
    def kind(self) -> str: ...  # ssh_key | sandbox | org | all

    @property
    def org_id(self) -> Any: ...

    @property
    def sandbox_id(self) -> str | None: ...

    @property
    def key_id(self) -> Any: ...

    @property
    def at(self) -> float | None: ...  # commit-side clock, epoch seconds


def grant_of(identity: Identity) -> access.Grant:
    return access.Grant(
        sandbox_id=identity.sandbox_id,
        org_id=identity.org_id,
        key_id=identity.key_id,
        credential=access.CERTIFICATE if identity.is_certificate else access.KEY,
        cert_key_id=identity.cert_key_id,
        cert_serial=identity.cert_serial,
        cert_principals=identity.cert_principals,
    )


class Revocation:
    def __init__(
        self,
        registry: Registry,
        db: Executor,
        *,
        mode: str = "strict",
        register_key_hint: Callable[[], str] | None = None,
        reuse_seconds: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._db = db
        self.mode = mode
        # What the access-ended line tells users to run (ssh.register_key_hint, read at each
        # use so a reload applies); None: the messages module's default.
        self._hint = register_key_hint
        # The listener's state ("listening" only once its on_subscribed, our reconcile, has
        # succeeded); set by whoever starts the listener (gateway/daemon/lifecycle.py).
        self.listener_state: Callable[[], str] = lambda: "down"
        self._check_failed = False  # a pushed change could not be checked: reconcile again
        self._failures = 0  # checks that failed so far (a reconcile clears only older ones)
        self._catch_up: asyncio.Task[None] | None = None
        self._timers: dict[LiveConnection, asyncio.TimerHandle] = {}
        self._ending: set[LiveConnection] = set()
        self._stopped_at_login: set[LiveConnection] = set()
        self._pending: set[LiveConnection] = set()
        self._pending_at: float | None = None
        self._flush: asyncio.Task[None] | None = None
        # How long a connection's valid verdict is reused by check_channel (read at each use,
        # so a reload applies; 0: always query), the verdicts (when checked, the key's expiry),
        # and a count of notified changes: a verdict whose query saw it move is not kept.
        self._reuse_seconds = reuse_seconds
        self._clock = clock
        self._verified: dict[LiveConnection, tuple[float, dt.datetime | None]] = {}
        self._changes_seen = 0

    # --- state ---

    @property
    def healthy(self) -> bool:
        """Every change since the last full reconcile has reached us and been applied."""
        return self.listener_state() == "listening" and not self._check_failed

    # --- connections come and go ---

    def track(
        self, conn: LiveConnection, key_expires_at: dt.datetime | None, sandbox_running: bool
    ) -> None:
        """A connection authenticated: arm its key's expiry."""
        if not sandbox_running:
            self._stopped_at_login.add(conn)
        self._arm(conn, key_expires_at)

    def forget(self, conn: LiveConnection) -> None:
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        self._ending.discard(conn)
        self._stopped_at_login.discard(conn)
        self._pending.discard(conn)
        self._verified.pop(conn, None)

    # --- the database told us something changed ---

    def on_change(self, change: Change) -> None:
        self._changes_seen += 1
        reg = self._registry
        if change.kind in ("ssh_key", "cert_authority") and change.key_id is not None:
            conns = reg.by_key(change.key_id)
        elif change.kind == "sandbox" and change.sandbox_id is not None:
            conns = reg.by_sandbox(change.sandbox_id)
        elif change.kind == "org" and change.org_id is not None:
            conns = reg.by_org(change.org_id)
        else:
            conns = [c for c, _ in reg.authenticated_connections()]
        for conn in conns:
            self._verified.pop(conn, None)
        if conns:
            self._queue(conns, change.at)

    async def reconcile(self) -> int:
        """Re-check every live connection; the number ended. Raises what the check raised
        (``Unavailable`` when the database did not answer)."""
        failures = self._failures
        conns = [c for c, _ in self._registry.authenticated_connections()]
        try:
            ended = await self._check(conns, None)
        except Exception as exc:
            metrics.RECONCILES.labels("failed").inc()
            log.warning("reconcile_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            raise
        if self._failures == failures:
            # Every change that failed to be checked before this reconcile began is covered;
            # one that failed meanwhile may not be (its connections may have been read
            # before the change): that one keeps its catch-up going.
            self._check_failed = False
        metrics.RECONCILES.labels("ok").inc()
        log.info("reconciled", connections=len(conns), ended=ended)
        return ended

    async def reconcile_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            with contextlib.suppress(Exception):  # logged and counted by reconcile()
                await self.reconcile()

    def close(self) -> None:
        """Stop the timers and background checks (at shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._verified.clear()
        for task in (self._flush, self._catch_up):
            if task is not None:
                task.cancel()

    # --- a new channel on a live connection ---

    async def check_channel(self, conn: LiveConnection, identity: Identity) -> None:
        """Raise UpstreamError (reason code + detail) unless this channel may open now."""
        if conn in self._ending:
            raise UpstreamError(messages.ACCESS_ENDED.code, "access already ended")
        if self.mode == "strict" and not self.healthy:
            raise UpstreamError(
                messages.REVOCATION_UNVERIFIED.code, "revocation listener not reconciled"
            )
        if self._reusable(conn):
            metrics.CHANNEL_CHECKS.labels("reused").inc()
            return
        metrics.CHANNEL_CHECKS.labels("queried").inc()
        seen = self._changes_seen
        try:
            checks = await access.check_grants(self._db, [grant_of(identity)])
        except Unavailable as exc:
            if self.mode == "strict":
                raise UpstreamError(messages.REVOCATION_UNVERIFIED.code, str(exc)) from exc
            return
        check = checks[0]
        if check.reason is None:
            self._stopped_at_login.discard(conn)
            self._verified_valid(conn, check.key_expires_at, seen)
            return
        if check.reason == access.SANDBOX_STOPPED:
            # Not a change for a login made while stopped: the session says so and goes on.
            raise UpstreamError(messages.SANDBOX_STOPPED.code, "sandbox is not running")
        self._end(conn, identity, check.reason, None)
        raise UpstreamError(messages.ACCESS_ENDED.code, check.reason)

    # --- internals ---

    def _reusable(self, conn: LiveConnection) -> bool:
        """A verdict younger than ``reuse_seconds``, no change concerning the connection
        since (on_change dropped it otherwise), none still being checked, the listener
        healthy, and the key not expired meanwhile."""
        if not self.healthy:
            self._verified.clear()  # changes may be missed: nothing is reused until reconciled
            return False
        verdict = self._verified.get(conn)
        if verdict is None or conn in self._pending:
            return False
        checked_at, expires_at = verdict
        if self._clock() - checked_at >= self._reuse_seconds():
            return False
        return expires_at is None or expires_at.timestamp() > time.time()

    def _verified_valid(
        self, conn: LiveConnection, expires_at: dt.datetime | None, seen: int
    ) -> None:
        """Keep a valid verdict for check_channel, unless a change was notified while its
        query ran (the answer may predate that change) or changes may be going unnoticed."""
        if seen == self._changes_seen and self.healthy and self._reuse_seconds() > 0:
            self._verified[conn] = (self._clock(), expires_at)

    def _arm(self, conn: LiveConnection, expires_at: dt.datetime | None) -> None:
        old = self._timers.pop(conn, None)
        if old is not None:
            old.cancel()
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, expires_at.timestamp() - time.time())
        at = expires_at.timestamp()
        self._timers[conn] = loop.call_later(delay + 0.05, self._queue, [conn], at)

    def _queue(self, conns: Iterable[LiveConnection], at: float | None) -> None:
        self._pending.update(conns)
        if at is not None and (self._pending_at is None or at < self._pending_at):
            self._pending_at = at
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._run_pending())

    async def _run_pending(self) -> None:
        await asyncio.sleep(0)  # gather every change of this event-loop turn into one query
        while self._pending:
            conns, at = list(self._pending), self._pending_at
            self._pending.clear()
            self._pending_at = None
            try:
                await self._check(conns, at)
            except Exception as exc:
                # Nothing of this batch (nor what queued meanwhile) is lost: a full re-check
                # follows, retried until it succeeds; strict mode refuses channels meanwhile.
                log.warning(
                    "revocation_check_failed",
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    connections=len(conns),
                )
                self._failures += 1
                self._check_failed = True
                self._pending.clear()
                self._pending_at = None
                self._start_catch_up()
                return

    def _start_catch_up(self) -> None:
        if self._catch_up is None or self._catch_up.done():
            self._catch_up = asyncio.get_running_loop().create_task(self._catch_up_loop())

    async def _catch_up_loop(self) -> None:
        """Re-check everything until a reconcile succeeds after the last failed check."""
        delay = _CATCH_UP_FIRST_SECONDS
        while self._check_failed:
            await asyncio.sleep(delay)
            try:
                await self.reconcile()
            except Exception:  # logged and counted by reconcile()
                delay = min(delay * 2, _CATCH_UP_MAX_SECONDS)

    async def _check(self, conns: list[LiveConnection], at: float | None) -> int:
        pairs = [(c, self._registry.identity(c)) for c in conns if c not in self._ending]
        live = [(c, i) for c, i in pairs if i is not None]
        if not live:
            return 0
        seen = self._changes_seen
        checks = await access.check_grants(self._db, [grant_of(i) for _, i in live])
        ended = 0
        for (conn, identity), check in zip(live, checks, strict=True):
            if check.reason is None:
                # Running now: a later stop ends this connection like any other.
                self._stopped_at_login.discard(conn)
                self._arm(conn, check.key_expires_at)
                self._verified_valid(conn, check.key_expires_at, seen)
                continue
            if check.reason == access.SANDBOX_STOPPED and conn in self._stopped_at_login:
                continue
            self._end(conn, identity, check.reason, at)
            ended += 1
        return ended

    def _end(self, conn: LiveConnection, identity: Identity, reason: str, at: float | None) -> None:
        if conn in self._ending:
            return
        self._ending.add(conn)
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        hint = {"hint": self._hint()} if self._hint is not None else {}
        text = messages.access_ended(
            reason, sandbox=identity.sandbox_id, key=identity.fingerprint, **hint
        )
        conn.close_sessions(text, reason)
        if at is not None:
            metrics.REVOCATION_LAG.observe(max(0.0, time.time() - at))
        metrics.REVOKED_CONNECTIONS.labels(reason).inc()
        log.warning(
            "access_ended",
            conn_id=conn.conn_id,
            reason=reason,
            sandbox=identity.sandbox_id,
            key=identity.fingerprint,
            lag_seconds=round(time.time() - at, 3) if at is not None else None,
        )
        asyncio.get_running_loop().call_later(_CLOSE_GRACE_SECONDS, conn.close)
