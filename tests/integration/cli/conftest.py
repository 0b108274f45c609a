"""CLI-area fixtures: a database of its own, for commands that must meet an empty schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from gateway.lab.seed import unique


@pytest.fixture
def empty_database(database_url: str) -> Iterator[str]:
    """The URL of a new, empty database on the session's server; dropped after the test."""
    name = unique("scratch").replace("-", "_")

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))
