"""Where the SSH door gets a sandbox's access data: an interface, the database, and a fake.

The auth decision (gateway/ssh/auth.py) never touches the database itself: it is handed an
``AccessSource``. The daemon passes ``DatabaseAccess`` behind ``CachedAccess`` (kept exact by the
change listener's notifications); unit tests pass ``StaticAccess``, a dict-backed source shipped
here so that no test has to monkeypatch a keystore module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.daemon import metrics
from keystore import sandboxes
from keystore.changes import AccessChange
from keystore.db import Executor
from keystore.errors import Unavailable
from keystore.models import SandboxAccess


class AccessSource(Protocol):
    """Looks up one sandbox and the active keys of its own organization.

    Returns None for an unknown sandbox; raises ``keystore.errors.Unavailable`` when the answer
    cannot be had (the caller then refuses: fail closed).
    """

    async def access_for(self, sandbox_id: str) -> SandboxAccess | None: ...


class DatabaseAccess:
    """The production source: one query per login name (keystore.sandboxes.access_for)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def access_for(self, sandbox_id: str) -> SandboxAccess | None:
        return await sandboxes.access_for(self._db, sandbox_id)


class StaticAccess:
    """A dict-backed source for tests; ``available = False`` makes it behave like a dead DB."""

    def __init__(self, table: Mapping[str, SandboxAccess] | None = None) -> None:
        self.table: dict[str, SandboxAccess] = dict(table or {})
        self.available = True
        self.lookups: list[str] = []

    async def access_for(self, sandbox_id: str) -> SandboxAccess | None:
        self.lookups.append(sandbox_id)
        if not self.available:
            raise Unavailable("the test made the access source unavailable")
        return self.table.get(sandbox_id)


class CachedAccess:
    """Answers repeat lookups of a sandbox from memory while the change listener is up.

    Why: under a login burst the event loop is busy with key exchanges, so a decision that
    waits for a database reply waits behind them (bench/README.md, issue 14). The database
    stays the authority: every change that can alter a sandbox's access data raises a
    notification (migrations 0002-0005, inserts included), and ``invalidate`` drops what it
    concerns. An entry is used only when all of these hold:

    - the listener is ``listening`` now (``listening()``); while it is not, every lookup goes
      to the database (and fails closed with it), and the cache is emptied;
    - no invalidation happened while the entry was being fetched (a generation count), so a
      reply that raced a change is never kept;
    - it is younger than ``ttl_seconds``, a safety net for a lost notification.

    An unknown sandbox (None) is never cached: creating a sandbox does not notify.
    """

    def __init__(
        self,
        source: AccessSource,
        *,
        ttl_seconds: float,
        listening: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self._source = source
        self.ttl_seconds = ttl_seconds
        self._listening = listening
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[str, tuple[SandboxAccess, float]] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0

    async def access_for(self, sandbox_id: str) -> SandboxAccess | None:
        if self.ttl_seconds <= 0 or not self._listening():
            if self._entries:
                self.clear()
            metrics.ACCESS_CACHE.labels("bypass").inc()
            return await self._source.access_for(sandbox_id)
        now = self._clock()
        entry = self._entries.get(sandbox_id)
        if entry is not None and now - entry[1] < self.ttl_seconds:
            self.hits += 1
            metrics.ACCESS_CACHE.labels("hit").inc()
            return entry[0]
        self.misses += 1
        metrics.ACCESS_CACHE.labels("miss").inc()
        generation = self._generation
        found = await self._source.access_for(sandbox_id)
        if found is not None and generation == self._generation and self._listening():
            if len(self._entries) >= self._max_entries:
                self._entries.pop(next(iter(self._entries)))  # the oldest insertion
            self._entries[sandbox_id] = (found, now)
        return found

    def invalidate(self, change: AccessChange) -> None:
        """Drop what a notification concerns: one sandbox, or every sandbox of an org."""
        self._generation += 1
        if change.kind == "all" or change.org_id is None:
            self._entries.clear()
            return
        if change.kind == "sandbox" and change.sandbox_id is not None:
            self._entries.pop(change.sandbox_id, None)
            # A sandbox moved to another org also changes nothing else cached here.
            return
        org_id = change.org_id
        for sandbox_id in [s for s, (a, _) in self._entries.items() if a.sandbox.org_id == org_id]:
            del self._entries[sandbox_id]

    def clear(self) -> None:
        """Forget everything (the listener (re)subscribed, or stopped listening)."""
        self._generation += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
