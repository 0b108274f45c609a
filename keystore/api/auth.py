"""Bearer authentication, scope checks and a per-caller rate limit, as one middleware.

Routes registered with a scope (see :class:`keystore.api.common.ApiRoute`) need
``Authorization: Bearer rt_live_...`` (or ``rt_test_...``), or, when ``[workos]`` sessions are
configured, ``Authorization: Bearer <WorkOS session token>`` (sessions.py): a member of the
organization, whose roles say what they may do (keystore/roles.py).

* no header, another scheme, a malformed, unknown, expired or revoked key, an invalid session
  token, a token for an organization that is not mapped or is disabled, or of a member removed
  since it was issued -> 401 with a ``WWW-Authenticate: Bearer`` challenge (RFC 6750);
* too many requests with one key (or by one member) -> 429 ``rate_limited`` with ``Retry-After``;
* a source (client address) that presented too many unusable keys or tokens lately -> 429
  ``too_many_invalid_keys`` with ``Retry-After``, for any credential, without asking the
  database (see limits.py: each unusable one costs a token);
* a valid key without the route's scope -> 403 ``insufficient_scope``; a member whose roles do
  not allow it -> 403 ``insufficient_permission``.

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
from typing import NoReturn

import structlog
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from keystore import api_keys, members, roles, tokens
from keystore.api.common import DB_KEY, PRINCIPAL_KEY, Handler, Principal
from keystore.api.errors import ApiError
from keystore.api.limits import KEY_CHECKS, LIMITS_KEY, ApiLimits
from keystore.api.sessions import SESSION_CHECKS, SessionError, SessionVerifier
from keystore.errors import KeystoreError
from keystore.models import Creator

log = structlog.get_logger("keystore.api")

REALM = 'Bearer realm="runtools"'

ROUTE_SCOPES_KEY = web.AppKey("route_scopes", dict[AbstractRoute, str])
SESSIONS_KEY = web.AppKey("sessions", SessionVerifier)


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
    "org_disabled": "organization_disabled",
}
API_KEY_PREFIXES = ("rt_live_", "rt_test_")


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header, or a 401."""
    if header is None or not header.strip():
        raise unauthorized(
            "missing_api_key",
            "An API key or a session token is required: send Authorization: Bearer rt_live_... "
            "(or the WorkOS session token of a member).",
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


def _check_source(limits: ApiLimits, source: str) -> None:
    """A 429 when ``source`` has presented too many unusable keys or tokens lately (then
    nothing is looked up)."""
    wait = limits.invalid_keys.wait(source)
    if wait > 0:
        limits.refused("too_many_invalid_keys", source)
        raise ApiError(
            429,
            "too_many_invalid_keys",
            "Too many invalid API keys from your address; retry after the given seconds.",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


async def _check_key(
    request: web.Request, limits: ApiLimits, source: str, token: str
) -> api_keys.ApiKey:
    """The usable key ``token`` names, or a 401."""
    try:
        key = await api_keys.authenticate(request.app[DB_KEY], token)
    except api_keys.AuthenticationFailed as exc:
        KEY_CHECKS.labels(exc.reason).inc()
        limits.invalid_keys.spend(source)
        # The same answer for a key that never existed and for a real key id with a wrong
        # secret (api_keys.authenticate does not tell them apart either).
        raise unauthorized(_FAILURE_CODES.get(exc.reason, "invalid_api_key"), str(exc)) from None
    except KeystoreError:
        KEY_CHECKS.labels("unavailable").inc()
        raise
    KEY_CHECKS.labels("ok").inc()
    return key


def _session_refused(
    limits: ApiLimits, source: str, code: str, message: str, result: str
) -> NoReturn:
    SESSION_CHECKS.labels(result).inc()
    limits.invalid_keys.spend(source)
    raise unauthorized(code, message)


async def _check_session(
    request: web.Request,
    verifier: SessionVerifier,
    limits: ApiLimits,
    source: str,
    token: str,
) -> Principal:
    """The member a WorkOS session token stands for, or a 401 (503 while the signing keys
    cannot be fetched)."""
    try:
        claims = await verifier.verify(token)
    except SessionError as exc:
        if exc.status != 401:
            SESSION_CHECKS.labels(exc.result).inc()
            raise ApiError(exc.status, exc.code, str(exc), headers={"Retry-After": "5"}) from None
        _session_refused(limits, source, exc.code, str(exc), exc.result)
    if claims.workos_org_id is None:
        _session_refused(
            limits,
            source,
            "no_organization",
            "The session token names no organization: sign in to one of your organizations.",
            "unknown_organization",
        )
    try:
        view = await members.resolve(request.app[DB_KEY], claims.workos_org_id, claims.user_id)
    except KeystoreError:
        SESSION_CHECKS.labels("unavailable").inc()
        raise
    if view is None:
        _session_refused(
            limits,
            source,
            "unknown_organization",
            "Your organization is not set up on this gateway; ask its operator to map it "
            "(runtools-gateway org update SLUG --workos-org-id ORG_ID).",
            "unknown_organization",
        )
    if view.org.disabled_at is not None:
        _session_refused(
            limits,
            source,
            "organization_disabled",
            "Your organization has been disabled.",
            "organization_disabled",
        )
    if view.removed_since(claims.issued_at):
        _session_refused(
            limits,
            source,
            "member_removed",
            "You are no longer a member of this organization.",
            "member_removed",
        )
    SESSION_CHECKS.labels("ok").inc()
    return Principal(
        org_id=view.org.id,
        creator=Creator("member", claims.user_id),
        scopes=roles.permissions_for(claims.claims, verifier.settings.role_table),
        roles=roles.roles_of(claims.claims),
        issued_at=claims.issued_at,
    )


def _forbidden(caller: Principal, scope: str) -> ApiError:
    if caller.is_member:
        held = ", ".join(caller.roles) or "none"
        return ApiError(
            403,
            "insufficient_permission",
            f"Your role in this organization does not allow {scope!r} (your roles: {held}); "
            "ask an owner or admin.",
            headers={"WWW-Authenticate": challenge("insufficient_scope", scope=scope)},
        )
    return ApiError(
        403,
        "insufficient_scope",
        f"This API key lacks the scope {scope!r} (it has: {', '.join(caller.scopes)}).",
        headers={"WWW-Authenticate": challenge("insufficient_scope", scope=scope)},
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    scope = request.app[ROUTE_SCOPES_KEY].get(request.match_info.route)
    if scope is None:
        return await handler(request)
    token = bearer_token(request.headers.get("Authorization"))
    limits = request.app[LIMITS_KEY]
    source = limits.source_of(request.remote)
    _check_source(limits, source)
    verifier = request.app.get(SESSIONS_KEY)
    key: api_keys.ApiKey | None = None
    if verifier is not None and not token.startswith(API_KEY_PREFIXES):
        caller = await _check_session(request, verifier, limits, source, token)
        bucket: object = ("member", caller.org_id, caller.actor)
        who = {"member": caller.actor}
    else:
        key = await _check_key(request, limits, source, token)
        caller = Principal.of_key(key)
        bucket = key.id
        who = {"api_key_id": str(key.id)}
    wait = request.app[RATE_LIMITER_KEY].take(bucket)
    if wait > 0:
        limits.refused("rate_limited", source, **who)
        raise ApiError(
            429,
            "rate_limited",
            "Too many requests with this credential; slow down and retry after the given seconds.",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    if not caller.allows(scope) and not caller.own_only(scope):
        raise _forbidden(caller, scope)
    request[PRINCIPAL_KEY] = caller
    if key is not None:
        _schedule_touch(request, key)
    return await handler(request)
