"""The audit trail: events queued on the hot path, written to PostgreSQL in batches.

``record()`` never blocks and never touches the database; a background task flushes the queue
every ``flush_interval_seconds`` or when ``batch_size`` events are waiting. ``close()`` flushes
what is left, so a clean shutdown loses nothing. Each event is also logged as structlog JSON.
If the database is down, events are retried on the next flush (bounded by ``max_queued``;
beyond that the oldest are dropped and counted, and the log line still exists).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

import structlog

from keystore import audit_events
from keystore.audit_events import AuditEvent
from keystore.db import Executor
from keystore.errors import Unavailable

log = structlog.get_logger("gateway.audit.writer")


class AuditWriter:
    def __init__(
        self,
        db: Executor,
        *,
        flush_interval_seconds: float = 0.5,
        batch_size: int = 500,
        max_queued: int = 100_000,
    ) -> None:
        self._db = db
        self._interval = flush_interval_seconds
        self._batch_size = batch_size
        self._queue: collections.deque[AuditEvent] = collections.deque(maxlen=max_queued)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.written = 0

    @property
    def queued(self) -> int:
        """Events recorded and not yet written."""
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, event: AuditEvent) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        log.info(
            "audit",
            action=event.action,
            result=event.result,
            reason=event.reason,
            org_id=str(event.org_id) if event.org_id else None,
            actor=event.actor,
            target=event.target,
            source_ip=event.source_ip,
            **event.details,
        )
        if len(self._queue) >= self._batch_size:
            self._wakeup.set()

    async def flush(self) -> None:
        while self._queue:
            batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
            await audit_events.insert_many(self._db, batch)
            for _ in batch:
                self._queue.popleft()
            self.written += len(batch)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._interval)
            self._wakeup.clear()
            try:
                await self.flush()
            except Unavailable as exc:
                log.warning("audit_flush_failed", error=str(exc), queued=len(self._queue))

    async def close(self, timeout_seconds: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(self.flush(), timeout_seconds)
        except (Unavailable, TimeoutError) as exc:
            log.error("audit_lost_on_shutdown", error=str(exc), lost=len(self._queue))
