"""``POST /v1/webhooks/workos``: membership and organization events from WorkOS.

No bearer token: the body is verified as WorkOS signs it (keystore/workos.py) with
``workos.webhook_secret``. A verified event is recorded durably (keystore/workos_events.py)
and acknowledged at once with 200; a :class:`WebhookProcessor` applies it right after, in the
background, and on start applies whatever a previous run recorded but did not process. A
redelivered event id is acknowledged again and not processed twice.

Refusals: 404 ``not_configured`` without a secret; 400 ``missing_signature``,
``malformed_signature``, ``stale_signature`` (more than 180 s off), ``invalid_signature``,
``invalid_json``, ``invalid_event``. Each bad signature costs the sender's address a token of
the invalid-credential bucket (limits.py), like an invalid API key: 429
``too_many_invalid_keys`` once it is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import structlog
from aiohttp import web

from keystore import workos, workos_events
from keystore.api.common import AUDIT_KEY, DB_KEY, RecordAudit, parse_json_object, read_body
from keystore.api.errors import ApiError, json_response
from keystore.api.limits import LIMITS_KEY
from keystore.db import Executor
from keystore.errors import KeystoreError

log = structlog.get_logger("keystore.api")

PATH = "/v1/webhooks/workos"
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
SWEEP_SECONDS = 60.0


class WebhookProcessor:
    """Applies recorded events in the background: when told one arrived (:meth:`kick`), at
    start, every :data:`SWEEP_SECONDS` (events another gateway recorded and did not get to),
    and again with a backoff while the database cannot answer or an event fails."""

    def __init__(self, db: Executor, record_audit: RecordAudit, secret: str) -> None:
        self.db = db
        self.record_audit = record_audit
        self.secret = secret
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        self._wake.set()

    async def start(self, app: web.Application) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.kick()

    async def stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            timeout = SWEEP_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                drained = await workos_events.process_pending(self.db, self.record_audit)
            except KeystoreError as exc:
                log.warning("workos_events_unavailable", error=str(exc)[:200], retry_in=delay)
                drained = None
            except Exception as exc:  # never let the loop die
                log.error("workos_events_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                drained = None
            if drained is None or drained.failed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                self.kick()
                continue
            delay = RETRY_FIRST_SECONDS
            if drained.processed:
                self.kick()  # maybe more than one batch was waiting


WEBHOOKS_KEY = web.AppKey("workos_webhooks", WebhookProcessor)


def _refuse(request: web.Request, code: str, message: str) -> ApiError:
    limits = request.app.get(LIMITS_KEY)
    if limits is not None:
        source = limits.source_of(request.remote)
        limits.invalid_keys.spend(source)
        limits.refused("invalid_webhook", source, signature=code)
    return ApiError(400, code, message)


async def workos_webhook(request: web.Request) -> web.StreamResponse:
    processor = request.app.get(WEBHOOKS_KEY)
    if processor is None:
        raise ApiError(404, "not_configured", "WorkOS webhooks are not configured on this gateway.")
    limits = request.app.get(LIMITS_KEY)
    if limits is not None:
        source = limits.source_of(request.remote)
        wait = limits.invalid_keys.wait(source)
        if wait > 0:
            limits.refused("too_many_invalid_keys", source)
            raise ApiError(
                429,
                "too_many_invalid_keys",
                "Too many invalid webhook signatures from your address; retry later.",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
    raw = await read_body(request)
    try:
        workos.verify_signature(request.headers.get(workos.SIGNATURE_HEADER), raw, processor.secret)
    except workos.InvalidSignature as exc:
        raise _refuse(request, exc.code, str(exc)) from None
    payload = parse_json_object(raw)
    try:
        event = workos.parse_event(payload)
    except workos.InvalidEvent as exc:
        raise ApiError(400, "invalid_event", f"Not a WorkOS event: {exc}.") from None
    new = await workos_events.record(request.app[DB_KEY], event)
    if new:
        processor.kick()
    log.info("workos_event_received", event_id=event.id, event_type=event.event, duplicate=not new)
    return json_response({"received": True, "duplicate": not new})


def install(app: web.Application, secret: str) -> None:
    """Serve the webhook on ``app``; with a ``secret``, also process the events it records."""
    if secret:
        processor = WebhookProcessor(app[DB_KEY], app[AUDIT_KEY], secret)
        app[WEBHOOKS_KEY] = processor
        app.on_startup.append(processor.start)
        app.on_cleanup.append(processor.stop)
    app.router.add_post(PATH, workos_webhook)
