"""The asyncpg pool, and the one place where asyncpg errors become keystore errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from keystore.errors import Unavailable

# asyncpg ships no type information; a Pool or Connection is passed around as this alias.
Executor = Any

# Errors that mean "the database cannot answer", as opposed to a constraint or input error.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InternalServerError,
    asyncpg.exceptions.UndefinedTableError,
)


@contextlib.contextmanager
def unavailable_on_failure(what: str) -> Any:
    """Turn connection-level failures into ``Unavailable`` so callers can fail closed."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise Unavailable(f"database unavailable while {what}: {type(exc).__name__}") from exc


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    connect_timeout_seconds: float = 5.0,
    command_timeout_seconds: float = 5.0,
) -> Executor:
    """Open a pool; raise ``Unavailable`` when the database cannot be reached."""
    with unavailable_on_failure("connecting"):
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout_seconds,
            command_timeout=command_timeout_seconds,
            server_settings={"application_name": "runtools-gateway"},
        )


@contextlib.asynccontextmanager
async def connect(dsn: str, *, timeout_seconds: float = 10.0) -> AsyncIterator[Executor]:
    """One short-lived connection, for the CLI and migrations."""
    with unavailable_on_failure("connecting"):
        conn = await asyncpg.connect(dsn, timeout=timeout_seconds)
    try:
        yield conn
    finally:
        await conn.close()


class _Same:
    """Lets a bare connection stand where a pool's ``acquire()`` is expected."""

    def __init__(self, conn: Executor) -> None:
        self._conn = conn

    async def __aenter__(self) -> Executor:
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        return None


def acquire(db: Executor) -> Executor:
    """``async with acquire(db) as conn`` works for a pool and a connection alike."""
    return db.acquire() if hasattr(db, "acquire") else _Same(db)
