"""The asyncpg pool, and the one place where asyncpg errors become keystore errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from keystore.errors import Unavailable

_log = logging.getLogger("keystore.db")

# asyncpg ships no type information; a Pool or Connection is passed around as this alias.
Executor = Any

# Errors that mean "the database cannot answer", as opposed to a constraint or input error.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    # Class 08 (connection exceptions), ConnectionDoesNotExistError included.
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    # A write on a server that is (now) a standby: the old primary, demoted after a failover.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
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


# Errors after which every connection of a pool may point at a server that is gone or is no
# longer the primary: the pool's connections are then all replaced (see ``FailoverPool``).
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)

# Errors by which the database refuses what was sent (a value it cannot store), as opposed to
# being unable to answer: retrying the same statement can only fail again.
_REFUSED_CONTENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
)

# A host of a multi-host DSN whose connect attempt (or a pooled connection's query) timed out
# is tried after the others for this long, so that after a failover to a host further down the
# list each new connection does not first wait out the old primary's timeout (cf. JDBC's
# hostRecheckSeconds; libpq keeps no such memory). A host that refuses the connection or has
# the wrong role fails fast: that is not remembered.
HOST_RECHECK_SECONDS = 10.0
# How long a host of a multi-host DSN may take to accept a connection before the next host is
# tried alongside it (see connect_raw).
HEDGE_SECONDS = 1.0
_timed_out_at: dict[tuple[str, int], float] = {}  # (host, port) -> time.monotonic()


def _timed_out(address: object) -> None:
    """Remember that ``(host, port)`` did not answer in time (see HOST_RECHECK_SECONDS)."""
    if isinstance(address, tuple) and len(address) == 2:
        _timed_out_at[(str(address[0]), int(address[1]))] = time.monotonic()


def refuses_content(exc: BaseException) -> bool:
    """Whether ``exc`` means the database refused the values sent (retrying cannot help)."""
    return isinstance(exc, _REFUSED_CONTENT)


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

    Two things keep a silent host from costing its whole timeout on every connection after a
    failover: a host that has not answered within ``HEDGE_SECONDS`` gets the next host tried
    alongside it (the first to fit wins, the other attempt is dropped), and a host whose
    attempt timed out is tried last for ``HOST_RECHECK_SECONDS`` (still tried: it may be the
    only one left). A healthy first host answers well within the hedge delay, so the DSN's
    order is kept whenever it can be.
    """
    hosts = [] if "host" in kwargs else dsn_hosts(dsn)
    if len(hosts) < 2 or target_session_attrs_of(dsn, kwargs) == "prefer-standby":
        # One host, hosts given by keyword, or a mode that must see every host before choosing
        # (prefer-standby): asyncpg's own walk.
        return await asyncpg.connect(dsn, timeout=timeout_seconds, **kwargs)
    now = time.monotonic()

    def timed_out_lately(host: tuple[str, int]) -> bool:
        at = _timed_out_at.get(host)
        return at is not None and now - at < HOST_RECHECK_SECONDS

    order = sorted(hosts, key=timed_out_lately)  # stable: DSN order otherwise
    hedge = min(HEDGE_SECONDS, timeout_seconds)
    attempts: dict[asyncio.Task[Any], int] = {}
    errors: dict[int, BaseException] = {}

    def start(index: int) -> None:
        host, port = order[index]
        task = asyncio.ensure_future(
            asyncpg.connect(dsn, host=host, port=port, timeout=timeout_seconds, **kwargs)
        )
        attempts[task] = index

    started = 1
    start(0)
    try:
        while attempts:
            more = started < len(order)
            done, _ = await asyncio.wait(
                attempts,
                timeout=hedge if more else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in sorted(done, key=attempts.__getitem__):  # DSN order among ties
                index = attempts.pop(task)
                exc = task.exception()
                if exc is None:
                    _timed_out_at.pop(order[index], None)
                    for earlier in attempts.values():
                        if earlier < index:  # still silent after the hedge delay, or more
                            _timed_out(order[earlier])
                    conn: Executor = task.result()
                    return conn
                if not isinstance(exc, _NEXT_HOST):
                    raise exc  # e.g. a refused password: no other host will do better
                if isinstance(exc, TimeoutError):
                    _timed_out(order[index])
                errors[index] = exc
            if more and (not done or not attempts):
                # Nothing answered within the hedge delay, or every running attempt failed.
                start(started)
                started += 1
    finally:
        for task in attempts:
            task.cancel()
        if attempts:
            # Cancelled, or connected just too late: a connection that made it is closed.
            for late in await asyncio.gather(*attempts, return_exceptions=True):
                if isinstance(late, asyncpg.Connection):
                    late.terminate()
    if not errors:
        raise OSError(f"no host of {len(hosts)} accepted the connection")
    raise errors[max(errors)]


class FailoverPool(asyncpg.Pool):  # type: ignore[misc]
    """An asyncpg pool that, when a query fails because its connection was lost (or reached a
    server that is shutting down, or that is now read-only), expires all its connections.

    After a failover every pooled connection points at the old primary; asyncpg replaces a
    connection it knows is closed, but one whose server vanished without a word (a host that
    is gone, a network that drops packets) only fails when used, after the command timeout.
    Expiring them all after the first such failure makes each one be replaced at its next
    acquire (an in-use one when it is released) by a connection that walks the DSN's hosts
    again, so one request pays for the failover instead of one per pooled connection; the
    failed connection itself is closed at once. The failed query is not retried: it may have
    been a write that did commit.
    """

    __slots__ = ()

    async def _query(self, method: str, *args: Any, **kwargs: Any) -> Any:
        async with self.acquire() as conn:
            try:
                return await getattr(conn, method)(*args, **kwargs)
            except _CONNECTION_LOST as exc:
                if isinstance(exc, TimeoutError):
                    # Its server may be gone without a word: new connections try it last.
                    _timed_out(getattr(conn, "_addr", None))
                # Closed at once rather than reset on release: a connection whose query timed
                # out would otherwise be waited on again, as long, before it is given up.
                conn.terminate()
                _log.warning(
                    "database connection lost (%s): replacing every pooled connection",
                    type(exc).__name__,
                )
                await self.expire_connections()
                raise

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return await self._query("execute", *args, **kwargs)

    async def executemany(self, *args: Any, **kwargs: Any) -> Any:
        return await self._query("executemany", *args, **kwargs)

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        return await self._query("fetch", *args, **kwargs)

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
        return await self._query("fetchval", *args, **kwargs)

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        return await self._query("fetchrow", *args, **kwargs)


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
    primary without a restart; the first query that finds its connection lost has every other
    pooled connection replaced too (``FailoverPool``).
    """
    pool = FailoverPool(
        dsn,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        min_size=min_size,
        max_size=max_size,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        connect=connect_raw,
        setup=None,
        init=None,
        reset=None,
        loop=None,
        timeout_seconds=connect_timeout_seconds,
        command_timeout=command_timeout_seconds,
        server_settings={"application_name": "runtools-gateway"},
    )
    with unavailable_on_failure("connecting"):
        return await pool


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
