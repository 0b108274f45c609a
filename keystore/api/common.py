"""What the route modules share: app keys, JSON bodies, field checks, cursors, audit."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from keystore.api.errors import MAX_BODY_KEY, ApiError
from keystore.api_keys import ApiKey
from keystore.audit_events import AuditEvent

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RecordAudit = Callable[[AuditEvent], None]

DB_KEY = web.AppKey("db", object)
AUDIT_KEY: web.AppKey[RecordAudit] = web.AppKey("record_audit")
PRINCIPAL_KEY = web.RequestKey("principal", ApiKey)

__all__ = [
    "AUDIT_KEY",
    "DB_KEY",
    "DEFAULT_PAGE_SIZE",
    "MAX_BODY_KEY",
    "MAX_PAGE_SIZE",
    "PRINCIPAL_KEY",
    "ApiRoute",
    "Handler",
    "RecordAudit",
    "audit",
    "decode_cursor",
    "encode_cursor",
    "fields",
    "iso",
    "page_params",
    "path_uuid",
    "read_json",
    "source_ip",
]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class ApiRoute:
    """One operation: ``scope`` is the concrete scope an API key needs to call it."""

    method: str
    path: str
    handler: Handler
    scope: str


def db(request: web.Request) -> Any:
    return request.app[DB_KEY]


def principal(request: web.Request) -> ApiKey:
    return request[PRINCIPAL_KEY]


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def path_uuid(request: web.Request, what: str) -> uuid.UUID:
    """The ``{id}`` of the path. Something that is no UUID names nothing: 404, like a stranger's."""
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise ApiError(404, "not_found", f"no such {what} in this organization") from None


def source_ip(request: web.Request) -> str | None:
    remote = request.remote
    if not remote:
        return None
    try:
        return str(ipaddress.ip_address(remote))
    except ValueError:
        return None


def audit(
    request: web.Request,
    action: str,
    *,
    target: str | None,
    result: str = "ok",
    reason: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Record a mutation by the request's API key. Never blocks (the writer batches)."""
    key = request.get(PRINCIPAL_KEY)
    request.app[AUDIT_KEY](
        AuditEvent(
            action=action,
            result=result,
            org_id=key.org_id if key else None,
            reason=reason,
            actor=str(key.id) if key else None,
            target=target,
            source_ip=source_ip(request),
            details=dict(details or {}),
        )
    )


def _is_json(content_type: str) -> bool:
    return content_type == "application/json"


async def read_json(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object.

    No body: 400 when ``required``, else ``{}``. A body that is not ``application/json``: 415.
    Over ``max_body_bytes``: 413 (checked on Content-Length first, then while reading).
    Not UTF-8 JSON, or not an object: 400.
    """
    max_body = request.app[MAX_BODY_KEY]
    too_large = ApiError(
        413,
        "payload_too_large",
        f"The request body is too large; at most {max_body} bytes are accepted.",
    )
    if request.content_length is not None and request.content_length > max_body:
        raise too_large
    if not request.body_exists:
        if required:
            raise ApiError(400, "body_required", "A JSON object is required as the request body.")
        return {}
    if not _is_json(request.content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            "The request body must be JSON, sent with Content-Type: application/json.",
        )
    raw = await request.read()  # aiohttp enforces client_max_size (413) on chunked bodies too
    if len(raw) > max_body:
        raise too_large
    if not raw.strip() and not required:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # The parser's message may quote the body; it is not repeated (it may hold a secret).
        raise ApiError(400, "invalid_json", "The request body is not valid UTF-8 JSON.") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    try:
        # JSON may escape lone surrogates (\udc00) that no UTF-8 text, and no database, can hold.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, "invalid_json", "The request body holds invalid Unicode (a lone surrogate)."
        ) from None
    return value


_TYPE_NAMES = {str: "a string", list: "a list", bool: "true or false", int: "an integer"}


def fields(
    body: Mapping[str, Any],
    *,
    required: Mapping[str, type] | None = None,
    optional: Mapping[str, type] | None = None,
) -> dict[str, Any]:
    """Check the body's fields: all ``required`` present, none unknown, each of its type.

    JSON null is no value of any field: a field is either absent or of its type.
    """
    required = required or {}
    optional = optional or {}
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join(sorted({*required, *optional}))
        raise ApiError(
            400,
            "unknown_field",
            f"Unknown field {unknown[0][:64]!r}; the accepted fields are: {allowed}.",
        )
    out: dict[str, Any] = {}
    for name, kind in {**required, **optional}.items():
        if name not in body:
            if name in required:
                raise ApiError(400, "missing_field", f"The field {name!r} is required.")
            continue
        value = body[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ApiError(
                400, "invalid_type", f"The field {name!r} must be {_TYPE_NAMES.get(kind, kind)}."
            )
        out[name] = value
    return out


def encode_cursor(created_at: dt.datetime, row_id: uuid.UUID) -> str:
    """An opaque page cursor: the (created_at, id) of the last row of the page."""
    raw = f"{created_at.isoformat()}|{row_id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    invalid = ApiError(
        400, "invalid_cursor", "The cursor is not valid; pass back next_cursor exactly as given."
    )
    if not cursor or len(cursor) > 200:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        when, _, row_id = raw.partition("|")
        created_at = dt.datetime.fromisoformat(when)
        parsed_id = uuid.UUID(row_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid from None
    if created_at.tzinfo is None:
        raise invalid
    return created_at, parsed_id


_PAGE_PARAMS = frozenset({"limit", "cursor"})


def page_params(
    request: web.Request, extra: frozenset[str] = frozenset()
) -> tuple[int, tuple[dt.datetime, uuid.UUID] | None]:
    """``limit`` (1-100, default 50) and ``cursor`` from the query string."""
    query = request.query
    for name in query:
        if name not in _PAGE_PARAMS | extra:
            allowed = ", ".join(sorted(_PAGE_PARAMS | extra))
            raise ApiError(
                400,
                "unknown_parameter",
                f"Unknown query parameter {name[:64]!r}; accepted: {allowed}.",
            )
    for name in query:
        if len(query.getall(name)) > 1:
            raise ApiError(400, "invalid_parameter", f"Give {name[:64]!r} at most once.")
    limit = DEFAULT_PAGE_SIZE
    if "limit" in query:
        text = query["limit"]
        if not (text.isascii() and text.isdigit() and len(text) <= 4):
            raise ApiError(
                400, "invalid_limit", f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}."
            )
        limit = int(text)
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ApiError(
                400, "invalid_limit", f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}."
            )
    after = decode_cursor(query["cursor"]) if "cursor" in query else None
    return limit, after
