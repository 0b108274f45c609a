"""Warm, shared upstream connections: one sandbox's sshd serves many users' sessions.

Opening the upstream SSH connection (TCP + kex + public-key auth against the sandbox's sshd)
is most of the gateway's connect latency. This pool keeps authenticated upstream connections per
``upstream.Target`` (i.e. per sandbox, hence never shared across organizations) and hands out
*leases*: one lease = one channel the caller is about to open.

* **Shared.** Several client connections of the same sandbox's org multiplex their sessions on
  one upstream connection, up to ``max_sessions`` leases each (the sandbox's ``MaxSessions``;
  OpenSSH's default is 10). When every connection is full a new one is opened, up to
  ``max_conns_per_target``; beyond that ``acquire`` waits for a release.
* **Warm.** ``warm(target)`` opens a connection ahead of need (call it as soon as the login
  name names a sandbox, before the user's signature is even checked) and concurrent callers
  share that one attempt. Idle connections stay open ``idle_seconds`` and then close.
* **Bounded.** ``max_total`` connections in all; the least recently used idle ones are closed
  first to make room.
* **Health-checked.** A connection that closed (keepalive failure, sandbox restart) is dropped
  as soon as asyncssh reports it, and never handed out; ``report_full()`` lets the caller
  lower a connection's capacity when the sandbox refused a channel (MaxSessions reached).

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.upstream.target import Target


class Connection(Protocol):
    """What the pool needs of an upstream connection (asyncssh.SSHClientConnection fits)."""

    def is_closed(self) -> bool: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


Connector = Callable[[Target], Awaitable[Connection]]


@dataclass(eq=False)
class _Pooled:
    target: Target
    conn: Connection
    capacity: int
    leases: int = 0
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def usable(self) -> bool:
        return not self.conn.is_closed() and self.leases < self.capacity


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
        """The sandbox refused a channel on this connection: treat it as full from now on."""
        self._entry.capacity = max(1, self._entry.leases - 1)


class UpstreamPool:
    def __init__(
        self,
        connect: Connector,
        *,
        max_sessions: int = 10,
        max_conns_per_target: int = 8,
        max_total: int = 1024,
        idle_seconds: float = 60.0,
    ) -> None:
        if max_sessions < 1 or max_conns_per_target < 1 or max_total < 1:
            raise ValueError("pool limits must be >= 1")
        self._connect = connect
        self.max_sessions = max_sessions
        self.max_conns_per_target = max_conns_per_target
        self.max_total = max_total
        self.idle_seconds = idle_seconds
        self._conns: dict[Target, list[_Pooled]] = {}
        self._opening: dict[Target, asyncio.Task[_Pooled]] = {}
        self._changed = asyncio.Condition()
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False

    # --- public API ---

    def warm(self, target: Target) -> None:
        """Start opening a connection to ``target`` unless one is usable or being opened."""
        if self._closed or self._find(target) is not None or target in self._opening:
            return
        if len(self._conns.get(target, ())) >= self.max_conns_per_target:
            return
        self._start_open(target)

    async def acquire(self, target: Target) -> Lease:
        """A lease on a usable connection to ``target``; connector errors propagate."""
        while True:
            if self._closed:
                raise RuntimeError("upstream pool is closed")
            entry = self._find(target)
            if entry is not None:
                return self._lease(entry)
            if target in self._opening:
                task = self._opening[target]
            elif len(self._conns.get(target, ())) < self.max_conns_per_target:
                task = self._start_open(target)
            else:
                async with self._changed:
                    await self._changed.wait()
                continue
            entry = await asyncio.shield(task)
            if entry.usable:
                return self._lease(entry)

    def stats(self) -> dict[str, int]:
        entries = [e for lst in self._conns.values() for e in lst]
        return {
            "targets": len(self._conns),
            "connections": len(entries),
            "leases": sum(e.leases for e in entries),
            "opening": len(self._opening),
        }

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._opening.values()):
            task.cancel()
        entries = [e for lst in self._conns.values() for e in lst]
        self._conns.clear()
        for entry in entries:
            entry.conn.close()
        for entry in entries:
            with contextlib.suppress(Exception):
                await entry.conn.wait_closed()

    # --- internals ---

    def _find(self, target: Target) -> _Pooled | None:
        """The usable connection with the most leases (packs sessions, lets others idle out)."""
        best = None
        for entry in self._conns.get(target, ()):
            if entry.usable and (best is None or entry.leases > best.leases):
                best = entry
        return best

    def _lease(self, entry: _Pooled) -> Lease:
        entry.leases += 1
        return Lease(entry.conn, self, entry)

    def _release(self, entry: _Pooled) -> None:
        entry.leases -= 1
        if entry.leases == 0:
            entry.idle_since = time.monotonic()
            self._schedule_reap()
        self._notify()

    def _start_open(self, target: Target) -> asyncio.Task[_Pooled]:
        self._make_room()
        task = asyncio.get_running_loop().create_task(self._open(target))
        self._opening[target] = task
        return task

    async def _open(self, target: Target) -> _Pooled:
        try:
            conn = await self._connect(target)
        finally:
            self._opening.pop(target, None)
            self._notify()
        entry = _Pooled(target, conn, self.max_sessions)
        if self._closed:
            conn.close()
            return entry
        self._conns.setdefault(target, []).append(entry)
        asyncio.get_running_loop().create_task(self._watch(entry))
        self._schedule_reap()
        return entry

    async def _watch(self, entry: _Pooled) -> None:
        """Drop the entry as soon as its connection closes (health check)."""
        with contextlib.suppress(Exception):
            await entry.conn.wait_closed()
        self._drop(entry)

    def _drop(self, entry: _Pooled) -> None:
        entries = self._conns.get(entry.target)
        if entries is not None and entry in entries:
            entries.remove(entry)
            if not entries:
                del self._conns[entry.target]
            self._notify()

    def _make_room(self) -> None:
        total = sum(len(lst) for lst in self._conns.values()) + len(self._opening)
        if total < self.max_total:
            return
        idle = sorted(
            (e for lst in self._conns.values() for e in lst if e.leases == 0),
            key=lambda e: e.idle_since,
        )
        for entry in idle[: total - self.max_total + 1]:
            self._drop(entry)
            entry.conn.close()

    def _schedule_reap(self) -> None:
        if self._reaper is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(max(0.05, self.idle_seconds / 2), self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        pending = False
        for entry in [e for lst in self._conns.values() for e in lst]:
            if entry.leases == 0:
                if now - entry.idle_since >= self.idle_seconds:
                    self._drop(entry)
                    entry.conn.close()
                else:
                    pending = True
        if pending:
            self._schedule_reap()

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(notify())


class LeaseBook:
    """The leases one client connection holds, by holder (a session or a forwarding channel).

    ``release(holder)`` when that channel ends; ``release_all()`` when the client connection
    goes, whatever order the channel callbacks come in. A lease stored after ``release_all()``
    (a channel whose upstream arrived after the client left) is released at once.
    """

    def __init__(self) -> None:
        self._leases: dict[object, Lease] = {}
        self._closed = False

    def hold(self, holder: object, lease: Lease) -> None:
        if self._closed:
            lease.release()
            return
        previous = self._leases.pop(holder, None)
        if previous is not None:
            previous.release()
        self._leases[holder] = lease

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
