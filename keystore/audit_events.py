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


async def insert_many(db: Executor, events: Sequence[AuditEvent]) -> None:
    """Write a batch in one round trip."""
    if not events:
        return
    with unavailable_on_failure("writing audit events"):
        await db.executemany(
            "INSERT INTO audit_events (occurred_at, org_id, action, result, reason, actor, "
            "target, source_ip, details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::inet, $9::jsonb)",
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
