"""Where the SSH door gets a sandbox's access data: an interface, the database, and a fake.

The auth decision (gateway/ssh/auth.py) never touches the database itself: it is handed an
``AccessSource``. The daemon passes ``DatabaseAccess``; unit tests pass ``StaticAccess``, a
dict-backed source shipped here so that no test has to monkeypatch a keystore module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from keystore import sandboxes
from keystore.db import Executor
from keystore.errors import Unavailable
from keystore.models import SandboxAccess


class AccessSource(Protocol):
    """Looks up one sandbox and the active keys of its own organization.

    Returns None for an unknown sandbox; raises ``keystore.errors.Unavailable`` when the answer
    cannot be had (the caller then refuses: fail closed).
    """

    async def access_for(self, sandbox_id: str) -> SandboxAccess | None: ...


class DatabaseAccess:
    """The production source: one query per login name (keystore.sandboxes.access_for)."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def access_for(self, sandbox_id: str) -> SandboxAccess | None:
        return await sandboxes.access_for(self._db, sandbox_id)


class StaticAccess:
    """A dict-backed source for tests; ``available = False`` makes it behave like a dead DB."""

    def __init__(self, table: Mapping[str, SandboxAccess] | None = None) -> None:
        self.table: dict[str, SandboxAccess] = dict(table or {})
        self.available = True
        self.lookups: list[str] = []

    async def access_for(self, sandbox_id: str) -> SandboxAccess | None:
        self.lookups.append(sandbox_id)
        if not self.available:
            raise Unavailable("the test made the access source unavailable")
        return self.table.get(sandbox_id)
