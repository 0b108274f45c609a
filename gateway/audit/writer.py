"""The audit trail: events queued on the hot path, written to PostgreSQL in batches.

``record()`` never blocks and never touches the database; a background task flushes the queue
every ``flush_interval_seconds`` or when ``batch_size`` events are waiting. ``close()`` flushes
what is left, so a clean shutdown loses nothing. Each event is also logged as structlog JSON.

When the database cannot take a batch (down, failing over to a new primary), the batch goes back
to the front of the queue, in order, and is retried, backing off from ``flush_interval_seconds``
to ``max_retry_interval_seconds``, until it is written: a failover loses nothing. The queue is
bounded by ``max_queued``: beyond it the oldest events are dropped and counted (``dropped``), and
their log lines are all that is left of them. A batch the database refuses for the values in it
(``keystore.db.refuses_content``) is written one event at a time, so one bad event is dropped,
logged and counted, never the events around it, and never retried forever. The flushing task
never dies: any other failure is logged and the events are retried like an outage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Sequence

import structlog

from keystore import audit_events
from keystore import db as keystore_db
from keystore.audit_events import AuditEvent
from keystore.db import Executor
from keystore.errors import Unavailable
from keystore.printable import scrub

log = structlog.get_logger("gateway.audit.writer")


def sanitized(event: AuditEvent) -> AuditEvent:
    """``event`` with its client-suppliable strings (actor, target, reason and every string in
    details) redacted, escaped and capped (keystore/printable.py); the same event when
    there was nothing to change."""
    clean = {
        "actor": scrub(event.actor),
        "target": scrub(event.target),
        "reason": scrub(event.reason),
        "details": scrub(event.details),
    }
    if all(clean[name] == getattr(event, name) for name in clean):
        return event
    return dataclasses.replace(event, **clean)


class AuditWriter:
    def __init__(
        self,
        db: Executor,
        *,
        flush_interval_seconds: float = 0.5,
        max_retry_interval_seconds: float = 2.0,
        batch_size: int = 500,
        max_queued: int = 100_000,
    ) -> None:
        self._db = db
        self._interval = flush_interval_seconds
        self._max_retry_interval = max(flush_interval_seconds, max_retry_interval_seconds)
        self._batch_size = batch_size
        self._max_queued = max_queued
        self._queue: collections.deque[AuditEvent] = collections.deque()
        self._in_flight = 0  # events taken out of the queue by a flush, not yet written
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing_since_written: int | None = None  # ``written`` when flushes began failing
        self._overflowing = False  # events were dropped since the queue was last empty
        self._progress = 0  # events of the batch being written that were dealt with
        self.dropped = 0
        self.written = 0

    @property
    def queued(self) -> int:
        """Events recorded and not yet written."""
        return len(self._queue) + self._in_flight

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, event: AuditEvent) -> None:
        event = sanitized(event)
        self._queue.append(event)
        self._trim()
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

    def _trim(self) -> None:
        """Keep at most ``max_queued`` events (a batch being written counts): drop the oldest."""
        over = min(len(self._queue) + self._in_flight - self._max_queued, len(self._queue))
        if over <= 0:
            return
        for _ in range(over):
            self._queue.popleft()
        self.dropped += over
        if not self._overflowing:  # once per episode, not once per event
            self._overflowing = True
            log.warning("audit_queue_full", max_queued=self._max_queued, dropped=self.dropped)

    def _put_back(self, events: Sequence[AuditEvent]) -> None:
        """Unwritten events go back to the front, in order; the bound then drops the oldest."""
        if events:
            self._queue.extendleft(reversed(events))
            self._trim()

    async def flush(self) -> None:
        """Write everything queued. When the database cannot take it, raises (``Unavailable``,
        or whatever it raised) with what is unwritten back at the front of the queue."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            self._in_flight = len(batch)
            self._progress = 0
            try:
                await self._write(batch)
            finally:  # also when cancelled (close() ran out of time)
                self._in_flight = 0
                self._put_back(batch[self._progress :])
        self._overflowing = False

    async def _write(self, batch: Sequence[AuditEvent]) -> None:
        """Write ``batch``, counting in ``_progress`` the events dealt with (written, or dropped
        because the database refuses their values)."""
        try:
            await audit_events.insert_many(self._db, batch)
        except Exception as exc:
            if not keystore_db.refuses_content(exc):
                raise  # unavailable (or unexpected): all of it is kept for the next flush
            log.error("audit_batch_refused", error=f"{type(exc).__name__}: {exc}"[:300])
        else:
            self._progress = len(batch)
            self.written += len(batch)
            return
        # The database answered and refused the batch: find the event(s) it refuses.
        for event in batch:
            try:
                await audit_events.insert_many(self._db, [event])
            except Exception as exc:
                if not keystore_db.refuses_content(exc):
                    raise
                self.dropped += 1
                log.error(
                    "audit_event_dropped",
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    action=event.action,
                    occurred_at=event.occurred_at.isoformat(),
                )
            else:
                self.written += 1
            self._progress += 1

    async def _run(self) -> None:
        delay = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)
            self._wakeup.clear()
            try:
                await self.flush()
            except Unavailable as exc:
                if self._failing_since_written is None:
                    self._failing_since_written = self.written
                log.warning("audit_flush_failed", error=str(exc), queued=self.queued)
                delay = min(delay * 2, self._max_retry_interval)
                continue
            except Exception:  # never let the writer die: the next flush tries again
                log.exception("audit_flush_crashed", queued=self.queued)
                delay = min(delay * 2, self._max_retry_interval)
                continue
            if self._failing_since_written is not None:
                log.info(
                    "audit_flush_recovered", written=self.written - self._failing_since_written
                )
                self._failing_since_written = None
            delay = self._interval

    async def close(self, timeout_seconds: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(self.flush(), timeout_seconds)
        except (Unavailable, TimeoutError) as exc:
            log.error("audit_lost_on_shutdown", error=str(exc), lost=self.queued)
