"""Every error the API answers is JSON ``{"error": {"code": "...", "message": "..."}}``.

:class:`ApiError` is raised by handlers and middlewares; :func:`error_middleware` (the outermost
middleware) turns it, aiohttp's own HTTP errors (404 route, 405, 413) and keystore errors into
that shape. Anything unexpected becomes a 500 with a generic message: the exception is logged,
never sent. No response ever carries a stack trace.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web

from keystore.errors import (
    Conflict,
    InvalidInput,
    KeystoreError,
    MemberRemoved,
    NotFound,
    Unavailable,
)

log = structlog.get_logger("keystore.api")

# The code used when nothing more specific is known, by status.
DEFAULT_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}

_DEFAULT_MESSAGES: dict[int, str] = {
    400: "The request is malformed.",
    401: "Authentication is required.",
    403: "This API key may not do that.",
    404: "Not found.",
    405: "This method is not allowed here.",
    408: "The request did not arrive in time.",
    409: "The request conflicts with the current state.",
    413: "The request body is too large.",
    415: "The request body must be JSON (Content-Type: application/json).",
    422: "The request cannot be processed.",
    429: "Too many requests; slow down.",
    500: "Internal error. It has been logged; please retry later.",
    503: "The service is temporarily unavailable; please retry shortly.",
}

# Headers sent with every API response: nothing here may be cached (secrets are shown once).
COMMON_HEADERS: Mapping[str, str] = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


class ApiError(Exception):
    """An error answer. ``extra`` adds fields to the error object (e.g. ``existing_id``);
    ``close`` ends the connection after the answer (no keep-alive)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        self.close = close


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers={**COMMON_HEADERS, **(headers or {})},
    )


def error_response(
    status: int,
    code: str | None = None,
    message: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "code": code or DEFAULT_CODES.get(status, "error"),
        "message": message or _DEFAULT_MESSAGES.get(status, "Error."),
    }
    body.update(extra or {})
    return json_response({"error": body}, status=status, headers=headers)


def from_keystore(exc: KeystoreError) -> ApiError:
    """Map a keystore error to its HTTP answer. Keystore messages are written for people."""
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, Conflict):
        extra = {"existing_id": exc.existing_id} if exc.existing_id else {}
        return ApiError(409, "conflict", str(exc), extra=extra)
    if isinstance(exc, InvalidInput):
        return ApiError(400, exc.code, str(exc))
    if isinstance(exc, MemberRemoved):
        return ApiError(
            401,
            "member_removed",
            str(exc),
            headers={"WWW-Authenticate": 'Bearer realm="runtools", error="invalid_token"'},
        )
    if isinstance(exc, Unavailable):
        log.warning("api_database_unavailable", error=str(exc))
        return ApiError(503, "unavailable", _DEFAULT_MESSAGES[503], headers={"Retry-After": "1"})
    raise exc


# Headers of aiohttp's own HTTP errors worth keeping (405 names the allowed methods).
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except ApiError as exc:
        answer = error_response(
            exc.status, exc.code, exc.message, headers=exc.headers, extra=exc.extra
        )
        if exc.close:
            answer.force_close()
        return answer
    except KeystoreError as exc:
        try:
            err = from_keystore(exc)
        except KeystoreError:
            return _internal(request, exc)
        return error_response(err.status, err.code, err.message, headers=err.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers}
        message = None
        if exc.status == 413:
            max_size = request.app[MAX_BODY_KEY]
            message = f"The request body is too large; at most {max_size} bytes are accepted."
        elif exc.status == 404:
            message = f"No such endpoint: {request.method} {request.path[:200]}"
        elif exc.status == 405:
            message = f"Method {request.method[:20]} is not allowed on {request.path[:200]}."
        return error_response(exc.status, message=message, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return _internal(request, exc)
    for name, value in COMMON_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _internal(request: web.Request, exc: BaseException) -> web.Response:
    log.error(
        "api_internal_error",
        method=request.method,
        path=request.path[:200],
        error_type=type(exc).__name__,
        exc_info=exc,
    )
    return error_response(500)


# Defined here (not in common) so the error middleware has no import cycle.
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
