"""What the route modules share: app keys, JSON bodies, field checks, cursors, audit."""

from __future__ import annotations

import asyncio
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

from keystore import roles
from keystore.api.errors import MAX_BODY_KEY, ApiError
from keystore.api.limits import LIMITS_KEY
from keystore.api_keys import ApiKey
from keystore.audit_events import AuditEvent
from keystore.models import Creator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RecordAudit = Callable[[AuditEvent], None]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key, or a member of the organization signed in through WorkOS.

    ``scopes`` are the API key's scopes, or the member's permissions (keystore/roles.py: the
    same names, plus ``ssh-key:write:own``). ``creator`` is what a key made by this caller
    records as ``created_by``, and ``creator.id`` is the actor of its audit events.
    """

    org_id: uuid.UUID
    creator: Creator
    scopes: tuple[str, ...]
    api_key: ApiKey | None = None
    roles: tuple[str, ...] = ()
    issued_at: dt.datetime | None = None
    """A member's session token's ``iat`` (None for an API key)."""

    @classmethod
    def of_key(cls, key: ApiKey) -> Principal:
        return cls(
            org_id=key.org_id,
            creator=Creator("api_key", str(key.id)),
            scopes=key.scopes,
            api_key=key,
        )

    @property
    def is_member(self) -> bool:
        return self.creator.type == "member"

    @property
    def actor(self) -> str:
        return self.creator.id

    @property
    def expires_at(self) -> dt.datetime | None:
        """When an API key caller stops working (None: never, or a member)."""
        return self.api_key.expires_at if self.api_key is not None else None

    @property
    def environment(self) -> str | None:
        """``live`` or ``test`` for an API key caller; None for a member."""
        return self.api_key.environment if self.api_key is not None else None

    def allows(self, scope: str) -> bool:
        """May do ``scope`` (a concrete scope) on anything of the organization."""
        return roles.allows(self.scopes, scope)

    def own_only(self, scope: str) -> bool:
        """May do ``scope`` only on the SSH keys this member registered."""
        return self.is_member and roles.own_only(self.scopes, scope)

    def owns(self, created_by: str | None, created_by_type: str | None) -> bool:
        return self.is_member and created_by_type == "member" and created_by == self.creator.id


DB_KEY = web.AppKey("db", object)
AUDIT_KEY: web.AppKey[RecordAudit] = web.AppKey("record_audit")
PRINCIPAL_KEY = web.RequestKey("principal", Principal)

__all__ = [
    "AUDIT_KEY",
    "DB_KEY",
    "DEFAULT_PAGE_SIZE",
    "MAX_BODY_KEY",
    "MAX_PAGE_SIZE",
    "PRINCIPAL_KEY",
    "ApiRoute",
    "Handler",
    "Principal",
    "RecordAudit",
    "audit",
    "decode_cursor",
    "encode_cursor",
    "fields",
    "iso",
    "page_limit",
    "page_params",
    "path_uuid",
    "read_body",
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


def principal(request: web.Request) -> Principal:
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
    """Record a mutation by the request's caller (the API key's id, or the member's user id,
    with ``actor_type`` in the details). Never blocks (the writer batches)."""
    caller = request.get(PRINCIPAL_KEY)
    extra: dict[str, Any] = {}
    if caller is not None and caller.is_member:
        extra = {"actor_type": "member", "roles": list(caller.roles)}
    request.app[AUDIT_KEY](
        AuditEvent(
            action=action,
            result=result,
            org_id=caller.org_id if caller else None,
            reason=reason,
            actor=caller.actor if caller else None,
            target=target,
            source_ip=source_ip(request),
            details={**extra, **dict(details or {})},
        )
    )


def _is_json(content_type: str) -> bool:
    return content_type == "application/json"


async def read_json(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object.

    No body: 400 when ``required``, else ``{}``. A body that is not ``application/json``: 415.
    Over ``max_body_bytes``: 413 (checked on Content-Length first, then while reading).
    Not all there within the body timeout: 408 ``body_timeout``, and the connection is closed.
    Not UTF-8 JSON, or not an object: 400.
    """
    raw = await read_body(request, required=required)
    if not raw.strip() and not required:
        return {}
    return parse_json_object(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, or a 400 ``invalid_json`` that never quotes it."""
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


async def read_body(request: web.Request, *, required: bool = True) -> bytes:
    """The raw request body, checked as :func:`read_json` says (``b""`` when there is none and
    it is not ``required``)."""
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
        return b""
    if not _is_json(request.content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            "The request body must be JSON, sent with Content-Type: application/json.",
        )
    limits = request.app.get(LIMITS_KEY)
    timeout = limits.settings.body_timeout_seconds if limits is not None else None
    try:
        async with asyncio.timeout(timeout):
            # aiohttp enforces client_max_size (413) on chunked bodies too
            raw = await request.read()
    except TimeoutError:
        if limits is not None:
            limits.refused("body_timeout", limits.source_of(request.remote))
        raise ApiError(
            408,
            "body_timeout",
            f"The request body did not arrive within {timeout:g} s.",
            close=True,
        ) from None
    if len(raw) > max_body:
        raise too_large
    return raw


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
    limit = page_limit(request, extra)
    query = request.query
    after = decode_cursor(query["cursor"]) if "cursor" in query else None
    return limit, after


def page_limit(request: web.Request, extra: frozenset[str] = frozenset()) -> int:
    """``limit`` (1-100, default 50) from the query string, after checking that it names only
    ``limit``, ``cursor`` and ``extra``, each at most once (400 otherwise)."""
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
    return limit
