"""The asyncpg pool, and the one place where asyncpg errors become keystore errors."""

from __future__ import annotations

import contextlib
import os
import urllib.parse
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
    # No host of a multi-host DSN has the wanted role (e.g. mid-failover, no primary yet).
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)

# Errors after which the next host of a multi-host DSN is tried (as libpq does; an
# authentication failure is not one of them).
_NEXT_HOST: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


@contextlib.contextmanager
def unavailable_on_failure(what: str) -> Any:
    """Turn connection-level failures into ``Unavailable`` so callers can fail closed."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise Unavailable(f"database unavailable while {what}: {type(exc).__name__}") from exc


def dsn_hosts(dsn: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs of a multi-host URI (``postgresql://h1:p1,h2/db?...``).

    Empty unless the URI names two or more hosts in its authority part; hosts given some other
    way (``?host=``, ``PGHOST``) are left to asyncpg. A host without a port gets ``PGPORT`` or
    5432, as libpq does.
    """
    netloc = urllib.parse.urlsplit(dsn).netloc
    hostlist = netloc.rpartition("@")[2]
    if "," not in hostlist:
        return []
    default_port = int(os.environ.get("PGPORT") or 5432)
    pairs: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = item.partition(":")
        pairs.append((urllib.parse.unquote(host), int(port) if port else default_port))
    return pairs


def target_session_attrs_of(dsn: str, kwargs: dict[str, Any] | None = None) -> str:
    """The effective ``target_session_attrs``: keyword, else DSN, else PGTARGETSESSIONATTRS."""
    given = (kwargs or {}).get("target_session_attrs")
    if given is None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)
        in_dsn = query.get("target_session_attrs")
        given = in_dsn[-1] if in_dsn else os.environ.get("PGTARGETSESSIONATTRS")
    return str(given or "any")


async def connect_raw(dsn: str, *, timeout_seconds: float = 10.0, **kwargs: Any) -> Executor:
    """``asyncpg.connect``, with ``timeout_seconds`` applying to each host of a multi-host DSN.

    asyncpg accepts ``postgresql://h1:p1,h2:p2/db?target_session_attrs=read-write`` and tries
    the hosts in order, keeping the first one whose role matches; but its ``timeout`` bounds the
    whole attempt, so a first host that swallows packets (a failed primary whose address no
    longer answers) would use it all up. Here each host gets ``timeout_seconds`` (libpq's
    ``connect_timeout`` semantics) and the role check is still asyncpg's. Raises the last
    host's error when none fits. Also usable as ``create_pool(connect=...)``.
    """
    hosts = [] if "host" in kwargs else dsn_hosts(dsn)
    if len(hosts) < 2 or target_session_attrs_of(dsn, kwargs) == "prefer-standby":
        # One host, hosts given by keyword, or a mode that must see every host before choosing
        # (prefer-standby): asyncpg's own walk.
        return await asyncpg.connect(dsn, timeout=timeout_seconds, **kwargs)
    last: BaseException = OSError(f"no host of {len(hosts)} accepted the connection")
    for host, port in hosts:
        try:
            return await asyncpg.connect(
                dsn, host=host, port=port, timeout=timeout_seconds, **kwargs
            )
        except _NEXT_HOST as exc:
            last = exc
    raise last


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    connect_timeout_seconds: float = 5.0,
    command_timeout_seconds: float = 5.0,
) -> Executor:
    """Open a pool; raise ``Unavailable`` when the database cannot be reached.

    ``dsn`` may name several hosts (``postgresql://db1,db2/runtools?target_session_attrs=
    read-write``): every new pool connection walks them in order with ``connect_timeout_seconds``
    per host, so after a failover the connections that replace the broken ones go to the new
    primary without a restart.
    """
    with unavailable_on_failure("connecting"):
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            connect=connect_raw,
            timeout_seconds=connect_timeout_seconds,
            command_timeout=command_timeout_seconds,
            server_settings={"application_name": "runtools-gateway"},
        )


@contextlib.asynccontextmanager
async def connect(dsn: str, *, timeout_seconds: float = 10.0) -> AsyncIterator[Executor]:
    """One short-lived connection, for the CLI and migrations."""
    with unavailable_on_failure("connecting"):
        conn = await connect_raw(dsn, timeout_seconds=timeout_seconds)
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
