"""Warm, shared upstream connections: one sandbox's sshd serves many users' sessions.

Opening the upstream SSH connection (TCP + kex + public-key auth against the sandbox's sshd)
is most of the gateway's connect latency. This pool keeps authenticated upstream connections per
``upstream.Target`` (i.e. per sandbox, hence never shared across organizations) and hands out
*leases*: one lease = one channel the caller is about to open.

* **Shared.** Several client connections of the same sandbox's org multiplex their channels on
  one upstream connection, up to ``max_sessions`` leases each (the sandbox's ``MaxSessions``;
  OpenSSH's default is 10). A sandbox gets up to ``max_conns_per_target`` connections, so its
  capacity is ``max_sessions x max_conns_per_target`` channels (``PoolLimits.per_target``).
* **Opens instead of waiting.** While a sandbox is below its cap, callers that find every
  connection full get new connections, opened concurrently (one per ``max_sessions`` waiting
  callers), not one after the other. Only at the cap does ``acquire`` wait for a release, in
  arrival order, and at most ``lease_timeout_seconds``: then it raises ``UpstreamError``
  (``upstream_busy``), whose text says what happened and what to do.
* **Cancel-safe.** A caller cancelled (or timed out) while waiting leaves nothing behind: a
  lease handed to it at that very moment goes back to the pool.
* **Warm.** ``warm(target)`` opens a connection ahead of need (the SSH door calls it once the
  user's signature verified) and concurrent callers share that attempt. A failed attempt fails
  the callers waiting for it, with the connector's error, and nobody else (nothing is logged by
  the pool). Idle connections stay open ``idle_seconds`` and then close.
* **Bounded.** ``max_total`` connections in all; the least recently used idle ones are closed
  first to make room.
* **Health-checked.** A connection that closed (keepalive failure, sandbox restart) is dropped
  as soon as asyncssh reports it, and never handed out. ``Lease.report_full()`` is for a channel
  the sandbox refused (its ``MaxSessions`` is lower than ``max_sessions``): that connection's
  capacity drops to what it carries, so the next channel goes to another or a new connection.

Limits are read through ``limits`` (a callable) at each use, so a configuration reload applies
to new leases and new connections; ``on_change`` receives ``stats()`` after every change (the
daemon feeds it to the ``rtgw_upstream_pool`` gauges).

Security trade-off (documented in the README): the gateway already authenticates to sandboxes
with its *own* identity, not the user's, so a shared connection changes nothing the sandbox can
see or enforce; who did what is recorded by the gateway (audit rows per session, with the key
fingerprint). Sharing would be wrong with per-user upstream certificates (the sandbox would
attribute one user's session to another); a deployment that wants those must key the pool by
(target, user key) or disable it. Remote forwardings (``-R``) must not use pooled connections:
their listeners would outlive the client that asked for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway import messages
from gateway.errors import UpstreamError
from gateway.upstream.target import Target


class Connection(Protocol):
    """What the pool needs of an upstream connection (asyncssh.SSHClientConnection fits)."""

    def is_closed(self) -> bool: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


Connector = Callable[[Target], Awaitable[Connection]]


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """How much the pool may hold; see the module docstring."""

    max_sessions: int = 10  # leases per upstream connection (the sandbox's MaxSessions)
    max_conns_per_target: int = 32  # upstream connections per sandbox
    max_total: int = 1024  # upstream connections in all
    idle_seconds: float = 60.0  # an unused connection closes after this long
    lease_timeout_seconds: float = 10.0  # longest wait for a lease when a sandbox is full

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_conns_per_target < 1 or self.max_total < 1:
            raise ValueError("pool limits must be >= 1")
        if self.lease_timeout_seconds <= 0 or self.idle_seconds < 0:
            raise ValueError("pool timeouts must be positive")

    @property
    def per_target(self) -> int:
        """Channels one sandbox may carry at once through this pool."""
        return self.max_sessions * self.max_conns_per_target


@dataclass(eq=False)
class _Target:
    """One sandbox's connections, connects in flight and callers waiting for a lease."""

    entries: list[_Pooled] = field(default_factory=list)
    opening: int = 0
    waiters: deque[asyncio.Future[_Pooled]] = field(default_factory=deque)

    @property
    def empty(self) -> bool:
        return not self.entries and not self.opening and not self.waiters


@dataclass(eq=False)
class _Pooled:
    target: Target
    group: _Target
    conn: Connection
    capacity: int
    leases: int = 0
    live: bool = True  # still in the pool (False once dropped)
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def usable(self) -> bool:
        return self.live and not self.conn.is_closed() and self.leases < self.capacity


@dataclass(eq=False)
class Lease:
    """One channel's share of a pooled connection; ``release()`` exactly once when it closes."""

    conn: Connection
    _pool: UpstreamPool
    _entry: _Pooled
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._pool._release(self._entry)

    def report_full(self) -> None:
        """The sandbox refused a channel on this connection (its MaxSessions): from now on the
        connection takes no more than it carries without this channel."""
        entry = self._entry
        entry.capacity = min(entry.capacity, max(0, entry.leases - 1))


class UpstreamPool:
    def __init__(
        self,
        connect: Connector,
        *,
        max_sessions: int = 10,
        max_conns_per_target: int = 32,
        max_total: int = 1024,
        idle_seconds: float = 60.0,
        lease_timeout_seconds: float = 10.0,
        limits: Callable[[], PoolLimits] | None = None,
        on_change: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        """Either fixed limits (the keyword arguments) or ``limits``, read at each use."""
        fixed = PoolLimits(
            max_sessions=max_sessions,
            max_conns_per_target=max_conns_per_target,
            max_total=max_total,
            idle_seconds=idle_seconds,
            lease_timeout_seconds=lease_timeout_seconds,
        )
        self._limits: Callable[[], PoolLimits] = limits or (lambda: fixed)
        self._connect = connect
        self._on_change = on_change
        self._targets: dict[Target, _Target] = {}
        # Targets with a logged-in client connection: their last upstream connection stays
        # warm past idle_seconds, so the first session after a pause does not pay a handshake.
        self._pins: dict[Target, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False
        # Running totals, so stats() and the gauges cost nothing per lease.
        self._n_conns = 0
        self._n_leases = 0
        self._n_opening = 0
        self._n_waiting = 0

    @property
    def limits(self) -> PoolLimits:
        return self._limits()

    # --- public API ---

    def pin(self, target: Target) -> None:
        """A client connection to ``target`` logged in: keep one upstream connection warm."""
        self._pins[target] = self._pins.get(target, 0) + 1

    def unpin(self, target: Target) -> None:
        left = self._pins.get(target, 0) - 1
        if left > 0:
            self._pins[target] = left
        else:
            self._pins.pop(target, None)
            self._schedule_reap()

    def warm(self, target: Target) -> None:
        """Start opening a connection to ``target`` unless one is usable or being opened."""
        if self._closed:
            return
        group = self._targets.get(target)
        if group is not None and (group.opening or self._find(group) is not None):
            return
        limits = self.limits
        if group is not None and len(group.entries) >= limits.max_conns_per_target:
            return
        if self._make_room(limits):
            self._start_open(target, group or self._group(target))

    async def acquire(self, target: Target) -> Lease:
        """A lease on a usable connection to ``target``.

        Connector errors propagate (to every caller waiting for that connection). When the
        sandbox is at its cap and nothing is released within ``lease_timeout_seconds``,
        raises ``UpstreamError(upstream_busy)``.
        """
        if self._closed:
            raise UpstreamError(messages.GATEWAY_DRAINING.code, "upstream pool is closed")
        limits = self.limits
        group = self._group(target)
        if not group.waiters:  # nobody queued before us: take a free slot at once
            entry = self._find(group)
            if entry is not None:
                self._take(entry)
                self._changed()
                return Lease(entry.conn, self, entry)
        waiter: asyncio.Future[_Pooled] = asyncio.get_running_loop().create_future()
        group.waiters.append(waiter)
        self._n_waiting += 1
        self._dispatch(group)
        if not waiter.done():
            self._grow(target, group, limits)
        self._changed()
        timeout = asyncio.timeout(limits.lease_timeout_seconds)
        try:
            async with timeout:
                entry = await waiter
        except BaseException:
            self._abandon(target, group, waiter)
            if timeout.expired():
                raise UpstreamError(
                    messages.UPSTREAM_BUSY.code,
                    f"no lease within {limits.lease_timeout_seconds:g} s: "
                    f"{len(group.entries)} connections carry {limits.max_sessions} channels each",
                ) from None
            raise
        self._n_waiting -= 1
        self._changed()
        return Lease(entry.conn, self, entry)

    def stats(self) -> dict[str, int]:
        return {
            "targets": len(self._targets),
            "connections": self._n_conns,
            "leases": self._n_leases,
            "opening": self._n_opening,
            "waiting": self._n_waiting,
        }

    def target_stats(self, target: Target) -> dict[str, int]:
        """One sandbox's share of ``stats()``."""
        group = self._targets.get(target)
        if group is None:
            return {"connections": 0, "leases": 0, "opening": 0, "waiting": 0}
        return {
            "connections": len(group.entries),
            "leases": sum(e.leases for e in group.entries),
            "opening": group.opening,
            "waiting": len(group.waiters),
        }

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._tasks):
            task.cancel()
        closed = UpstreamError(messages.GATEWAY_DRAINING.code, "upstream pool is closed")
        entries = []
        for group in self._targets.values():
            entries += group.entries
            while group.waiters:
                waiter = group.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(closed)
        self._targets.clear()
        for entry in entries:
            entry.live = False
            entry.conn.close()
        for entry in entries:
            with contextlib.suppress(Exception):
                await entry.conn.wait_closed()

    # --- internals ---

    def _group(self, target: Target) -> _Target:
        group = self._targets.get(target)
        if group is None:
            group = self._targets[target] = _Target()
        return group

    def _forget_if_empty(self, target: Target, group: _Target) -> None:
        if group.empty and self._targets.get(target) is group:
            del self._targets[target]

    def _find(self, group: _Target) -> _Pooled | None:
        """The usable connection with the most leases (packs channels, lets others idle out)."""
        best = None
        for entry in group.entries:
            if entry.usable and (best is None or entry.leases > best.leases):
                best = entry
        return best

    def _take(self, entry: _Pooled) -> None:
        entry.leases += 1
        self._n_leases += 1

    def _dispatch(self, group: _Target) -> None:
        """Hand free slots to the callers waiting for them, first come first served."""
        while group.waiters:
            entry = self._find(group)
            if entry is None:
                return
            waiter = group.waiters.popleft()
            if waiter.done():  # cancelled, and not yet taken out by _abandon
                continue
            self._take(entry)
            waiter.set_result(entry)

    def _abandon(self, target: Target, group: _Target, waiter: asyncio.Future[_Pooled]) -> None:
        """A waiting caller gives up (cancelled, timed out, or its connect failed)."""
        self._n_waiting -= 1
        with contextlib.suppress(ValueError):
            group.waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled():
            if waiter.exception() is None:  # a lease was handed over just now: give it back
                self._release(waiter.result())
        self._forget_if_empty(target, group)
        self._changed()

    def _release(self, entry: _Pooled) -> None:
        entry.leases -= 1
        if not entry.live:
            return
        self._n_leases -= 1
        group = entry.group
        if entry.capacity <= 0 and entry.leases == 0:  # report_full left it good for nothing
            self._drop(entry)
            entry.conn.close()
        else:
            self._dispatch(group)
            if entry.leases == 0:
                entry.idle_since = time.monotonic()
                self._schedule_reap()
        self._changed()

    def _grow(self, target: Target, group: _Target, limits: PoolLimits) -> None:
        """Open as many connections as the waiting callers need, up to the caps."""
        uncovered = len(group.waiters) - group.opening * limits.max_sessions
        while uncovered > 0 and len(group.entries) + group.opening < limits.max_conns_per_target:
            if not self._make_room(limits):
                return
            self._start_open(target, group)
            uncovered -= limits.max_sessions

    def _start_open(self, target: Target, group: _Target) -> None:
        group.opening += 1
        self._n_opening += 1
        task = asyncio.get_running_loop().create_task(self._open(target, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._changed()

    async def _open(self, target: Target, group: _Target) -> None:
        try:
            conn = await self._connect(target)
        except BaseException as exc:
            group.opening -= 1
            self._n_opening -= 1
            if isinstance(exc, Exception) and not group.entries and not group.opening:
                # Nothing else can serve the callers waiting for this connection: they get
                # the connector's error now rather than a timeout later.
                while group.waiters:
                    waiter = group.waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(exc)
            self._forget_if_empty(target, group)
            self._changed()
            if not isinstance(exc, Exception):
                raise
            return  # a failed warm-up has nobody to tell: never "exception never retrieved"
        group.opening -= 1
        self._n_opening -= 1
        if self._closed:
            conn.close()
            return
        entry = _Pooled(target, group, conn, self.limits.max_sessions)
        group.entries.append(entry)
        self._targets.setdefault(target, group)
        self._n_conns += 1
        watch = asyncio.get_running_loop().create_task(self._watch(entry))
        self._tasks.add(watch)
        watch.add_done_callback(self._tasks.discard)
        self._dispatch(group)
        self._schedule_reap()
        self._changed()

    async def _watch(self, entry: _Pooled) -> None:
        """Drop the entry as soon as its connection closes (health check)."""
        with contextlib.suppress(Exception):
            await entry.conn.wait_closed()
        if entry.live:
            self._drop(entry)
            group = entry.group
            if group.waiters and not self._closed:
                self._grow(entry.target, group, self.limits)
            self._changed()

    def _drop(self, entry: _Pooled) -> None:
        if not entry.live:
            return
        entry.live = False
        group = entry.group
        if entry in group.entries:
            group.entries.remove(entry)
        self._n_conns -= 1
        self._n_leases -= entry.leases
        self._forget_if_empty(entry.target, group)

    def _make_room(self, limits: PoolLimits) -> bool:
        """True when one more connection may open (closing the least recently idle one if
        needed); False when every connection is busy."""
        if self._n_conns + self._n_opening < limits.max_total:
            return True
        idle = [e for g in self._targets.values() for e in g.entries if e.leases == 0]
        if not idle:
            return False
        oldest = min(idle, key=lambda e: e.idle_since)
        self._drop(oldest)
        oldest.conn.close()
        return True

    def _schedule_reap(self) -> None:
        if self._reaper is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(max(0.05, self.limits.idle_seconds / 2), self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        idle_seconds = self.limits.idle_seconds
        pending = False
        for entry in [e for g in self._targets.values() for e in g.entries]:
            if entry.leases == 0:
                if now - entry.idle_since >= idle_seconds:
                    live = [e for e in entry.group.entries if not e.conn.is_closed()]
                    if self._pins.get(entry.target) and live == [entry]:
                        pending = True  # the pinned target's last connection: keep it warm
                        continue
                    self._drop(entry)
                    entry.conn.close()
                else:
                    pending = True
        if pending:
            self._schedule_reap()
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.stats())


class LeaseBook:
    """The leases one client connection holds, by holder (a session or a forwarding channel).

    ``release(holder)`` when that channel ends; ``release_all()`` when the client connection
    goes, whatever order the channel callbacks come in. A lease stored after ``release_all()``
    (a channel whose upstream arrived after the client left) is released at once.
    """

    def __init__(self) -> None:
        self._leases: dict[object, Lease] = {}
        self._closed = False

    def hold(self, holder: object, lease: Lease) -> bool:
        """Keep ``lease`` for ``holder``; False (and the lease released) once the client
        connection is gone, so the caller does not open a channel for nobody."""
        if self._closed:
            lease.release()
            return False
        previous = self._leases.pop(holder, None)
        if previous is not None:
            previous.release()
        self._leases[holder] = lease
        return True

    def release(self, holder: object) -> None:
        lease = self._leases.pop(holder, None)
        if lease is not None:
            lease.release()

    def release_all(self) -> None:
        self._closed = True
        leases, self._leases = list(self._leases.values()), {}
        for lease in leases:
            lease.release()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._leases)
