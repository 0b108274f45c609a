"""Audit events: one row per auth attempt, session and key-management change."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keystore.db import Executor, unavailable_on_failure


@dataclass(frozen=True, slots=True)
class AuditEvent:
    action: str  # e.g. ssh.auth, ssh.session, api.ssh_key.create
    result: str  # ok | refused | error
    org_id: uuid.UUID | None = None
    reason: str | None = None  # stable reason code (see gateway/messages.py)
    actor: str | None = None  # key fingerprint or API key id
    target: str | None = None  # sandbox id, key id ...
    source_ip: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    occurred_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    # Made when the event is recorded: a batch written again after a commit whose answer was
    # lost (the connection dropped) adds no second row (migration 0007).
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)


async def insert_many(db: Executor, events: Sequence[AuditEvent]) -> None:
    """Write a batch in one round trip; events already written (same ``event_id``) are
    skipped, so retrying a batch is safe."""
    if not events:
        return
    with unavailable_on_failure("writing audit events"):
        await db.executemany(
            "INSERT INTO audit_events (occurred_at, org_id, action, result, reason, actor, "
            "target, source_ip, details, event_id) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::inet, $9::jsonb, $10) "
            "ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING",
            [
                (
                    e.occurred_at,
                    e.org_id,
                    e.action,
                    e.result,
                    e.reason,
                    e.actor,
                    e.target,
                    e.source_ip,
                    json.dumps(e.details, default=str),
                    e.event_id,
                )
                for e in events
            ],
        )


async def recent(
    db: Executor, *, org_id: uuid.UUID | None, after_id: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    """Events newest-last; ``org_id=None`` only for the platform operator's CLI."""
    with unavailable_on_failure("reading audit events"):
        rows = await db.fetch(
            """
            SELECT * FROM (
                SELECT id, occurred_at, org_id, action, result, reason, actor, target,
                       host(source_ip) AS source_ip, details
                FROM audit_events
                WHERE ($1::uuid IS NULL OR org_id = $1) AND id > $2
                ORDER BY id DESC LIMIT $3
            ) t ORDER BY id
            """,
            org_id,
            after_id,
            limit,
        )
    return [dict(r) for r in rows]


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What ``GET /v1/audit-events`` may ask for; None: any. ``action_prefix`` matches actions
    that start with it (``api.ssh_key.`` for every SSH-key change). ``since`` is inclusive,
    ``until`` exclusive."""

    action: str | None = None
    action_prefix: str | None = None
    actor: str | None = None
    target: str | None = None
    result: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    occurred_at: dt.datetime
    action: str
    result: str
    reason: str | None
    actor: str | None
    target: str | None
    source_ip: str | None
    details: dict[str, Any]


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def _details(raw: Any) -> dict[str, Any]:
    value = json.loads(raw) if isinstance(raw, str | bytes) else raw
    return value if isinstance(value, dict) else {"value": value}


async def query(
    db: Executor,
    org_id: uuid.UUID,
    where: AuditFilter,
    *,
    before: tuple[dt.datetime, int] | None = None,
    limit: int = 50,
) -> list[StoredEvent]:
    """The organization's events matching ``where``, newest first (by time, then id);
    ``before`` is the keyset cursor of the previous page (its last event's time and id).
    Only ever the one organization's events."""
    before_time, before_id = before if before else (None, None)
    with unavailable_on_failure("reading audit events"):
        rows = await db.fetch(
            """
            SELECT id, occurred_at, action, result, reason, actor, target,
                   host(source_ip) AS source_ip, details
            FROM audit_events
            WHERE org_id = $1
              AND ($2::text IS NULL OR action = $2)
              AND ($3::text IS NULL OR action LIKE $3 ESCAPE '\\')
              AND ($4::text IS NULL OR actor = $4)
              AND ($5::text IS NULL OR target = $5)
              AND ($6::text IS NULL OR result = $6)
              AND ($7::timestamptz IS NULL OR occurred_at >= $7)
              AND ($8::timestamptz IS NULL OR occurred_at < $8)
              AND ($9::timestamptz IS NULL OR (occurred_at, id) < ($9, $10::bigint))
            ORDER BY occurred_at DESC, id DESC
            LIMIT $11
            """,
            org_id,
            where.action,
            _like_prefix(where.action_prefix) if where.action_prefix is not None else None,
            where.actor,
            where.target,
            where.result,
            where.since,
            where.until,
            before_time,
            before_id,
            limit,
        )
    return [
        StoredEvent(
            id=row["id"],
            occurred_at=row["occurred_at"],
            action=row["action"],
            result=row["result"],
            reason=row["reason"],
            actor=row["actor"],
            target=row["target"],
            source_ip=row["source_ip"],
            details=_details(row["details"]),
        )
        for row in rows
    ]
