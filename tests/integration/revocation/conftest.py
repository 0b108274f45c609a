"""Revocation-area fixtures: a second registered key for the tenant, an API key for its org, and
a scratch database of its own (for a gateway whose listener a test may cut off)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lab.seed import Tenant, migrate_database, run_db, unique
from gateway.lab.user_keys import make_key
from keystore import api_keys
from keystore import db as keystore_db
from tests.integration.revocation.support import ExtraKey


@pytest.fixture
def other_key(tenant: Tenant, tmp_path: Path) -> ExtraKey:
    key = make_key(tmp_path, unique("other"))
    return ExtraKey(key, tenant.register(key.public_line, name="desktop"))


@pytest.fixture
def api_token(tenant: Tenant, database_url: str) -> str:
    """A secret API key of the tenant's organization, allowed to manage its SSH keys."""

    async def create(conn: object) -> str:
        made = await api_keys.create_key(
            conn, org_id=tenant.org_id, name="revocation-tests", scopes=["ssh-key:*"]
        )
        return made.secret

    return run_db(database_url, create)


def _scratch_url(database_url: str, name: str) -> str:
    base, _, rest = database_url.rpartition("/")
    query = rest.partition("?")[2]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@pytest.fixture
def scratch_database(database_url: str) -> Iterator[str]:
    """A new migrated database on the session's server, dropped after the test: a gateway on
    it is the only one there, so its listener connection is the only one in pg_stat_activity
    for that database."""
    name = unique("revoke").replace("-", "_")  # [a-z0-9_]: safe to quote as an identifier

    async def admin(statement: str) -> None:
        async with keystore_db.connect(database_url) as conn:
            await conn.execute(statement)

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = _scratch_url(database_url, name)
    try:
        asyncio.run(migrate_database(url))
        yield url
    finally:
        asyncio.run(admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
