"""The key API's connection and source limits (keystore/api/limits.py): the pure parts, and the
connection guard on a loopback listener with short timeouts (no database: only public routes
and requests refused before any lookup)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from keystore.api import ApiServer, serve_api
from keystore.api.limits import REFUSALS, LimitSettings, RefusalLog, SourceBuckets, raw_response

# --- sources --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "source"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, "unknown"),
        ("", "unknown"),
        ("not-an-address", "unknown"),
    ],
)
def test_a_source_is_an_ipv4_address_or_an_ipv6_64(host: str | None, source: str) -> None:
    assert LimitSettings().source_of(host) == source


def test_source_prefixes_are_settings() -> None:
    settings = LimitSettings(ipv4_prefix=24, ipv6_prefix=128)
    assert settings.source_of("203.0.113.7") == "203.0.113.0/24"
    assert settings.source_of("2001:db8::5") == "2001:db8::5"


@pytest.mark.parametrize(
    "bad",
    [
        {"header_timeout_seconds": 0},
        {"idle_timeout_seconds": -1},
        {"body_timeout_seconds": 0},
        {"max_connections_per_source": 0},
        {"invalid_key_burst": 0},
        {"invalid_key_per_second": 0},
        {"ipv4_prefix": 33},
        {"ipv6_prefix": 0},
    ],
)
def test_nonsense_limits_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        LimitSettings(**bad)  # type: ignore[arg-type]


# --- invalid keys per source ------------------------------------------------------------------


def test_a_source_spends_its_burst_then_waits_for_the_refill() -> None:
    buckets = SourceBuckets(per_second=2.0, burst=3)
    for _ in range(3):
        assert buckets.wait("a", now=0.0) == 0.0
        buckets.spend("a", now=0.0)
    assert buckets.wait("a", now=0.0) == pytest.approx(0.5)
    assert buckets.wait("b", now=0.0) == 0.0  # another source is not affected
    assert buckets.wait("a", now=0.5) == 0.0
    buckets.spend("a", now=0.5)
    assert buckets.wait("a", now=0.5) > 0


def test_concurrent_spending_goes_below_zero_and_takes_longer_to_refill() -> None:
    buckets = SourceBuckets(per_second=1.0, burst=2)
    for _ in range(4):  # four lookups that were all let in before any failed
        buckets.spend("a", now=0.0)
    assert buckets.wait("a", now=0.0) == pytest.approx(3.0)


def test_the_table_is_bounded_and_a_full_table_shares_one_overflow_bucket() -> None:
    buckets = SourceBuckets(per_second=1.0, burst=2, max_sources=3, sweep_every=0.0)
    for source in ("a", "b", "c"):
        buckets.spend(source, now=0.0)
    buckets.spend("d", now=0.0)  # table full of draining sources: d spends from the overflow
    buckets.spend("e", now=0.0)
    assert len(buckets) == 4  # a, b, c and the overflow bucket
    assert buckets.wait("f", now=0.0) > 0  # the overflow is empty for everyone new
    # Once the others have refilled, a sweep forgets them and new sources get their own.
    assert buckets.wait("f", now=10.0) == 0.0
    buckets.spend("f", now=10.0)
    assert "f" in buckets._buckets


# --- refusals ---------------------------------------------------------------------------------


def _count(code: str) -> float:
    return float(REFUSALS.labels(code)._value.get())


def test_every_refusal_counts_but_repeated_log_lines_are_folded() -> None:
    refusals = RefusalLog(interval=60.0)
    before = _count("header_timeout")
    with capture_logs() as logs:
        for _ in range(5):
            refusals.refused("header_timeout", "198.51.100.1")
        refusals.refused("header_timeout", "198.51.100.2")
    assert _count("header_timeout") - before == 6
    assert [(e["event"], e["source"]) for e in logs] == [
        ("api_refused", "198.51.100.1"),
        ("api_refused", "198.51.100.2"),
    ]
    assert logs[0]["reason"] == "header_timeout"


def test_a_folded_line_reports_how_many_were_suppressed() -> None:
    refusals = RefusalLog(interval=0.05)
    with capture_logs() as logs:
        for _ in range(3):
            refusals.refused("too_many_connections", "198.51.100.3")
        time.sleep(0.06)
        refusals.refused("too_many_connections", "198.51.100.3")
    assert [e.get("suppressed") for e in logs] == [None, 2]


def test_a_raw_refusal_is_a_complete_http_answer_in_the_api_error_shape() -> None:
    raw = raw_response(429, "too_many_connections", "Too many.", {"Retry-After": "1"})
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 429 Too Many Requests"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Connection"] == "close"
    assert headers["Retry-After"] == "1"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == {"error": {"code": "too_many_connections", "message": "Too many."}}


# --- the connection guard, on loopback ---------------------------------------------------------

HEADER = 0.4
IDLE = 0.8


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    # No database: the routes used here never reach one.
    api = await serve_api(
        object(),  # type: ignore[arg-type]
        host="127.0.0.1",
        port=0,
        max_body_bytes=1024,
        record_audit=lambda e: None,
        header_timeout_seconds=HEADER,
        idle_timeout_seconds=IDLE,
        max_connections_per_source=3,
    )
    yield api
    await api.close()


async def _connect(
    api: ApiServer, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", api.port, local_addr=(source, 0))


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until EOF (and what came before it); fails after ``limit``."""
    t0 = time.monotonic()
    data = await asyncio.wait_for(reader.read(), limit)
    return time.monotonic() - t0, data


GET = b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    writer.write(GET)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), 5)
    return int(head.split(b" ")[1])


async def test_a_half_sent_request_is_answered_408_and_closed_at_the_header_timeout(
    server: ApiServer,
) -> None:
    reader, writer = await _connect(server)
    writer.write(b"GET /v1/ssh-keys HTTP/1.1\r\nHost: x\r\n")
    took, data = await _closed_after(reader, HEADER + 2)
    assert HEADER - 0.1 <= took <= HEADER + 1
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b'"code": "header_timeout"' in data
    writer.close()


async def test_dripping_a_head_byte_by_byte_does_not_extend_the_header_timeout(
    server: ApiServer,
) -> None:
    reader, writer = await _connect(server)
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionError):
        for byte in b"GET /v1/ssh-keys HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            if reader.at_eof() or time.monotonic() - t0 > HEADER + 2:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
        await _closed_after(reader, 2)
    assert time.monotonic() - t0 <= HEADER + 1.5
    writer.close()


async def test_a_keep_alive_connection_lives_past_the_header_timeout_until_the_idle_timeout(
    server: ApiServer,
) -> None:
    reader, writer = await _connect(server)
    assert await _get(reader, writer) == 200
    await asyncio.sleep(HEADER + 0.1)
    assert await _get(reader, writer) == 200  # a second request on it, once idle past HEADER
    took, data = await _closed_after(reader, IDLE + 2)
    assert data == b""  # closed quietly
    assert IDLE - 0.1 <= took <= IDLE + 1
    writer.close()


async def test_a_source_over_its_connection_cap_is_refused_and_others_are_not(
    server: ApiServer,
) -> None:
    held = [await _connect(server, "127.0.0.1") for _ in range(3)]
    for reader, writer in held:
        assert await _get(reader, writer) == 200
    reader, writer = await _connect(server, "127.0.0.1")
    _, data = await _closed_after(reader, 2)
    assert data.startswith(b"HTTP/1.1 429 ")
    assert b'"code": "too_many_connections"' in data
    writer.close()
    other = await _connect(server, "127.0.0.2")
    assert await _get(*other) == 200
    other[1].close()
    # Closing one frees a place.
    held[0][1].close()
    await asyncio.sleep(0.1)
    again = await _connect(server, "127.0.0.1")
    assert await _get(*again) == 200
    for _, w in [*held[1:], again]:
        w.close()
    assert server.limits.open_connections() <= 4
