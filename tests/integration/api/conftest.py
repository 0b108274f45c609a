"""API-area fixtures: the key API served in-process on loopback over the session database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from keystore import db as keystore_db
from keystore.api import serve_api
from keystore.audit_events import AuditEvent
from tests.integration.api.support import MAX_BODY, Api, ApiOrg, make_org


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[Any]:
    p = await keystore_db.create_pool(database_url, min_size=1, max_size=8)
    yield p
    await p.close()


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret internal detail /etc/shadow")


@pytest.fixture(scope="module")
async def api(pool: Any) -> AsyncIterator[Api]:
    events: list[AuditEvent] = []
    server = await serve_api(
        pool,
        host="127.0.0.1",
        port=0,
        max_body_bytes=MAX_BODY,
        record_audit=events.append,
        extra_routes=[web.get("/boom", _boom)],
        rate_per_second=1000.0,
        rate_burst=1000,
    )
    assert server.port > 0
    async with aiohttp.ClientSession() as session:
        yield Api(f"http://127.0.0.1:{server.port}", session, events)
    await server.close()


@pytest.fixture
async def org(pool: Any) -> ApiOrg:
    return await make_org(pool)


@pytest.fixture
async def admin(org: ApiOrg) -> str:
    return (await org.api_key(["*"], name="admin"))[0]
