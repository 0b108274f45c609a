"""The aiohttp Application of the key API: routes, middlewares and shared state."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from keystore.api import routes_api_keys, routes_ssh_keys
from keystore.api.auth import (
    BACKGROUND_KEY,
    RATE_LIMITER_KEY,
    ROUTE_SCOPES_KEY,
    RateLimiter,
    auth_middleware,
    drain_background,
)
from keystore.api.common import AUDIT_KEY, DB_KEY, ApiRoute, RecordAudit
from keystore.api.errors import MAX_BODY_KEY, error_middleware, json_response
from keystore.api.openapi import document
from keystore.db import Executor

ROUTES: tuple[ApiRoute, ...] = (*routes_ssh_keys.ROUTES, *routes_api_keys.ROUTES)

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
) -> web.Application:
    """The key API as an Application; ``extra_routes`` are served without authentication."""
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=max_body_bytes
    )
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

    spec = document(ROUTES)

    async def openapi(request: web.Request) -> web.StreamResponse:
        return json_response(spec)

    app.router.add_get("/v1/openapi.json", openapi, allow_head=False)
    app.router.add_routes(extra_routes)
    app.on_shutdown.append(drain_background)
    return app
