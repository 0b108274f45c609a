"""``/healthz``, ``/readyz`` and ``/metrics`` as aiohttp routes.

They are served by a small listener of their own, the ops listener (``metrics.listen``, loopback
``127.0.0.1:9122`` by default), never on the public API port unless asked for: with
``metrics.listen = ""`` they are handed to the key API as ``extra_routes`` instead.

- ``/healthz``: 200 while the process runs its event loop.
- ``/readyz``: 200 only when the database answers ``SELECT 1`` within 2 s, the SSH listener is
  up, the gateway is not draining and (``revocation.mode = "strict"``) the access-change
  listener is subscribed and reconciled; 503 otherwise, with the failing checks in the JSON
  body, which also shows the revocation mode and listener state.
- ``/metrics``: Prometheus text exposition (see gateway/daemon/metrics.py).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web

from gateway.daemon import metrics


class Probe(Protocol):
    """What the health handlers need to know about the gateway."""

    def listeners_up(self) -> bool: ...

    def is_draining(self) -> bool: ...

    async def database_ok(self) -> bool: ...

    def revocation_status(self) -> dict[str, object]: ...


def routes(probe: Probe) -> list[web.RouteDef]:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_request: web.Request) -> web.Response:
        try:
            db = await asyncio.wait_for(probe.database_ok(), 2.0)
        except (TimeoutError, OSError):
            db = False
        revocation = probe.revocation_status()
        checks = {
            "database": db,
            "listeners": probe.listeners_up(),
            "not_draining": not probe.is_draining(),
        }
        if revocation.get("mode") == "strict":
            # Strict revocation refuses new channels while changes may be missed: not ready.
            checks["revocation"] = bool(revocation.get("healthy"))
        ready = all(checks.values())
        return web.json_response(
            {
                "status": "ready" if ready else "not ready",
                "checks": checks,
                "revocation": revocation,
            },
            status=200 if ready else 503,
        )

    async def metrics_handler(_request: web.Request) -> web.Response:
        body = metrics.render()
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics_handler),
    ]


class HealthServer:
    """The ops listener (``metrics.listen``): these routes only, no access log."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    @classmethod
    async def start(cls, probe: Probe, host: str, port: int) -> HealthServer:
        app = web.Application()
        app.add_routes(routes(probe))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound = int(runner.addresses[0][1]) if runner.addresses else port
        return cls(runner, bound)

    async def close(self) -> None:
        await self._runner.cleanup()
