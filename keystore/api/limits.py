"""What one client address ("source") may hold and try on the key API.

* **Header timeout**: a request's head (request line and headers) must be complete within
  ``header_timeout_seconds`` of the connection's opening, or of the first byte after the
  previous request. Otherwise the connection is closed (the first request of a connection also
  gets a 408 ``header_timeout``).
* **Idle timeout**: a keep-alive connection with no request for ``idle_timeout_seconds`` is
  closed.
* **Connections per source**: a source already holding ``max_connections_per_source`` open
  connections gets 429 ``too_many_connections`` on a new one, which is closed at once, before
  aiohttp ever sees it.
* **Body timeout**: a JSON body must arrive within ``body_timeout_seconds`` once its handler
  reads it (``read_json`` in common.py): 408 ``body_timeout`` and the connection is closed.
* **Invalid API keys per source**: every unknown, malformed, expired or revoked key costs the
  source a token of a bucket (``invalid_key_burst`` at once, refilled at
  ``invalid_key_per_second``). A source out of tokens gets 429 ``too_many_invalid_keys`` for
  any key, before the database is asked (auth.py).

The first three are enforced by :class:`GuardedProtocol`, which wraps aiohttp's protocol of
each connection and is installed by :class:`ApiSite` (the listening socket). The
:func:`connection_middleware` tells it when a request's head has arrived and when its handler
is done, which is all it needs to know which timer applies. aiohttp's own keep-alive timeout
stays on as a backstop.

A source is one IPv4 address or one IPv6 /64 (the prefixes are settings, as for SSH). Every
refusal has a stable code (the JSON ``error.code``), counts in ``rtgw_api_refusals_total`` and
logs an ``api_refused`` line; repeated lines for one source and code are folded into one per
:data:`LOG_INTERVAL` seconds (with a ``suppressed`` count), so an attacker cannot flood the log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import Counter, Gauge

from keystore.api.errors import COMMON_HEADERS, error_response

log = structlog.get_logger("keystore.api")

# --- metrics --------------------------------------------------------------------------------

#: Every refusal code of this module and of the per-key rate limit (auth.py).
REFUSAL_CODES = (
    "too_many_connections",
    "header_timeout",
    "body_timeout",
    "too_many_invalid_keys",
    "rate_limited",
    "invalid_webhook",
)
#: Results of an API key check (``api_keys.authenticate``); all but ``malformed`` cost one
#: database query.
KEY_CHECK_RESULTS = (
    "ok",
    "malformed",
    "unknown",
    "expired",
    "revoked",
    "org_disabled",
    "unavailable",
)

REFUSALS = Counter(
    "rtgw_api_refusals",
    "Key API connections and requests refused by a limit, by reason code",
    ["reason"],
)
KEY_CHECKS = Counter(
    "rtgw_api_key_checks",
    "API keys presented to the key API, by result (all but malformed are a database lookup)",
    ["result"],
)
IDLE_CLOSED = Counter(
    "rtgw_api_idle_closed", "Key API keep-alive connections closed after the idle timeout"
)
CONNECTIONS_OPEN = Gauge(
    "rtgw_api_connections_open",
    "Key API connections open now (refused ones not included)",
    multiprocess_mode="livesum",
)
for _code in REFUSAL_CODES:
    REFUSALS.labels(_code)
for _result in KEY_CHECK_RESULTS:
    KEY_CHECKS.labels(_result)

# --- settings -------------------------------------------------------------------------------

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS_PER_SOURCE = 32
DEFAULT_INVALID_KEY_BURST = 20
DEFAULT_INVALID_KEY_PER_SECOND = 1.0

#: Seconds between two ``api_refused`` log lines for one source and code.
LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """The limits of one API server (see the module docstring; README "Limits")."""

    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT
    max_connections_per_source: int = DEFAULT_MAX_CONNECTIONS_PER_SOURCE
    invalid_key_burst: int = DEFAULT_INVALID_KEY_BURST
    invalid_key_per_second: float = DEFAULT_INVALID_KEY_PER_SECOND
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        for name in (
            "header_timeout_seconds",
            "idle_timeout_seconds",
            "body_timeout_seconds",
            "max_connections_per_source",
            "invalid_key_burst",
            "invalid_key_per_second",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0")
        if not 1 <= self.ipv4_prefix <= 32:
            raise ValueError("ipv4_prefix must be 1-32")
        if not 1 <= self.ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be 1-128")

    def source_of(self, host: str | None) -> str:
        """The source of a peer address: the address itself, or its network when the prefix
        is shorter than the address ("2001:db8:1:2::/64"). ``unknown`` when there is none."""
        if not host:
            return "unknown"
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return "unknown"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        prefix = self.ipv4_prefix if address.version == 4 else self.ipv6_prefix
        if prefix == address.max_prefixlen:
            return str(address)
        return str(ipaddress.ip_network((address, prefix), strict=False))


# --- refusals: one code, one metric, one (folded) log line -----------------------------------


class RefusalLog:
    """Counts every refusal and logs it, at most once per ``interval`` per (code, source)."""

    def __init__(self, interval: float = LOG_INTERVAL, max_entries: int = 4096) -> None:
        self.interval = interval
        self.max_entries = max_entries
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def refused(self, code: str, source: str, **fields: Any) -> None:
        REFUSALS.labels(code).inc()
        now = time.monotonic()
        key = (code, source)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is None and len(self._last) >= self.max_entries:
            self._last.clear()  # crude but bounded: at worst some lines are not folded
        self._last[key] = (now, 0)
        suppressed = last[1] if last is not None else 0
        log.warning(
            "api_refused", reason=code, source=source, suppressed=suppressed or None, **fields
        )


def raw_response(status: int, code: str, message: str, headers: dict[str, str]) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 error answer, for connections aiohttp does
    not (or no longer) handle. The body has the API's usual error shape."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in {**COMMON_HEADERS, **headers}.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- invalid API keys per source -------------------------------------------------------------


class SourceBuckets:
    """A token bucket per source: ``burst`` at once, refilled at ``per_second``.

    The table holds at most ``max_sources`` sources (only those that spent a token recently:
    a bucket that has refilled is forgotten at the next sweep). When it is full of sources
    that are all still draining, any other source shares one overflow bucket, so a wide
    attack cannot buy more lookups by spreading over addresses than by concentrating.
    """

    OVERFLOW = "overflow"

    def __init__(
        self, per_second: float, burst: int, max_sources: int = 16384, sweep_every: float = 1.0
    ) -> None:
        self.per_second = per_second
        self.burst = burst
        self.max_sources = max_sources
        self.sweep_every = sweep_every
        self._buckets: dict[str, tuple[float, float]] = {}
        self._last_sweep = float("-inf")

    def __len__(self) -> int:
        return len(self._buckets)

    def _slot(self, source: str, now: float) -> str:
        if source in self._buckets or len(self._buckets) < self.max_sources:
            return source
        if now - self._last_sweep >= self.sweep_every:
            self._last_sweep = now
            refill = self.burst / self.per_second
            for key in [k for k, (_, last) in self._buckets.items() if now - last >= refill]:
                del self._buckets[key]
            if len(self._buckets) < self.max_sources:
                return source
        return self.OVERFLOW

    def _level(self, slot: str, now: float) -> float:
        tokens, last = self._buckets.get(slot, (float(self.burst), now))
        return min(float(self.burst), tokens + max(0.0, now - last) * self.per_second)

    def wait(self, source: str, now: float | None = None) -> float:
        """0 when ``source`` has a token to spend, else the seconds until it has one."""
        now = time.monotonic() if now is None else now
        level = self._level(self._slot(source, now), now)
        return 0.0 if level >= 1.0 else (1.0 - level) / self.per_second

    def spend(self, source: str, now: float | None = None) -> None:
        """Take one token (the level may go below zero under concurrent spending)."""
        now = time.monotonic() if now is None else now
        slot = self._slot(source, now)
        self._buckets[slot] = (self._level(slot, now) - 1.0, now)


# --- connections: header and idle timeouts, per-source cap ---------------------------------

_HEAD = "head"
_IDLE = "idle"
_CLOSING = "closing"

#: Seconds an answer that ends its connection (``Connection: close``, e.g. 408
#: ``body_timeout``) has to be written before the connection is closed.
CLOSE_GRACE = 1.0


class ApiLimits:
    """The limits of one API server and their state: shared by its site, its middlewares and
    ``read_json``."""

    def __init__(self, settings: LimitSettings | None = None) -> None:
        self.settings = settings or LimitSettings()
        self.refusals = RefusalLog()
        self.invalid_keys = SourceBuckets(
            self.settings.invalid_key_per_second, self.settings.invalid_key_burst
        )
        self.open_per_source: dict[str, int] = {}
        self._guards: dict[object, GuardedProtocol] = {}

    def source_of(self, host: str | None) -> str:
        return self.settings.source_of(host)

    def refused(self, code: str, source: str, **fields: Any) -> None:
        self.refusals.refused(code, source, **fields)

    def guard_of(self, request: web.BaseRequest) -> GuardedProtocol | None:
        return self._guards.get(request.protocol)

    def open_connections(self) -> int:
        return sum(self.open_per_source.values())


class GuardedProtocol(asyncio.Protocol):
    """One connection: admitted (per-source cap) and timed, around aiohttp's own protocol.

    Phases: ``head`` (waiting for a complete request head: header timeout), a request being
    handled (no timer: the handler's own bounds apply), ``idle`` (between requests: idle
    timeout). The middleware moves it between them.
    """

    def __init__(self, limits: ApiLimits, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self._limits = limits
        self._factory = factory
        self._inner: Any = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        self._handling = 0
        self._requests_done = 0
        self.source = "unknown"

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        self._transport = transport
        limits = self._limits
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
        self.source = limits.source_of(host)
        cap = limits.settings.max_connections_per_source
        open_now = limits.open_per_source.get(self.source, 0)
        if open_now >= cap:
            limits.refused("too_many_connections", self.source, open=open_now)
            transport.write(
                raw_response(
                    429,
                    "too_many_connections",
                    f"Too many open connections from your address (at most {cap}); "
                    "close some or reuse them.",
                    {"Retry-After": "1"},
                )
            )
            self._close(transport)
            return
        limits.open_per_source[self.source] = open_now + 1
        CONNECTIONS_OPEN.inc()
        self._inner = self._factory()
        limits._guards[self._inner] = self
        self._arm(_HEAD)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._phase == _IDLE and self._handling == 0:
            self._arm(_HEAD)  # the first bytes of the next request
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            return None
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        inner, self._inner = self._inner, None
        if inner is None:
            return
        limits = self._limits
        limits._guards.pop(inner, None)
        left = limits.open_per_source.get(self.source, 1) - 1
        if left > 0:
            limits.open_per_source[self.source] = left
        else:
            limits.open_per_source.pop(self.source, None)
        CONNECTIONS_OPEN.dec()
        inner.connection_lost(exc)

    # told by the middleware ------------------------------------------------------------------

    def request_started(self) -> None:
        self._handling += 1
        self._cancel()

    def request_finished(self, closing: bool = False) -> None:
        """The handler is done; ``closing``: its answer ends the connection (after
        :data:`CLOSE_GRACE`, so that aiohttp does not linger on an unread body)."""
        self._handling -= 1
        self._requests_done += 1
        if self._handling == 0 and self._inner is not None:
            self._arm(_CLOSING if closing else _IDLE)

    # timers -----------------------------------------------------------------------------------

    def _arm(self, phase: str) -> None:
        self._cancel()
        settings = self._limits.settings
        delays = {
            _HEAD: settings.header_timeout_seconds,
            _IDLE: settings.idle_timeout_seconds,
            _CLOSING: CLOSE_GRACE,
        }
        delay = delays[phase]
        self._phase = phase
        self._timer = asyncio.get_running_loop().call_later(delay, self._expired, phase)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None

    def _expired(self, phase: str) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing() or self._handling:
            return
        if phase == _CLOSING:
            self._close(transport)
            return
        if phase == _IDLE:
            IDLE_CLOSED.inc()
            log.debug("api_connection_idle_closed", source=self.source)
            self._close(transport)
            return
        timeout = self._limits.settings.header_timeout_seconds
        self._limits.refused("header_timeout", self.source, requests=self._requests_done)
        # Only the first request of a connection is told why: after a request, the bytes that
        # armed this timer may be the rest of that request's body, not a new head.
        if self._requests_done == 0 and transport.get_write_buffer_size() == 0:
            transport.write(
                raw_response(
                    408,
                    "header_timeout",
                    f"The request line and headers did not arrive within {timeout:g} s.",
                    {},
                )
            )
        self._close(transport)

    @staticmethod
    def _close(transport: asyncio.Transport) -> None:
        """Close after what is written, or at once when the peer is not reading."""
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


@web.middleware
async def connection_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """The outermost middleware: tells the connection's guard that a head arrived, and when
    the handler is done."""
    limits = request.app.get(LIMITS_KEY)
    guard = limits.guard_of(request) if limits is not None else None
    if guard is None:
        answer: web.StreamResponse = await handler(request)
        return answer
    guard.request_started()
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        guard.request_finished(closing=response is not None and response.keep_alive is False)


LIMITS_KEY = web.AppKey("api_limits", ApiLimits)


class JsonErrorsHandler(RequestHandler):
    """aiohttp's protocol, answering what it cannot parse (a request line or header over
    8190 bytes, a bad method, invalid characters) in the API's JSON error shape rather than
    aiohttp's text/plain, so that every answer of the API is JSON."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs, and checks the writer
        text = (
            "The request could not be parsed: a request line or header is too long, or it is "
            "not valid HTTP."
            if status < 500
            else None
        )
        answer = error_response(status, message=text)
        answer.force_close()
        return answer


class ApiSite(web.BaseSite):
    """A TCP listener like ``web.TCPSite`` whose connections go through a
    :class:`GuardedProtocol` first."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ApiLimits) -> None:
        super().__init__(runner)
        self.host = host
        self.port = port
        self.limits = limits
        self.bound_port = port

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.bound_port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        limits = self.limits

        loop = asyncio.get_running_loop()
        options: dict[str, Any] = getattr(server, "_kwargs", {})

        def handler() -> asyncio.BaseProtocol:
            return JsonErrorsHandler(server, loop=loop, **options)

        def protocol() -> asyncio.BaseProtocol:
            return GuardedProtocol(limits, handler)

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self.host, self.port, reuse_address=True, backlog=self._backlog
        )
        sockets = self._server.sockets
        self.bound_port = int(sockets[0].getsockname()[1]) if sockets else self.port
