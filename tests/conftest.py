"""Every test under tests/integration/ and tests/compat/ is marked ``integration`` here, by
folder (no file marks itself). ``pytest -m "not integration"`` therefore runs tests/unit alone.

The one fixture both real-parts folders share is here: ``database_url``, a migrated throwaway
PostgreSQL (or ``$DATABASE_URL``), started once per session and only when a test asks for it,
so the unit tests never start one. The fixtures that start sshd and gateways live in
tests/integration/conftest.py and tests/compat/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lab.postgres import ThrowawayCluster
from gateway.lab.seed import migrate_database

INTEGRATION = Path(__file__).resolve().parent / "integration"
COMPAT = Path(__file__).resolve().parent / "compat"  # real clients: integration too


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION) or item.path.is_relative_to(COMPAT):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    cluster = None
    if not url:
        cluster = ThrowawayCluster()
        cluster.start()
        url = cluster.dsn
    asyncio.run(migrate_database(url))
    try:
        yield url
    finally:
        if cluster is not None:
            cluster.stop()
