"""WorkOS webhook events: recorded durably when received, then processed once.

:func:`record` writes the event (``workos_events``, keyed by its id) before the webhook is
acknowledged, so a crash after the answer loses nothing; a second delivery of the same id is
recognised and not recorded again. :func:`process_pending` applies what is recorded and not
processed yet, one event per transaction: the effects and ``processed_at`` commit together, so
an event is applied exactly once even when several gateways process at the same time (rows are
claimed with ``FOR UPDATE SKIP LOCKED``) or one crashes halfway. Applying an event twice would
be harmless anyway (revoking revoked keys and disabling a disabled organization change
nothing).

What an event does:

* ``organization_membership.deleted`` (``data.user_id``, ``data.organization_id``): the member
  is recorded as removed and every SSH key they registered in the mapped organization is
  revoked (keystore/members.py); the database notifies the gateways, which end the keys' live
  sessions within seconds.
* ``organization.deleted`` (``data.id``): the mapped organization is disabled: its SSH keys and
  API keys are refused, its members' tokens too, and its live sessions end.
* anything else, or an organization this gateway does not know: recorded, marked processed
  with the outcome ``ignored``/``unknown_organization``, nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import structlog

from keystore import members, orgs
from keystore.audit_events import AuditEvent
from keystore.db import Executor, acquire, unavailable_on_failure
from keystore.errors import Unavailable
from keystore.workos import MEMBERSHIP_DELETED, ORGANIZATION_DELETED, WebhookEvent, parse_event

log = structlog.get_logger("keystore.workos")

RecordAudit = Callable[[AuditEvent], None]

# The database could not answer at all: stop, keep everything pending, let the caller retry.
_CANNOT_ANSWER: tuple[type[BaseException], ...] = (
    Unavailable,
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


async def record(db: Executor, event: WebhookEvent) -> bool:
    """Store ``event`` durably; False when its id was recorded before (a redelivery)."""
    with unavailable_on_failure("recording a webhook event"):
        inserted = await db.fetchval(
            "INSERT INTO workos_events (id, event, payload) VALUES ($1, $2, $3::jsonb) "
            "ON CONFLICT (id) DO NOTHING RETURNING true",
            event.id,
            event.event,
            json.dumps(event.payload, ensure_ascii=False),
        )
    return bool(inserted)


@dataclass
class Applied:
    outcome: str
    audit: list[AuditEvent] = field(default_factory=list)


async def apply(conn: Executor, event: WebhookEvent) -> Applied:
    """Do what ``event`` says, on ``conn`` (in the caller's transaction)."""
    if event.event == MEMBERSHIP_DELETED:
        user_id, workos_org = event.text("user_id"), event.text("organization_id")
        if user_id is None or workos_org is None:
            return Applied("invalid")
        org = await orgs.find_by_workos_org_id(conn, workos_org)
        if org is None:
            return Applied("unknown_organization")
        revoked = await members.remove_member(conn, org.id, user_id)
        return Applied(
            f"revoked {len(revoked)}",
            [
                AuditEvent(
                    action="workos.membership.deleted",
                    result="ok",
                    org_id=org.id,
                    actor="workos",
                    target=user_id,
                    details={
                        "event_id": event.id,
                        "revoked_keys": [str(k.id) for k in revoked],
                        "fingerprints": [k.fingerprint for k in revoked],
                    },
                )
            ],
        )
    if event.event == ORGANIZATION_DELETED:
        workos_org = event.text("id")
        if workos_org is None:
            return Applied("invalid")
        org = await orgs.find_by_workos_org_id(conn, workos_org)
        if org is None:
            return Applied("unknown_organization")
        changed = await orgs.disable_org(conn, org.id)
        return Applied(
            "disabled" if changed else "already_disabled",
            [
                AuditEvent(
                    action="workos.organization.deleted",
                    result="ok",
                    org_id=org.id,
                    actor="workos",
                    target=str(org.id),
                    details={"event_id": event.id, "workos_org_id": workos_org},
                )
            ],
        )
    return Applied("ignored")


@dataclass(frozen=True, slots=True)
class Drained:
    processed: int
    failed: int


async def process_pending(db: Executor, record_audit: RecordAudit, limit: int = 100) -> Drained:
    """Apply up to ``limit`` recorded events not processed yet, oldest first, each in its own
    transaction. An event whose processing raised is left pending (with ``attempts`` and
    ``last_error``) and skipped for the rest of this call. ``Unavailable`` when the database
    cannot answer (nothing is lost: the events stay pending)."""
    processed = failed = 0
    skipped: list[str] = []
    for _ in range(limit):
        event_id: str | None = None
        with unavailable_on_failure("processing webhook events"):
            async with acquire(db) as conn:
                try:
                    async with conn.transaction():
                        row = await conn.fetchrow(
                            """
                            SELECT id, payload FROM workos_events
                            WHERE processed_at IS NULL AND NOT (id = ANY($1::text[]))
                            ORDER BY received_at, id
                            LIMIT 1
                            FOR UPDATE SKIP LOCKED
                            """,
                            skipped,
                        )
                        if row is None:
                            return Drained(processed, failed)
                        event_id = str(row["id"])
                        applied = await apply(conn, parse_event(row["payload"]))
                        await conn.execute(
                            "UPDATE workos_events SET processed_at = now(), outcome = $2, "
                            "attempts = attempts + 1, last_error = NULL WHERE id = $1",
                            event_id,
                            applied.outcome,
                        )
                except _CANNOT_ANSWER:
                    raise
                except Exception as exc:
                    if event_id is None:
                        raise
                    # This event's own failure (a bug, data the database refuses): the others
                    # go on; it stays pending and is tried again by a later call.
                    failed += 1
                    skipped.append(event_id)
                    error = f"{type(exc).__name__}: {exc}"[:500]
                    log.error("workos_event_failed", event_id=event_id, error=error)
                    await conn.execute(
                        "UPDATE workos_events SET attempts = attempts + 1, last_error = $2 "
                        "WHERE id = $1",
                        event_id,
                        error,
                    )
                    continue
        processed += 1
        log.info("workos_event_processed", event_id=event_id, outcome=applied.outcome)
        for audit in applied.audit:
            record_audit(audit)
    return Drained(processed, failed)
