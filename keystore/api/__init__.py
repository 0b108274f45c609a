"""The key-management HTTP API (aiohttp): SSH keys and API keys of an organization.

:func:`serve_api` starts it on the caller's event loop (the gateway's) and returns an
:class:`ApiServer` to stop it. See README "The key API" and ``GET /v1/openapi.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog
from aiohttp import web

from keystore.api.app import DEFAULT_RATE_BURST, DEFAULT_RATE_PER_SECOND, create_app
from keystore.audit_events import AuditEvent
from keystore.db import Executor

__all__ = ["ApiServer", "create_app", "serve_api"]

log = structlog.get_logger("keystore.api")


class ApiServer:
    """A running key API. ``port`` is the bound port (useful when 0 was asked for)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    async def close(self) -> None:
        """Stop listening, let requests in flight finish (briefly), release everything."""
        await self._runner.cleanup()


async def serve_api(
    db: Executor,
    *,
    host: str,
    port: int,
    max_body_bytes: int,
    record_audit: Callable[[AuditEvent], None],
    extra_routes: Sequence[web.RouteDef] = (),
    rate_per_second: float = DEFAULT_RATE_PER_SECOND,
    rate_burst: int = DEFAULT_RATE_BURST,
) -> ApiServer:
    """Serve the key API on ``host:port`` (port 0: any free port) on the running loop."""
    app = create_app(
        db,
        max_body_bytes=max_body_bytes,
        record_audit=record_audit,
        extra_routes=extra_routes,
        rate_per_second=rate_per_second,
        rate_burst=rate_burst,
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("api_listening", api=f"{host}:{bound}")
    return ApiServer(runner, host, int(bound))
