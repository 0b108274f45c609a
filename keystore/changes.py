"""Access changes pushed by PostgreSQL: the listening side of live revocation.

Triggers installed by migration 0002 raise ``pg_notify('rtgw_access', payload)`` whenever access
may have shrunk (a key revoked, deleted or its expiry changed; a sandbox stopped, deleted, moved
to another organization or pointed elsewhere; an organization deleted, or disabled (migration
0003); one of those tables truncated), whoever made the change. :func:`parse_change` turns a
payload into an :class:`AccessChange`; :class:`ChangeListener` keeps one dedicated connection
per process LISTENing on the channel, and re-establishes it by itself.

Notifications are only delivered to a connection that is listening at commit time: whatever is
committed while the listener is down is lost. That is why every (re)subscription is followed by
``on_subscribed``, in which the caller re-checks every live grant against the database
(:func:`keystore.access.check_grants`). The order (LISTEN first, then re-check) leaves no gap: a
change committed after the LISTEN arrives as a notification, one committed before it is seen by
the re-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from keystore import db as keystore_db
from keystore.errors import InvalidChange

log = structlog.get_logger("keystore.changes")

CHANNEL = "rtgw_access"
KINDS = ("ssh_key", "cert_authority", "sandbox", "org", "all")
OPS = ("insert", "update", "delete", "truncate")
MAX_PAYLOAD_BYTES = 8000  # PostgreSQL's NOTIFY payload limit (7999 bytes plus the terminator)

State = Literal["connecting", "listening", "down"]
OnChange = Callable[["AccessChange"], Awaitable[None] | None]
OnSubscribed = Callable[[], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class AccessChange:
    """One notification: something that may narrow access changed.

    ``kind`` says what changed: ``ssh_key`` (``key_id`` and ``fingerprint`` set),
    ``cert_authority`` (``key_id`` is the CA's id: a CA or one of its revocations changed,
    migration 0004), ``sandbox``
    (``sandbox_id`` set), ``org`` (the organization ``org_id`` was deleted, op ``delete``, or
    disabled or re-enabled, op ``update``) or ``all`` (a table
    was truncated: re-check everything; ``org_id`` is None). ``org_id`` is the organization that
    may lose access (for a key or sandbox moved to another organization, the old one). ``op`` is
    ``insert`` (a key or CA registered: widening, migration 0005), ``update``, ``delete`` or
    ``truncate``; ``changed`` names the columns an update changed
    (e.g. ``revoked_at``, ``expires_at``, ``status``, ``org_id``). ``at`` is the database's
    ``clock_timestamp()`` when the change was written, as Unix epoch seconds (the commit follows
    shortly after): the start of the revocation lag.
    """

    kind: str
    org_id: uuid.UUID | None
    op: str | None = None
    sandbox_id: str | None = None
    key_id: uuid.UUID | None = None
    fingerprint: str | None = None
    changed: tuple[str, ...] = ()
    at: float | None = None

    def concerns(self, org_id: uuid.UUID, sandbox_id: str, key_id: uuid.UUID) -> bool:
        """Whether a live grant (sandbox ``sandbox_id`` of ``org_id``, opened with ``key_id``)
        must be re-checked because of this change. Errs on the side of re-checking."""
        if self.kind == "all":
            return True
        if self.org_id != org_id:
            return False
        if self.kind in ("ssh_key", "cert_authority"):
            return self.key_id == key_id
        if self.kind == "sandbox":
            return self.sandbox_id == sandbox_id
        return True


def _uuid(value: Any, field: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise InvalidChange(f"{field} must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InvalidChange(f"{field} is not a UUID") from exc


def _optional_str(data: dict[str, Any], field: str) -> str | None:
    value = data.get(field)
    if value is not None and not isinstance(value, str):
        raise InvalidChange(f"{field} must be a string")
    return value


def parse_change(payload: str | bytes) -> AccessChange:
    """Parse a ``rtgw_access`` payload; ``InvalidChange`` when it is not one.

    Unknown fields are ignored, so later migrations may add some.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidChange("payload larger than a NOTIFY payload can be")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidChange("payload is not JSON") from exc
    if not isinstance(data, dict):
        raise InvalidChange("payload is not a JSON object")
    kind = data.get("kind")
    if kind not in KINDS:
        raise InvalidChange(f"unknown kind {str(kind)[:40]!r}")
    op = _optional_str(data, "op")
    if op is not None and op not in OPS:
        raise InvalidChange(f"unknown op {op[:40]!r}")
    raw_org = data.get("org_id")
    if kind == "all":
        org_id = None if raw_org is None else _uuid(raw_org, "org_id")
    else:
        org_id = _uuid(raw_org, "org_id")
    sandbox_id = _optional_str(data, "sandbox_id")
    if kind == "sandbox" and not sandbox_id:
        raise InvalidChange("a sandbox change names no sandbox_id")
    raw_key = data.get("key_id")
    key_id = None if raw_key is None else _uuid(raw_key, "key_id")
    if kind in ("ssh_key", "cert_authority") and key_id is None:
        raise InvalidChange(f"an {kind} change names no key_id")
    fingerprint = _optional_str(data, "fingerprint")
    changed = data.get("changed", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        raise InvalidChange("changed must be a list of column names")
    at = data.get("at")
    if at is not None:
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            raise InvalidChange("at must be a number of epoch seconds")
        at = float(at)
    return AccessChange(
        kind=kind,
        org_id=org_id,
        op=op,
        sandbox_id=sandbox_id,
        key_id=key_id,
        fingerprint=fingerprint,
        changed=tuple(changed),
        at=at,
    )


@dataclass(slots=True)
class _Resync:
    """Queue item: call ``on_subscribed``; ``done`` (if any) receives the outcome."""

    done: asyncio.Future[None] | None


async def _call(fn: Callable[..., Awaitable[None] | None], *args: Any) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


class ChangeListener:
    """One dedicated connection (not from the pool) LISTENing on ``rtgw_access``.

    ``on_change(change)`` is called for every notification, ``on_subscribed()`` after every
    successful (re)subscription, once LISTEN is in place: re-check everything there. Either may
    be a plain function or a coroutine function. They are called one at a time, in order, from
    one task (so a slow callback delays the next: hand long work to a task of your own). An
    exception from ``on_change`` is logged and skipped; one from ``on_subscribed`` fails the
    subscription, which is retried (the connection is dropped and opened again).

    ``state``: ``connecting`` while an attempt is under way, ``listening`` once LISTEN is in
    place *and* ``on_subscribed`` has returned, ``down`` between attempts (after a failure or a
    lost connection, and after :meth:`close`). A lost connection is noticed at once through
    asyncpg's termination listener (``pg_terminate_backend``, server restart, reset socket),
    and otherwise by a ``SELECT 1`` every ``health_interval_seconds`` that must answer within
    ``health_timeout_seconds`` (a silent network or a frozen server). Attempts are retried
    after ``backoff_initial_seconds``, doubling up to ``backoff_max_seconds`` (with jitter).

    ``dsn`` may name several hosts (``postgresql://h1:p1,h2:p2/db?target_session_attrs=...``):
    each attempt walks them in order, ``connect_timeout_seconds`` per host, and only accepts a
    primary (a hot standby cannot LISTEN, and its notifications would never come), so after a
    failover the listener follows the new primary by itself.

    If more than ``max_pending`` notifications wait for the callbacks, they are dropped and
    replaced by one ``on_subscribed()`` call: the full re-check covers them.
    """

    def __init__(
        self,
        dsn: str,
        on_change: OnChange,
        *,
        on_subscribed: OnSubscribed | None = None,
        channel: str = CHANNEL,
        connect_timeout_seconds: float = 5.0,
        health_interval_seconds: float = 2.0,
        health_timeout_seconds: float = 2.0,
        backoff_initial_seconds: float = 0.2,
        backoff_max_seconds: float = 5.0,
        max_pending: int = 10_000,
        application_name: str = "runtools-gateway-listener",
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._on_subscribed = on_subscribed
        self._channel = channel
        self._connect_timeout = connect_timeout_seconds
        self._health_interval = health_interval_seconds
        self._health_timeout = health_timeout_seconds
        self._backoff_initial = backoff_initial_seconds
        self._backoff_max = backoff_max_seconds
        self._max_pending = max_pending
        self._application_name = application_name

        self._state: State = "connecting"
        now = time.time()
        #: Wall-clock (epoch seconds) times, for /readyz and metrics.
        self.state_since: float = now
        self.listening_since: float | None = None
        self.down_since: float | None = now  # not listening since; None while listening
        self.last_notification_at: float | None = None
        self.last_health_ok_at: float | None = None
        #: Counters and details.
        self.subscriptions = 0  # successful (re)subscriptions, on_subscribed included
        self.notifications = 0  # payloads received
        self.malformed = 0  # payloads that were not valid changes (skipped)
        self.overflows = 0  # times the pending queue overflowed (replaced by a re-check)
        self.callback_errors = 0  # exceptions raised by on_change (skipped)
        self.last_error: str | None = None
        self.backend_pid: int | None = None

        self._queue: asyncio.Queue[AccessChange | _Resync] = asyncio.Queue()
        self._conn: Any = None
        self._runner: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._listening = asyncio.Event()
        self._closing = asyncio.Event()

    # -- public API -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    async def start(self) -> None:
        """Start listening in the background; return once the first attempt has ended.

        Never raises for a database that cannot be reached: the state says ``down`` and
        attempts go on in the background. Use :meth:`wait_listening` to wait for more.
        """
        if self._runner is not None:
            raise RuntimeError("ChangeListener already started")
        self._dispatcher = asyncio.create_task(self._dispatch(), name="rtgw-changes-dispatch")
        self._runner = asyncio.create_task(self._run(), name="rtgw-changes-listen")
        await self._first_attempt.wait()

    async def wait_listening(self, timeout_seconds: float) -> bool:
        """Wait up to ``timeout_seconds`` for the ``listening`` state; return whether it holds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout_seconds)
        return self._state == "listening"

    async def close(self) -> None:
        """Stop listening and close the connection; pending notifications are dropped."""
        self._closing.set()
        for task in (self._runner, self._dispatcher):
            if task is not None:
                task.cancel()
        for task in (self._runner, self._dispatcher):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._drop_connection()
        self._set_state("down")

    # -- internals --------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state == self._state:
            return
        now = time.time()
        if state == "listening":
            self.listening_since = now
            self.down_since = None
            self._listening.set()
        elif self._state == "listening":
            self.listening_since = None
            self.down_since = now
            self._listening.clear()
        self._state = state
        self.state_since = now
        log.info("access_listener_state", state=state, error=self.last_error)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_initial * 2.0 ** min(failures, 30))
        return ceiling * random.uniform(0.5, 1.0)  # jitter, not security

    async def _run(self) -> None:
        failures = 0
        while not self._closing.is_set():
            self._set_state("connecting")
            try:
                listened = await self._listen_once()
                # It was listening, then the connection was lost: reconnect at once (a
                # failover, a terminated backend), unless it keeps flapping.
                if listened >= self._backoff_max:
                    failures = 0
                delay = self._backoff(failures) if failures else 0.0
                failures += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("access_listener_failed", error=self.last_error)
                delay = self._backoff(failures)
                failures += 1
            finally:
                await self._drop_connection()
                self._first_attempt.set()
            if self._closing.is_set():
                break
            self._set_state("down")
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)

    async def _listen_once(self) -> float:
        """Connect, LISTEN, re-check (on_subscribed), then watch until the connection is lost.

        Returns how long (seconds) the subscription held once it is lost; raises when it could
        not be made.
        """
        attrs = keystore_db.target_session_attrs_of(self._dsn)
        self._conn = conn = await keystore_db.connect_raw(
            self._dsn,
            timeout_seconds=self._connect_timeout,
            # LISTEN needs a primary; a DSN asking for "read-write" already implies one.
            target_session_attrs=attrs if attrs in ("primary", "read-write") else "primary",
            server_settings={"application_name": self._application_name},
        )
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(self._channel, self._notified)  # runs LISTEN
        self.backend_pid = conn.get_server_pid()
        # Subscribed: now re-check everything, behind any notification already queued.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Resync(done))
        await done
        if lost.is_set() or conn.is_closed():
            raise ConnectionError("connection lost during the re-check after subscribing")
        self.subscriptions += 1
        self.last_error = None
        self._set_state("listening")
        self._first_attempt.set()
        began = time.monotonic()
        await self._watch(conn, lost)
        return time.monotonic() - began

    async def _watch(self, conn: Any, lost: asyncio.Event) -> None:
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self._health_interval)
            if lost.is_set() or conn.is_closed():
                break
            try:
                await conn.fetchval("SELECT 1", timeout=self._health_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"health check failed: {type(exc).__name__}: {exc}"[:300]
                log.warning("access_listener_unhealthy", error=self.last_error)
                return
            self.last_health_ok_at = time.time()
        self.last_error = "connection lost"
        log.warning("access_listener_lost", backend_pid=self.backend_pid)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 1.0)
            except asyncio.CancelledError:
                conn.terminate()
                raise
            except Exception:
                conn.terminate()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        """asyncpg's listener callback: parse and queue, never raise."""
        self.notifications += 1
        self.last_notification_at = time.time()
        try:
            change = parse_change(payload)
        except InvalidChange as exc:
            self.malformed += 1
            log.warning("access_change_malformed", error=str(exc), payload=payload[:200])
            return
        if self._queue.qsize() >= self._max_pending:
            self._overflow()
            return
        self._queue.put_nowait(change)

    def _overflow(self) -> None:
        """Too many pending changes: drop them for one full re-check (keep awaited re-checks)."""
        self.overflows += 1
        kept: list[_Resync] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _Resync) and item.done is not None:
                kept.append(item)
        for item in kept:
            self._queue.put_nowait(item)
        self._queue.put_nowait(_Resync(None))
        log.warning("access_changes_overflow", dropped_for_recheck=True)

    async def _dispatch(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, _Resync):
                try:
                    if self._on_subscribed is not None:
                        await _call(self._on_subscribed)
                except asyncio.CancelledError:
                    if item.done is not None and not item.done.done():
                        item.done.cancel()
                    raise
                except Exception as exc:
                    if item.done is not None and not item.done.done():
                        item.done.set_exception(exc)
                    else:
                        # The re-check that replaced dropped changes failed: drop the
                        # connection so the resubscription re-checks again.
                        self.callback_errors += 1
                        log.exception("access_recheck_failed")
                        if self._conn is not None:
                            self._conn.terminate()
                    continue
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)
                continue
            try:
                await _call(self._on_change, item)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.callback_errors += 1
                log.exception("access_change_callback_failed", kind=item.kind)
