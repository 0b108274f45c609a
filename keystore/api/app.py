"""The aiohttp Application of the key API: routes, middlewares and shared state."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from keystore.api import (
    routes_api_keys,
    routes_audit,
    routes_cert_authorities,
    routes_ssh_keys,
    routes_webhooks,
)
from keystore.api.auth import (
    BACKGROUND_KEY,
    RATE_LIMITER_KEY,
    ROUTE_SCOPES_KEY,
    SESSIONS_KEY,
    RateLimiter,
    auth_middleware,
    drain_background,
)
from keystore.api.common import AUDIT_KEY, DB_KEY, ApiRoute, RecordAudit
from keystore.api.errors import MAX_BODY_KEY, error_middleware, json_response
from keystore.api.limits import LIMITS_KEY, ApiLimits, connection_middleware
from keystore.api.openapi import document
from keystore.api.sessions import SessionVerifier, WorkosSettings
from keystore.db import Executor

ROUTES: tuple[ApiRoute, ...] = (
    *routes_ssh_keys.ROUTES,
    *routes_cert_authorities.ROUTES,
    *routes_api_keys.ROUTES,
    *routes_audit.ROUTES,
)

DEFAULT_RATE_PER_SECOND = 20.0
DEFAULT_RATE_BURST = 100


def create_app(
    db: Executor,
    *,
    max_body_bytes: int,
    record_audit: RecordAudit,
    extra_routes: Sequence[web.RouteDef] = (),
    rate_per_second: float = DEFAULT_RATE_PER_SECOND,
    rate_burst: int = DEFAULT_RATE_BURST,
    limits: ApiLimits | None = None,
    workos: WorkosSettings | None = None,
) -> web.Application:
    """The key API as an Application; ``extra_routes`` are served without authentication.

    ``limits`` (limits.py) are shared with the listener that serves the app (``serve_api``);
    without one, the default limits apply to what the app itself enforces. ``workos``: accept
    WorkOS session tokens (members) and/or webhooks (sessions.py, routes_webhooks.py); without
    it only API keys are accepted and the webhook answers 404.
    """
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    app = web.Application(
        middlewares=[connection_middleware, error_middleware, auth_middleware],
        client_max_size=max_body_bytes,
    )
    app[LIMITS_KEY] = limits or ApiLimits()
    app[DB_KEY] = db
    app[AUDIT_KEY] = record_audit
    app[MAX_BODY_KEY] = max_body_bytes
    app[RATE_LIMITER_KEY] = RateLimiter(rate_per_second, rate_burst)
    app[BACKGROUND_KEY] = set[asyncio.Task[None]]()
    scopes: dict[AbstractRoute, str] = {}
    for route in ROUTES:
        registered = app.router.add_route(route.method, route.path, route.handler)
        scopes[registered] = route.scope
    app[ROUTE_SCOPES_KEY] = scopes
    workos = workos or WorkosSettings()
    if workos.sessions_enabled:
        verifier = SessionVerifier(workos)
        app[SESSIONS_KEY] = verifier

        async def close_sessions(app: web.Application) -> None:
            await verifier.close()

        app.on_cleanup.append(close_sessions)
    routes_webhooks.install(app, workos.webhook_secret)

    spec = document(ROUTES)

    async def openapi(request: web.Request) -> web.StreamResponse:
        return json_response(spec)

    app.router.add_get("/v1/openapi.json", openapi, allow_head=False)
    app.router.add_routes(extra_routes)
    app.on_shutdown.append(drain_background)
    return app
