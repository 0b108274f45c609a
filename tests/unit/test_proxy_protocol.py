"""The PROXY protocol parser (pure) and the header reader in front of a fake connection."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Any

import pytest

from gateway.ssh import proxy_protocol as pp
from gateway.ssh.proxy_protocol import ProxyHeader, ProxyProtocolError, parse

# --- v1 ------------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    data = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 22\r\nSSH-2.0-x\r\n"
    h = parse(data)
    assert h == ProxyHeader(1, "proxy", "tcp4", ("203.0.113.7", 51234), ("192.0.2.1", 22), 43)
    assert data[h.length :] == b"SSH-2.0-x\r\n"


def test_v1_tcp6_is_normalised() -> None:
    h = parse(b"PROXY TCP6 2001:DB8:0:0::1 ::1 65535 0\r\n")
    assert h is not None
    assert h.source == ("2001:db8::1", 65535)
    assert h.destination == ("::1", 0)
    assert h.family == "tcp6"


def test_v1_unknown_keeps_the_real_address() -> None:
    h = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest")
    assert h is not None and h.command == "local" and h.source is None
    assert h.length == len(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, "local", "unknown", None, None, 15)


@pytest.mark.parametrize(
    "partial",
    [b"", b"P", b"PROX", b"PROXY ", b"PROXY TCP4 1.2.3.4", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"],
)
def test_v1_incomplete_asks_for_more(partial: bytes) -> None:
    assert parse(partial) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs source"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "needs source"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not a valid IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not a valid IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "out of range"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a decimal"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not a decimal"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "not ASCII"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "needs source"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
        (b"PROXY " + b"A" * 120, "CRLF"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "no PROXY"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY"),
    ],
)
def test_v1_refuses_malformed_headers(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse(data)


def test_v1_longest_legal_header_parses() -> None:
    src = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {src} {src} 65535 65535\r\n".encode()
    h = parse(line)
    assert h is not None and h.length == len(line) == 104
    # The spec's bound, 107 bytes, is reached by UNKNOWN with the longest addresses.
    unknown = f"PROXY UNKNOWN {src} {src} 65535 65535\r\n".encode()
    assert len(unknown) == pp.V1_MAX_LENGTH
    assert parse(unknown) is not None


# --- v2 ------------------------------------------------------------------------------------


def test_v2_ipv4_with_tlvs() -> None:
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP
    data = pp.build_v2(("198.51.100.9", 40000), ("10.0.0.1", 22), tlvs=tlv) + b"SSH-2.0-x"
    h = parse(data)
    assert h is not None
    assert (h.version, h.command, h.family) == (2, "proxy", "tcp4")
    assert h.source == ("198.51.100.9", 40000)
    assert h.destination == ("10.0.0.1", 22)
    assert h.tlvs == ((4, b"abc"),)
    assert data[h.length :] == b"SSH-2.0-x"


def test_v2_ipv6() -> None:
    h = parse(pp.build_v2(("2001:db8::7", 1), ("2001:db8::1", 2222)))
    assert h is not None
    assert h.family == "tcp6" and h.source == ("2001:db8::7", 1)
    assert h.length == 16 + 36


def test_v2_local_is_a_health_check_without_addresses() -> None:
    h = parse(pp.build_v2(None))
    assert h == ProxyHeader(2, "local", "unknown", None, None, 16)


def test_v2_unspec_family_keeps_the_real_address() -> None:
    data = pp.V2_SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0)
    h = parse(data)
    assert h is not None and h.source is None


def test_v2_incomplete_asks_for_more() -> None:
    full = pp.build_v2(("1.2.3.4", 5), ("6.7.8.9", 10))
    for n in range(1, len(full)):
        assert parse(full[:n]) is None, n
    assert parse(full) is not None


def _v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return pp.V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", size) + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_v2(0x11, 0x11, b"\0" * 12), "version 1"),
        (_v2(0x22, 0x11, b"\0" * 12), "command 2"),
        (_v2(0x21, 0x12, b"\0" * 12), "not for a stream"),
        (_v2(0x21, 0x31, b"\0" * 216), "not IPv4 or IPv6"),
        (_v2(0x21, 0x11, b"\0" * 8), "needs 12"),
        (_v2(0x21, 0x21, b"\0" * 12), "needs 36"),
        (_v2(0x21, 0x11, b"", length=60000), "limit"),
        (_v2(0x21, 0x11, b"\0" * 12 + b"\x01\x00"), "truncated"),
        (_v2(0x21, 0x11, b"\0" * 12 + b"\x01\x00\x09ab"), "runs past"),
    ],
)
def test_v2_refuses_malformed_headers(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse(data)


def test_builders_round_trip() -> None:
    for src, dst in [(("1.2.3.4", 1), ("5.6.7.8", 2)), (("::1", 3), ("::2", 4))]:
        for data in (pp.build_v1(src, dst), pp.build_v2(src, dst)):
            h = parse(data)
            assert h is not None and h.source == src and h.destination == dst
            assert h.length == len(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", True),
        (b"PRO", True),
        (b"PROXY TCP4", True),
        (b"\r\n\r\n", True),
        (pp.V2_SIGNATURE + b"!", True),
        (b"SSH-2.0-", False),
        (b"PROXX", False),
        (b"\r\n\r\n\x01", False),
    ],
)
def test_could_be_header(data: bytes, expected: bool) -> None:
    assert pp.could_be_header(data) is expected


def test_trust_by_cidr() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert pp.is_trusted("10.1.2.3", nets)
    assert pp.is_trusted("::ffff:10.1.2.3", nets)  # IPv4-mapped from a dual-stack listener
    assert pp.is_trusted("2001:db8::5", nets)
    assert not pp.is_trusted("11.0.0.1", nets)
    assert not pp.is_trusted("not-an-ip", nets)
    assert not pp.is_trusted(None, nets)
    assert not pp.is_trusted("10.0.0.1", [])


# --- the header reader, in front of a fake connection ---------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__({"peername": peer, "sockname": ("127.0.0.1", 2222)})
        self.protocol: Any = None
        self.aborted = False
        self.written = b""

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def abort(self) -> None:
        self.aborted = True


class FakeConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.data = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data


def _reader(mode: str, trusted: str = "127.0.0.0/8", timeout: float = 5.0) -> tuple[Any, list[str]]:
    outcomes: list[str] = []
    conns: list[FakeConn] = []

    def factory(_h: str, _p: int) -> FakeConn:
        conns.append(FakeConn())
        return conns[-1]

    settings = pp.ProxySettings(mode, (ipaddress.ip_network(trusted),), timeout)
    reader = pp._HeaderReader(settings, factory, outcomes.append)
    reader.conns = conns  # type: ignore[attr-defined]
    return reader, outcomes


async def test_reader_hands_over_with_the_claimed_address() -> None:
    reader, outcomes = _reader("required")
    t = FakeTransport(("127.0.0.1", 5555))
    reader.connection_made(t)
    reader.data_received(b"PROXY TCP4 203.0.113.9 10.0.0.1 4242 22\r")
    assert not reader.conns
    reader.data_received(b"\nSSH-2.0-client\r\n")
    (conn,) = reader.conns
    assert t.protocol is conn
    assert conn.data == b"SSH-2.0-client\r\n"
    assert conn.transport.get_extra_info("peername") == ("203.0.113.9", 4242)
    assert conn.transport.get_extra_info("sockname") == ("10.0.0.1", 22)
    conn.transport.write(b"x")
    assert t.written == b"x"
    assert outcomes == ["proxied"]


async def test_reader_refuses_a_header_from_an_untrusted_source() -> None:
    reader, outcomes = _reader("optional")
    t = FakeTransport(("192.0.2.50", 5555))
    reader.connection_made(t)
    reader.data_received(pp.build_v2(("1.1.1.1", 1), ("2.2.2.2", 2)))
    assert t.aborted and not reader.conns
    assert outcomes == ["proxy_header_untrusted"]


async def test_reader_optional_lets_plain_ssh_through_unchanged() -> None:
    reader, outcomes = _reader("optional")
    t = FakeTransport(("192.0.2.50", 5555))
    reader.connection_made(t)
    reader.data_received(b"SSH-2.0-x\r\n")
    (conn,) = reader.conns
    assert conn.transport is t and conn.data == b"SSH-2.0-x\r\n"
    assert outcomes == ["direct"]


async def test_reader_required_refuses_untrusted_sources_and_missing_headers() -> None:
    reader, outcomes = _reader("required")
    t = FakeTransport(("192.0.2.50", 5555))
    reader.connection_made(t)
    assert t.aborted and outcomes == ["proxy_untrusted_source"]
    reader, outcomes = _reader("required")
    t = FakeTransport(("127.0.0.1", 5555))
    reader.connection_made(t)
    reader.data_received(b"SSH-2.0-x\r\n")
    assert t.aborted and outcomes == ["proxy_header_missing"]


async def test_reader_refuses_garbage_and_slow_headers() -> None:
    reader, outcomes = _reader("required")
    t = FakeTransport(("127.0.0.1", 5555))
    reader.connection_made(t)
    reader.data_received(b"PROXY TCP4 bogus\r\n")
    assert t.aborted and outcomes == ["proxy_header_invalid"]
    reader, outcomes = _reader("required", timeout=0.05)
    t = FakeTransport(("127.0.0.1", 5555))
    reader.connection_made(t)
    reader.data_received(b"PROXY TCP4 1.2.3.4")
    await asyncio.sleep(0.15)
    assert t.aborted and outcomes == ["proxy_header_timeout"]
