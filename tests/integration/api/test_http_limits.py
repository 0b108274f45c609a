"""Issue 9, finding 8: no one source takes the key API from the others.

The real ``runtools-gateway serve`` with short API limits (RTGW_API_*), raw sockets as the
attacker, each attack and each legitimate client on a loopback address of its own (127.0.0.x:
the gateway listens on 127.0.0.1, a client socket bound to 127.0.0.5 is another source).
Every wait is bounded; the module runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import selectors
import socket
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import run_db, unique
from keystore import api_keys, orgs
from tests.integration.support import GatewayFactory

HEADER_TIMEOUT = 1.5
IDLE_TIMEOUT = 3.0
BODY_TIMEOUT = 1.5
PER_SOURCE = 8
BURST = 10
REFILL = 0.5  # tokens per second
SLACK = 1.5  # scheduling on a busy 2-core machine

LIMITS_ENV = {
    "RTGW_API_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
    "RTGW_API_IDLE_TIMEOUT_SECONDS": str(IDLE_TIMEOUT),
    "RTGW_API_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
    "RTGW_API_MAX_CONNECTIONS_PER_SOURCE": str(PER_SOURCE),
    "RTGW_API_INVALID_KEY_BURST": str(BURST),
    "RTGW_API_INVALID_KEY_PER_SECOND": str(REFILL),
}

HALF_SENT = b"GET /v1/ssh-keys HTTP/1.1\r\nHost: x\r\n"  # no final CRLF: the head never ends
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


@dataclass(frozen=True)
class Limited:
    gw: GatewayProcess
    token: str  # a valid rt_live_ key with every scope

    @property
    def port(self) -> int:
        return self.gw.api_port


@pytest.fixture(scope="module")
def limited(module_gateway_factory: GatewayFactory, database_url: str) -> Limited:
    async def make_key(conn: Any) -> str:
        org = await orgs.create_org(conn, unique("httplimits"))
        created = await api_keys.create_key(conn, org_id=org.id, name="limits", scopes=["*"])
        return created.secret

    token = run_db(database_url, make_key)
    return Limited(module_gateway_factory(LIMITS_ENV), token)


# --- a tiny HTTP/1.1 client on raw sockets ---------------------------------------------------


def connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str:
        return str(json.loads(self.body)["error"]["code"])


def read_reply(sock: socket.socket) -> Reply:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a body")
        body += chunk
    return Reply(int(lines[0].split()[1]), headers, body[:length])


def call(
    sock: socket.socket,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
) -> Reply:
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {len(payload)}"]
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    if body is not None:
        head.append("Content-Type: application/json")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return read_reply(sock)


def fetch(port: int, source: str, method: str, path: str, token: str | None = None) -> Reply:
    with connect(port, source) as sock:
        return call(sock, method, path, token)


def closed_within(
    socks: list[socket.socket], limit: float
) -> dict[socket.socket, tuple[float, bytes]]:
    """For each socket the server closed within ``limit`` seconds: (when, by
    ``time.monotonic()``, and what it sent before)."""
    t0 = time.monotonic()
    received = {s: b"" for s in socks}
    closed: dict[socket.socket, tuple[float, bytes]] = {}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        while len(closed) < len(socks) and (left := limit - (time.monotonic() - t0)) > 0:
            for key, _ in sel.select(timeout=left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk
                    continue
                closed[sock] = (time.monotonic(), received[sock])
                sel.unregister(sock)
    return closed


def random_key() -> str:
    return "rt_live_" + "".join(secrets.choice(BASE62) for _ in range(44))


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    text = fetch(gw.metrics_port, "127.0.0.1", "GET", "/metrics").body.decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.contextmanager
def sockets(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


# --- header and idle timeouts --------------------------------------------------------------


def test_fifty_half_sent_requests_are_all_closed_at_the_header_timeout(limited: Limited) -> None:
    before = metric(limited.gw, "rtgw_api_refusals_total", reason="header_timeout")
    # 50 half-sent heads from seven addresses (the per-source cap is 8), plus one that drips a
    # header byte every 0.2 s (which must not extend the timeout).
    sources = [f"127.0.0.{20 + i // PER_SOURCE}" for i in range(50)]
    first = time.monotonic()
    with sockets([connect(limited.port, source) for source in sources]) as socks:
        for s in socks:
            s.sendall(HALF_SENT)
        last = time.monotonic()
        # Meanwhile, someone else is served at once.
        assert fetch(limited.port, "127.0.0.30", "GET", "/v1/openapi.json").status == 200
        closed = closed_within(socks, HEADER_TIMEOUT + SLACK)
        assert len(closed) == 50, f"{50 - len(closed)} half-sent requests still open"
        when = [at for at, _ in closed.values()]
        assert min(when) >= first + HEADER_TIMEOUT - 0.2  # not before the timeout...
        assert max(when) <= last + HEADER_TIMEOUT + SLACK  # ...and not much after it
        answers = [data for _, data in closed.values()]
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0]
        assert all(b'"header_timeout"' in a for a in answers)

    with connect(limited.port, "127.0.0.31") as drip:
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for byte in HALF_SENT + b"X-Slow: " + b"a" * 200:
                drip.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - t0 > HEADER_TIMEOUT + SLACK + 2:
                    break
        assert time.monotonic() - t0 <= HEADER_TIMEOUT + SLACK + 0.5

    assert metric(limited.gw, "rtgw_api_refusals_total", reason="header_timeout") >= before + 51
    limited.gw.wait_event("api_refused", lambda e: e.get("reason") == "header_timeout")


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(limited: Limited) -> None:
    with sockets([connect(limited.port, "127.0.0.32")]) as socks:
        closed = closed_within(socks, HEADER_TIMEOUT + SLACK)
        assert list(closed) == socks
        assert closed[socks[0]][1].startswith(b"HTTP/1.1 408 ")


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(limited: Limited) -> None:
    before = metric(limited.gw, "rtgw_api_idle_closed_total")
    with sockets([connect(limited.port, "127.0.0.33")]) as socks:
        sock = socks[0]
        assert call(sock, "GET", "/v1/openapi.json").status == 200
        # Idle past the header timeout it is still open: the idle timeout applies between requests.
        time.sleep(HEADER_TIMEOUT + 0.5)
        assert call(sock, "GET", "/v1/openapi.json").status == 200
        answered = time.monotonic()
        closed = closed_within(socks, IDLE_TIMEOUT + SLACK)
        assert sock in closed, "an idle keep-alive connection stayed open"
        at, data = closed[sock]
        assert data == b""  # closed quietly
        assert IDLE_TIMEOUT - 0.3 <= at - answered <= IDLE_TIMEOUT + SLACK
    assert metric(limited.gw, "rtgw_api_idle_closed_total") >= before + 1


# --- connections per source ------------------------------------------------------------------


def test_one_source_over_its_connection_cap_is_refused_while_another_is_served(
    limited: Limited,
) -> None:
    before = metric(limited.gw, "rtgw_api_refusals_total", reason="too_many_connections")
    with sockets([connect(limited.port, "127.0.0.40") for _ in range(PER_SOURCE)]) as held:
        for s in held:  # all admitted and served (then idle, held open)
            assert call(s, "GET", "/v1/openapi.json").status == 200
        with connect(limited.port, "127.0.0.40") as extra:
            refused = read_reply(extra)
            assert refused.status == 429
            assert refused.code == "too_many_connections"
            assert refused.headers["connection"] == "close"
            assert refused.headers["retry-after"] == "1"
            assert extra.recv(1) == b""
        # Another address is served, authenticated requests included.
        other = fetch(limited.port, "127.0.0.2", "GET", "/v1/ssh-keys", limited.token)
        assert other.status == 200, other.body
    # The held connections are gone: the source gets in again.
    deadline = time.monotonic() + 5
    while True:
        try:
            if fetch(limited.port, "127.0.0.40", "GET", "/v1/openapi.json").status == 200:
                break
        except ConnectionError:
            pass
        assert time.monotonic() < deadline, "the source stayed locked out"
        time.sleep(0.1)
    assert (
        metric(limited.gw, "rtgw_api_refusals_total", reason="too_many_connections") >= before + 1
    )


# --- invalid API keys per source --------------------------------------------------------------


def test_unknown_keys_from_one_source_get_429_after_the_burst_without_database_lookups(
    limited: Limited,
) -> None:
    gw = limited.gw
    lookups_before = metric(gw, "rtgw_api_key_checks_total", result="unknown")
    statuses: list[int] = []
    t0 = time.monotonic()
    with connect(limited.port, "127.0.0.50") as sock:
        for _ in range(100):
            reply = call(sock, "GET", "/v1/ssh-keys", random_key())
            statuses.append(reply.status)
            if reply.status == 429:
                assert reply.code == "too_many_invalid_keys"
                assert int(reply.headers["retry-after"]) >= 1
            else:
                assert (reply.status, reply.code) == (401, "invalid_api_key")
        # Blocked means blocked: even a valid key from this source waits (no lookup at all).
        blocked = call(sock, "GET", "/v1/ssh-keys", limited.token)
        assert (blocked.status, blocked.code) == (429, "too_many_invalid_keys")
    elapsed = time.monotonic() - t0
    allowed = BURST + REFILL * elapsed + 1
    assert statuses.count(401) <= allowed, statuses
    assert statuses[:BURST] == [401] * BURST
    assert statuses.count(429) >= 100 - allowed
    assert elapsed < 10  # refused quickly
    # The database saw at most about a burst of lookups (every unknown key is one).
    lookups = metric(gw, "rtgw_api_key_checks_total", result="unknown") - lookups_before
    assert lookups == statuses.count(401)
    # Another source is not affected.
    assert fetch(limited.port, "127.0.0.51", "GET", "/v1/ssh-keys", limited.token).status == 200
    assert metric(gw, "rtgw_api_refusals_total", reason="too_many_invalid_keys") >= 80
    gw.wait_event("api_refused", lambda e: e.get("reason") == "too_many_invalid_keys")


def test_a_401_does_not_tell_whether_the_key_id_exists(limited: Limited) -> None:
    real_lookup = limited.token[len("rt_live_") : len("rt_live_") + 12]
    wrong_secret = f"rt_live_{real_lookup}" + "".join(secrets.choice(BASE62) for _ in range(32))
    assert wrong_secret != limited.token
    with connect(limited.port, "127.0.0.52") as sock:
        existing = call(sock, "GET", "/v1/ssh-keys", wrong_secret)
        unknown = call(sock, "GET", "/v1/ssh-keys", random_key())
    assert existing.status == unknown.status == 401
    assert existing.body == unknown.body
    assert existing.headers["www-authenticate"] == unknown.headers["www-authenticate"]


# --- body timeout ---------------------------------------------------------------------------


def test_a_body_that_does_not_arrive_is_answered_408_and_the_connection_closed(
    limited: Limited,
) -> None:
    with sockets([connect(limited.port, "127.0.0.60")]) as socks:
        sock = socks[0]
        sock.sendall(
            b"POST /v1/ssh-keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\nAuthorization: Bearer "
            + limited.token.encode()
            + b'\r\n\r\n{"name": "slow'
        )
        t0 = time.monotonic()
        reply = read_reply(sock)
        assert (reply.status, reply.code) == (408, "body_timeout")
        assert BODY_TIMEOUT - 0.3 <= time.monotonic() - t0 <= BODY_TIMEOUT + SLACK
        closed = closed_within(socks, 1 + SLACK)
        assert sock in closed, "the connection stayed open after a body timeout"
    assert metric(limited.gw, "rtgw_api_refusals_total", reason="body_timeout") >= 1
