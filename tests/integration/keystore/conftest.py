"""Fixtures for the keystore's own database tests: a pool on the session's migrated PostgreSQL,
organizations with a sandbox and keys made straight through keystore/, and a raw LISTEN on the
access-change channel."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from keystore import changes, orgs
from keystore import db as keystore_db
from keystore.migrate import migrate
from tests.integration.keystore.support import Inbox, Org, unique


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[Any]:
    p = await keystore_db.create_pool(database_url, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
def make_org(pool: Any) -> Callable[[], Any]:
    async def make() -> Org:
        org = await orgs.create_org(pool, unique("ks"))
        project = await orgs.get_project(pool, org.id, None)
        made = Org(pool, org.id, project.id, "")
        made.sandbox_id = await made.add_sandbox()
        return made

    return make


@pytest.fixture
async def inbox(database_url: str) -> AsyncIterator[Inbox]:
    box = Inbox()
    conn = await keystore_db.connect_raw(database_url)
    await conn.add_listener(changes.CHANNEL, box.received)
    yield box
    await conn.close()


@pytest.fixture
async def scratch_database(database_url: str) -> AsyncIterator[str]:
    """A new database on the session's server, migrated, dropped after the test: for writes
    that would disturb the shared one (TRUNCATE)."""
    name = unique("scratch").replace("-", "_")  # [a-z0-9_]: safe to quote as an identifier
    admin = await keystore_db.connect_raw(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = database_url.rsplit("/", 1)[0] + "/" + name
        async with keystore_db.connect(url) as conn:
            await migrate(conn)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
