"""Helpers for the keystore's database tests (no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keystore import changes, sandboxes, ssh_keys
from keystore import keys as keyparse
from keystore.changes import AccessChange

WAIT = 5.0  # seconds: the longest any test waits for one notification


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def public_line() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} test@keystore"


@dataclass
class Org:
    """An organization with its default project and one running sandbox."""

    db: Any
    id: uuid.UUID
    project_id: uuid.UUID
    sandbox_id: str

    async def add_key(self, expires_at: dt.datetime | None = None) -> tuple[uuid.UUID, str]:
        parsed = keyparse.parse_public_key(public_line())
        row = await ssh_keys.add_key(
            self.db,
            org_id=self.id,
            project_id=self.project_id,
            key=parsed,
            name="k",
            expires_at=expires_at,
        )
        return row.id, row.fingerprint

    async def add_sandbox(self) -> str:
        sandbox_id = unique("sandbox")
        await sandboxes.add_sandbox(
            self.db,
            sandbox_id=sandbox_id,
            org_id=self.id,
            project_id=self.project_id,
            upstream_host="127.0.0.1",
            upstream_port=2222,
            login_user="dev",
            host_keys=[public_line()],
        )
        return sandbox_id


class Inbox:
    """Payloads received on ``rtgw_access`` by a plain asyncpg LISTEN, parsed."""

    def __init__(self, *, inserts: bool = False) -> None:
        self.queue: asyncio.Queue[tuple[str, AccessChange]] = asyncio.Queue()
        self.inserts = inserts  # keep "insert" changes (migration 0005), which most tests skip

    def received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        change = changes.parse_change(payload)
        if change.op != "insert" or self.inserts:
            self.queue.put_nowait((payload, change))

    async def until(
        self, match: Callable[[AccessChange], bool], seconds: float = WAIT
    ) -> tuple[AccessChange, list[AccessChange], str]:
        """The first change that matches, the ones received before it, and its raw payload."""
        before: list[AccessChange] = []

        async def go() -> tuple[AccessChange, list[AccessChange], str]:
            while True:
                payload, change = await self.queue.get()
                if match(change):
                    return change, before, payload
                before.append(change)

        return await asyncio.wait_for(go(), seconds)
