"""``GET /v1/audit-events``: the organization's audit trail, newest first.

Needs the scope ``audit:read`` (an API key with it or ``*``, or a member whose role grants it:
owner and admin by default). Only ever the caller's own organization's events. Filters:
``action`` (exact, or a prefix ending in ``*``: ``api.ssh_key.*``), ``actor``, ``target``,
``result`` (``ok``, ``refused``, ``error``), ``since`` (inclusive) and ``until`` (exclusive) as
RFC 3339 date-times with an offset; ``limit`` and ``cursor`` page through them.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

from aiohttp import web

from keystore import audit_events
from keystore.api.common import ApiRoute, db, iso, page_limit, principal
from keystore.api.errors import ApiError, json_response
from keystore.audit_events import AuditFilter, StoredEvent

RESULTS = ("ok", "refused", "error")
# Every id, fingerprint and action this gateway records is printable ASCII and shorter.
MAX_FILTER_CHARS = 100
MAX_TIME_CHARS = 40
_FILTERS = frozenset({"action", "actor", "target", "result", "since", "until"})
_INVALID_CURSOR = ApiError(
    400, "invalid_cursor", "The cursor is not valid; pass back next_cursor exactly as given."
)


def event_json(event: StoredEvent) -> dict[str, Any]:
    return {
        "id": str(event.id),
        "occurred_at": iso(event.occurred_at),
        "action": event.action,
        "result": event.result,
        "reason": event.reason,
        "actor": event.actor,
        "target": event.target,
        "source_ip": event.source_ip,
        "details": event.details,
    }


def encode_cursor(event: StoredEvent) -> str:
    raw = f"{event.occurred_at.isoformat()}|{event.id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
    if not cursor or len(cursor) > 200:
        raise _INVALID_CURSOR
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        when, _, event_id = raw.partition("|")
        occurred_at = dt.datetime.fromisoformat(when)
        if not (event_id.isascii() and event_id.isdigit() and len(event_id) <= 19):
            raise ValueError("not an id")
        number = int(event_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _INVALID_CURSOR from None
    if occurred_at.tzinfo is None or number >= 2**63:
        raise _INVALID_CURSOR
    return occurred_at, number


def _text(query: Any, name: str) -> str | None:
    if name not in query:
        return None
    value = str(query[name])
    if not (1 <= len(value) <= MAX_FILTER_CHARS and value.isascii() and value.isprintable()):
        raise ApiError(
            400,
            "invalid_parameter",
            f"{name} must be 1-{MAX_FILTER_CHARS} printable ASCII characters.",
        )
    return value


def _time(query: Any, name: str) -> dt.datetime | None:
    text = _text(query, name)
    if text is None:
        return None
    bad = ApiError(
        400,
        "invalid_parameter",
        f"{name} must be an RFC 3339 date-time with an offset, e.g. 2025-01-31T12:00:00Z.",
    )
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise bad from None
    if value.tzinfo is None or "T" not in text.upper():
        raise bad
    return value


def parse_filter(query: Any) -> AuditFilter:
    """The filter a query string asks for, or a 400 naming the bad parameter."""
    action = _text(query, "action")
    prefix = None
    if action is not None and action.endswith("*"):
        prefix, action = action[:-1], None
        if "*" in prefix:
            raise ApiError(
                400, "invalid_parameter", "action may end with one '*' (a prefix), no other."
            )
    result = _text(query, "result")
    if result is not None and result not in RESULTS:
        raise ApiError(400, "invalid_parameter", f"result must be one of: {', '.join(RESULTS)}.")
    since, until = _time(query, "since"), _time(query, "until")
    if since is not None and until is not None and since >= until:
        raise ApiError(400, "invalid_parameter", "since must be before until.")
    return AuditFilter(
        action=action,
        action_prefix=prefix,
        actor=_text(query, "actor"),
        target=_text(query, "target"),
        result=result,
        since=since,
        until=until,
    )


async def list_audit_events(request: web.Request) -> web.StreamResponse:
    query = request.query
    limit = page_limit(request, _FILTERS)
    before = decode_cursor(query["cursor"]) if "cursor" in query else None
    where = parse_filter(query)
    rows = await audit_events.query(
        db(request), principal(request).org_id, where, before=before, limit=limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return json_response(
        {
            "data": [event_json(e) for e in page],
            "next_cursor": encode_cursor(page[-1]) if more else None,
        }
    )


ROUTES = (ApiRoute("GET", "/v1/audit-events", list_audit_events, "audit:read"),)
