"""Bearer authentication, scope checks and a per-key rate limit, as one middleware.

Routes registered with a scope (see :class:`keystore.api.common.ApiRoute`) need
``Authorization: Bearer rt_live_...`` (or ``rt_test_...``):

* no header, another scheme, a malformed, unknown, expired or revoked key -> 401 with a
  ``WWW-Authenticate: Bearer`` challenge (RFC 6750);
* too many requests with one key -> 429 with ``Retry-After``;
* a valid key without the route's scope -> 403 (``error="insufficient_scope"``).

Routes without a scope (the OpenAPI document, the gateway's health routes) are public.
Resources of another organization are never distinguished from missing ones: the handlers
look everything up within the key's org, so those answer 404, never 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from collections.abc import Iterable

import structlog
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from keystore import api_keys, tokens
from keystore.api.common import DB_KEY, PRINCIPAL_KEY, Handler
from keystore.api.errors import ApiError
from keystore.errors import KeystoreError

log = structlog.get_logger("keystore.api")

REALM = 'Bearer realm="runtools"'

ROUTE_SCOPES_KEY = web.AppKey("route_scopes", dict[AbstractRoute, str])


class RateLimiter:
    """A token bucket per API key: ``burst`` requests at once, refilled at ``per_second``.

    In memory and per process: a guard against a runaway script, not a quota system.
    """

    def __init__(self, per_second: float, burst: int, max_keys: int = 10_000) -> None:
        self.per_second = per_second
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[object, tuple[float, float]] = {}

    def take(self, key: object, now: float | None = None) -> float:
        """Spend one request; return 0 if allowed, else the seconds to wait."""
        now = time.monotonic() if now is None else now
        tokens_left, last = self._buckets.get(key, (float(self.burst), now))
        tokens_left = min(float(self.burst), tokens_left + (now - last) * self.per_second)
        if tokens_left >= 1.0:
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                self._forget_full(now)
            self._buckets[key] = (tokens_left - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens_left, now)
        return (1.0 - tokens_left) / self.per_second

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled completely (they hold no information)."""
        refill = self.burst / self.per_second
        for key in [k for k, (_, last) in self._buckets.items() if now - last >= refill]:
            del self._buckets[key]


RATE_LIMITER_KEY = web.AppKey("rate_limiter", RateLimiter)
BACKGROUND_KEY = web.AppKey("background_tasks", set[asyncio.Task[None]])


def challenge(error: str | None = None, description: str | None = None, **extra: str) -> str:
    parts = [REALM]
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    parts.extend(f'{name}="{value}"' for name, value in extra.items())
    return ", ".join(parts)


def unauthorized(code: str, message: str, error: str | None = "invalid_token") -> ApiError:
    description = message.rstrip(".").replace('"', "'") if error else None
    return ApiError(401, code, message, headers={"WWW-Authenticate": challenge(error, description)})


_FAILURE_CODES = {
    "malformed": "invalid_api_key",
    "unknown": "invalid_api_key",
    "expired": "api_key_expired",
    "revoked": "api_key_revoked",
}


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header, or a 401."""
    if header is None or not header.strip():
        raise unauthorized(
            "missing_api_key",
            "An API key is required: send Authorization: Bearer rt_live_...",
            error=None,
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(
            "invalid_api_key",
            "The Authorization header must be: Bearer rt_live_... (or rt_test_...).",
            error="invalid_request",
        )
    return token.strip()


def covers(granted: Iterable[str], wanted: str) -> bool:
    """True if a key with ``granted`` scopes may hand out ``wanted`` (no privilege escalation).

    '*' needs '*'; 'X:*' needs '*' or 'X:*'; a concrete scope needs what allows it.
    """
    granted = tuple(granted)
    if wanted == "*":
        return "*" in granted
    if wanted.endswith(":*"):
        return "*" in granted or wanted in granted
    return tokens.scope_allows(granted, wanted)


def _schedule_touch(request: web.Request, key: api_keys.ApiKey) -> None:
    """Record last_used_at off the request path, at most about once a minute per key."""
    if key.last_used_at is not None:
        age = dt.datetime.now(dt.UTC) - key.last_used_at
        if age < api_keys.TOUCH_INTERVAL:
            return
    tasks = request.app[BACKGROUND_KEY]
    task = asyncio.get_running_loop().create_task(_touch(request.app[DB_KEY], key))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _touch(db: object, key: api_keys.ApiKey) -> None:
    try:
        await api_keys.touch_last_used(db, key.org_id, key.id)
    except KeystoreError as exc:
        log.warning("api_key_touch_failed", error=str(exc), api_key_id=str(key.id))


async def drain_background(app: web.Application) -> None:
    pending: set[asyncio.Task[None]] = app[BACKGROUND_KEY]
    tasks = list(pending)
    if tasks:
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, timeout=2.0)
        for task in tasks:
            task.cancel()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    scope = request.app[ROUTE_SCOPES_KEY].get(request.match_info.route)
    if scope is None:
        return await handler(request)
    token = bearer_token(request.headers.get("Authorization"))
    try:
        key = await api_keys.authenticate(request.app[DB_KEY], token)
    except api_keys.AuthenticationFailed as exc:
        raise unauthorized(_FAILURE_CODES.get(exc.reason, "invalid_api_key"), str(exc)) from None
    wait = request.app[RATE_LIMITER_KEY].take(key.id)
    if wait > 0:
        raise ApiError(
            429,
            "rate_limited",
            "Too many requests with this API key; slow down and retry after the given seconds.",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    if not tokens.scope_allows(key.scopes, scope):
        raise ApiError(
            403,
            "insufficient_scope",
            f"This API key lacks the scope {scope!r} (it has: {', '.join(key.scopes)}).",
            headers={"WWW-Authenticate": challenge("insufficient_scope", scope=scope)},
        )
    request[PRINCIPAL_KEY] = key
    _schedule_touch(request, key)
    return await handler(request)
