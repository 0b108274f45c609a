"""The key-management HTTP API (aiohttp): SSH keys and API keys of an organization.

:func:`serve_api` starts it on the caller's event loop (the gateway's) and returns an
:class:`ApiServer` to stop it. See README "The key API" and ``GET /v1/openapi.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import structlog
from aiohttp import web

from keystore.api import limits as _limits
from keystore.api.app import DEFAULT_RATE_BURST, DEFAULT_RATE_PER_SECOND, create_app
from keystore.api.limits import ApiLimits, ApiSite, LimitSettings
from keystore.api.sessions import WorkosSettings
from keystore.audit_events import AuditEvent
from keystore.db import Executor
from keystore.printable import redact
from keystore.roles import DEFAULT_ROLES

__all__ = ["ApiServer", "LimitSettings", "WorkosSettings", "create_app", "serve_api"]

log = structlog.get_logger("keystore.api")


# aiohttp's own loggers. "aiohttp.server" logs a request it could not parse at ERROR with the
# parser's exception, which quotes the offending header line: an over-long or malformed
# "Authorization: Bearer rt_live_..." line, secret included.
_AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal")


class _NoCredentials(logging.Filter):
    """Rewrites aiohttp's records so that no credential reaches any handler: the message is
    formatted and redacted, and a traceback becomes one redacted line (a request that could
    not be parsed is the client's problem, not a bug worth a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message}: {type(exc).__name__}: {exc}"
        elif record.exc_text:
            message = f"{message}: {record.exc_text}"
        record.msg = redact(message)
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


def guard_aiohttp_logs() -> None:
    """Install the credential filter on aiohttp's loggers (idempotent)."""
    for name in _AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoCredentials) for f in logger.filters):
            logger.addFilter(_NoCredentials())


class ApiServer:
    """A running key API. ``port`` is the bound port (useful when 0 was asked for)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, limits: ApiLimits) -> None:
        self._runner = runner
        self.host = host
        self.port = port
        self.limits = limits

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
    header_timeout_seconds: float = _limits.DEFAULT_HEADER_TIMEOUT,
    idle_timeout_seconds: float = _limits.DEFAULT_IDLE_TIMEOUT,
    body_timeout_seconds: float = _limits.DEFAULT_BODY_TIMEOUT,
    max_connections_per_source: int = _limits.DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
    invalid_key_burst: int = _limits.DEFAULT_INVALID_KEY_BURST,
    invalid_key_per_second: float = _limits.DEFAULT_INVALID_KEY_PER_SECOND,
    ipv4_prefix: int = 32,
    ipv6_prefix: int = 64,
    workos_jwks_url: str = "",
    workos_issuer: str = "",
    workos_webhook_secret: str = "",
    workos_roles: Sequence[str] = DEFAULT_ROLES,
) -> ApiServer:
    """Serve the key API on ``host:port`` (port 0: any free port) on the running loop.

    ``rate_*``: per valid API key or member (auth.py). ``workos_*``: the ``[workos]`` settings
    (sessions.py; none set: API keys only). The rest: per connection and per source
    (limits.py, README "Limits"). A bad value raises ``ValueError``.
    """
    guard_aiohttp_logs()
    workos = WorkosSettings(
        jwks_url=workos_jwks_url,
        issuer=workos_issuer,
        webhook_secret=workos_webhook_secret,
        roles=tuple(workos_roles),
    )
    limits = ApiLimits(
        LimitSettings(
            header_timeout_seconds=header_timeout_seconds,
            idle_timeout_seconds=idle_timeout_seconds,
            body_timeout_seconds=body_timeout_seconds,
            max_connections_per_source=max_connections_per_source,
            invalid_key_burst=invalid_key_burst,
            invalid_key_per_second=invalid_key_per_second,
            ipv4_prefix=ipv4_prefix,
            ipv6_prefix=ipv6_prefix,
        )
    )
    app = create_app(
        db,
        max_body_bytes=max_body_bytes,
        record_audit=record_audit,
        extra_routes=extra_routes,
        rate_per_second=rate_per_second,
        rate_burst=rate_burst,
        limits=limits,
        workos=workos,
    )
    # aiohttp's keep-alive timeout is only a backstop: the guard (limits.py) closes idle and
    # half-sent connections first, and counts them.
    backstop = max(header_timeout_seconds, idle_timeout_seconds) + 5.0
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0, keepalive_timeout=backstop)
    await runner.setup()
    try:
        site = ApiSite(runner, host, port, limits)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info(
        "api_listening",
        api=f"{host}:{site.bound_port}",
        header_timeout=header_timeout_seconds,
        idle_timeout=idle_timeout_seconds,
        max_connections_per_source=max_connections_per_source,
        workos_sessions=workos.sessions_enabled,
        workos_webhooks=workos.webhooks_enabled,
    )
    return ApiServer(runner, host, site.bound_port, limits)
