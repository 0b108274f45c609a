"""Audit rows are written once, however often the gateway's writer retries a batch: after a
failover it cannot tell whether a batch whose commit answer was lost landed, so it writes the
batch again (gateway/audit/writer.py), and the second write must add nothing."""

from __future__ import annotations

from typing import Any

from keystore import audit_events
from keystore.audit_events import AuditEvent
from tests.integration.keystore.support import unique


async def _rows(pool: Any, actor: str) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT action, result, event_id FROM audit_events WHERE actor = $1 ORDER BY id",
            actor,
        )
    )


async def test_a_batch_written_twice_is_stored_once(pool: Any) -> None:
    actor = unique("retry")
    batch = [AuditEvent(action="ssh.auth", result="ok", actor=actor) for _ in range(3)]
    await audit_events.insert_many(pool, batch)
    await audit_events.insert_many(pool, batch)  # the retry after a lost commit answer
    await audit_events.insert_many(pool, batch[1:])
    rows = await _rows(pool, actor)
    assert [r["event_id"] for r in rows] == [e.event_id for e in batch]


async def test_equal_events_recorded_separately_are_each_stored(pool: Any) -> None:
    actor = unique("twice")
    first = AuditEvent(action="ssh.auth", result="refused", actor=actor)
    second = AuditEvent(action="ssh.auth", result="refused", actor=actor)
    await audit_events.insert_many(pool, [first, second])
    assert len(await _rows(pool, actor)) == 2
