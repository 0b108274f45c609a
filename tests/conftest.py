"""Every test under tests/integration/ is marked ``integration`` here, by folder (no file marks
itself). ``pytest -m "not integration"`` therefore runs tests/unit alone, and the fixtures that
start PostgreSQL and sshd live in tests/integration/conftest.py, out of the unit tests' reach."""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parent / "integration"
COMPAT = Path(__file__).resolve().parent / "compat"  # real clients: integration too


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION) or item.path.is_relative_to(COMPAT):
            item.add_marker(pytest.mark.integration)
