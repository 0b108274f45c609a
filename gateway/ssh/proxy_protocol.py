"""PROXY protocol v1 and v2 (haproxy's spec) on the SSH listener.

A TCP load balancer that terminates nothing still hides the client: every connection seems to
come from the balancer. With the PROXY protocol it prepends one header naming the real client.
The gateway accepts that header only from ``ssh.proxy_trusted_cidrs`` (anyone else could claim
any address) and only within ``ssh.proxy_header_timeout_seconds``.

``parse()`` is pure: bytes in, a ``ProxyHeader``, ``None`` (need more bytes) or
``ProxyProtocolError`` out. ``Listener`` is the asyncssh ``tunnel=`` object: it creates the
listening server itself (a bound address, ``reuse_port`` for worker processes, or a socket
passed by systemd), and when PROXY is on puts a small protocol in front of each connection that
reads the header, then hands the transport to asyncssh with the claimed addresses as
``peername``/``sockname``. With PROXY off there is no wrapper at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog

log = structlog.get_logger("gateway.proxy")

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the spec's bound, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16
V2_MAX_LENGTH = 4096  # address block + TLVs; real balancers send far less

Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    command: str  # "proxy" (addresses given) or "local" (health check: keep the real ones)
    family: str  # "tcp4" | "tcp6" | "unknown"
    source: Address | None
    destination: Address | None
    length: int  # bytes consumed, header included
    tlvs: tuple[tuple[int, bytes], ...] = ()


def could_be_header(data: bytes) -> bool:
    """True while ``data`` is a prefix of (or starts with) a v1 or v2 signature."""
    n = min(len(data), len(V1_PREFIX))
    if data[:n] == V1_PREFIX[:n]:
        return True
    n = min(len(data), len(V2_SIGNATURE))
    return data[:n] == V2_SIGNATURE[:n]


def parse(data: bytes) -> ProxyHeader | None:
    """Parse a header at the start of ``data``; None when more bytes are needed."""
    if not data:
        return None
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)] and data[:1] == b"\r":
        if len(data) < len(V2_SIGNATURE):
            return None
        return _parse_v2(data)
    if data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)] and data[:1] == b"P":
        return _parse_v1(data)
    raise ProxyProtocolError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH or b"\n" in data[:V1_MAX_LENGTH]:
            raise ProxyProtocolError("v1 header is not terminated by CRLF within 107 bytes")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProxyProtocolError("v1 header is not ASCII") from exc
    parts = line.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyProtocolError("v1 header must start with 'PROXY '")
    proto = parts[1]
    if proto == "UNKNOWN":
        return ProxyHeader(1, "local", "unknown", None, None, end + 2)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 protocol {proto!r} is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 6:
        raise ProxyProtocolError("v1 header needs source, destination and both ports")
    kind = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    src = _v1_address(kind, parts[2])
    dst = _v1_address(kind, parts[3])
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    return ProxyHeader(1, "proxy", proto.lower(), (src, sport), (dst, dport), end + 2)


def _v1_address(kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address], text: str) -> str:
    try:
        return str(kind(text))
    except ValueError as exc:
        raise ProxyProtocolError(f"v1 address {text!r} is not a valid {kind.__name__}") from exc


def _v1_port(text: str) -> int:
    leading_zero = len(text) > 1 and text[0] == "0"
    if not text.isdigit() or not text.isascii() or len(text) > 5 or leading_zero:
        raise ProxyProtocolError(f"v1 port {text!r} is not a decimal port number")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 port {port} is out of range")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_HEADER_LENGTH:
        return None
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header has version {ver_cmd >> 4}, not 2")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyProtocolError(f"v2 command {command} is neither LOCAL nor PROXY")
    if length > V2_MAX_LENGTH:
        raise ProxyProtocolError(f"v2 header announces {length} bytes (limit {V2_MAX_LENGTH})")
    total = V2_HEADER_LENGTH + length
    if len(data) < total:
        return None
    body = data[V2_HEADER_LENGTH:total]
    family, transport = fam >> 4, fam & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (health check); body ignored
        return ProxyHeader(2, "local", "unknown", None, None, total)
    if family == 0:  # UNSPEC with PROXY: addresses unknown, keep the real ones
        return ProxyHeader(2, "local", "unknown", None, None, total)
    if transport != 1:
        raise ProxyProtocolError("v2 header is not for a stream (TCP) connection")
    if family == 1:
        need, name, size = 12, "tcp4", 4
    elif family == 2:
        need, name, size = 36, "tcp6", 16
    else:
        raise ProxyProtocolError(f"v2 address family {family} is not IPv4 or IPv6")
    if length < need:
        raise ProxyProtocolError(f"v2 {name} address block is {length} bytes, needs {need}")
    src = str(ipaddress.ip_address(body[:size]))
    dst = str(ipaddress.ip_address(body[size : 2 * size]))
    sport, dport = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    tlvs = _parse_tlvs(body[need:])
    return ProxyHeader(2, "proxy", name, (src, sport), (dst, dport), total, tlvs)


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyProtocolError("v2 TLV is truncated")
        kind, size = data[i], int.from_bytes(data[i + 1 : i + 3], "big")
        if i + 3 + size > len(data):
            raise ProxyProtocolError("v2 TLV runs past the header")
        out.append((kind, data[i + 3 : i + 3 + size]))
        i += 3 + size
    return tuple(out)


def build_v1(source: Address, destination: Address) -> bytes:
    """A v1 header (for tests and tools)."""
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def build_v2(
    source: Address | None, destination: Address | None = None, *, tlvs: bytes = b""
) -> bytes:
    """A v2 header; ``source=None`` gives a LOCAL header."""
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    destination = destination or (("::" if ":" in source[0] else "0.0.0.0"), 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version == 6 and dst.version == 4:
        dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    elif src.version != dst.version:
        raise ValueError("an IPv4 source needs an IPv4 destination")
    fam = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body


def is_trusted(address: str | None, networks: Sequence[Network]) -> bool:
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


# --- the listener ----------------------------------------------------------------------------

ConnFactory = Callable[[str, int], Any]
Outcome = Callable[[str], None]  # called with "proxied" | "direct" | a refusal reason
# Called with the peer address of a new direct TCP connection; a reason code refuses it before
# any SSH object exists (admission's cheap checks: a penalized or full source).
Gate = Callable[[str | None], str | None]


@dataclass(slots=True)
class ProxySettings:
    mode: str = "off"  # off | optional | required
    trusted: tuple[Network, ...] = ()
    header_timeout_seconds: float = 5.0


class Listener:
    """The ``tunnel=`` object for ``asyncssh.listen``: owns how the SSH listener is created."""

    def __init__(
        self,
        settings: ProxySettings,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        backlog: int = 1024,
        on_outcome: Outcome | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.settings = settings  # replaced on reload; read per connection
        self._gate = gate
        self._sock = sock
        self._reuse_port = reuse_port
        self._backlog = backlog
        self._on_outcome = on_outcome or (lambda _outcome: None)
        self.server: asyncio.Server | None = None

    async def create_server(
        self, conn_factory: ConnFactory, host: str, port: int
    ) -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.BaseProtocol:
            if self.settings.mode == "off":
                if self._gate is not None:
                    return _Gate(self._gate, conn_factory)
                protocol: asyncio.BaseProtocol = conn_factory("", 0)
                return protocol
            return _HeaderReader(self.settings, conn_factory, self._on_outcome)

        if self._sock is not None:
            self.server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)
        else:
            self.server = await loop.create_server(
                factory,
                host or None,
                port,
                backlog=self._backlog,
                reuse_address=True,
                reuse_port=self._reuse_port or None,
            )
        return self.server


class _Gate(asyncio.Protocol):
    """Refuses a connection from a source admission would refuse anyway, before asyncssh builds
    a connection for it (a flood of refused connections then costs an accept and a close);
    anyone else is handed to asyncssh's protocol, which then gets the transport directly."""

    def __init__(self, gate: Gate, conn_factory: ConnFactory) -> None:
        self._gate = gate
        self._conn_factory = conn_factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if self._gate(str(peer[0]) if peer else None) is not None:
            cast(asyncio.Transport, transport).abort()
            return
        protocol: asyncio.Protocol = self._conn_factory("", 0)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # only reached for refused connections: the handed-over ones left this protocol


class _ProxiedTransport:
    """The real transport, except that peername/sockname are what the header claimed."""

    def __init__(self, transport: asyncio.Transport, peer: Address, local: Address | None) -> None:
        self._transport = transport
        self._extra = {"peername": peer}
        if local is not None:
            self._extra["sockname"] = local
        # The hot path goes straight to the real transport, without __getattr__.
        self.write = transport.write
        self.writelines = transport.writelines

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeaderReader(asyncio.Protocol):
    """Reads (or refuses) the PROXY header, then gets out of the way."""

    def __init__(
        self, settings: ProxySettings, conn_factory: ConnFactory, outcome: Outcome
    ) -> None:
        self._settings = settings
        self._conn_factory = conn_factory
        self._outcome = outcome
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._timer: asyncio.TimerHandle | None = None
        self._peer: Address | None = None
        self._trusted = False
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = (str(peer[0]), int(peer[1])) if peer else None
        self._trusted = is_trusted(self._peer[0] if self._peer else None, self._settings.trusted)
        if self._settings.mode == "required" and not self._trusted:
            self._refuse("proxy_untrusted_source")
            return
        self._timer = asyncio.get_running_loop().call_later(
            self._settings.header_timeout_seconds, self._timed_out
        )

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        if not could_be_header(self._buf):
            if self._settings.mode == "required":
                self._refuse("proxy_header_missing")
            else:
                self._hand_over(None, self._buf)
            return
        if not self._trusted:
            self._refuse("proxy_header_untrusted")
            return
        try:
            header = parse(self._buf)
        except ProxyProtocolError as exc:
            self._refuse("proxy_header_invalid", str(exc))
            return
        if header is not None:
            self._hand_over(header, self._buf[header.length :])

    def eof_received(self) -> bool:
        if not self._done:
            self._refuse("proxy_header_missing", "EOF before a header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._done = True

    def _timed_out(self) -> None:
        self._timer = None
        if self._done:
            return
        if self._settings.mode == "optional" and not self._buf:
            # Nothing at all yet: a client waiting for our version string. Serve it directly.
            self._hand_over(None, b"")
        else:
            self._refuse("proxy_header_timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, reason: str, error: str | None = None) -> None:
        self._done = True
        self._cancel_timer()
        log.warning(
            "proxy_refused", reason=reason, peer=self._peer[0] if self._peer else None, error=error
        )
        self._outcome(reason)
        if self._transport is not None:
            self._transport.abort()

    def _hand_over(self, header: ProxyHeader | None, rest: bytes) -> None:
        self._done = True
        self._cancel_timer()
        transport = self._transport
        assert transport is not None and self._peer is not None
        if header is not None and header.source is not None:
            wrapped: Any = _ProxiedTransport(transport, header.source, header.destination)
            self._outcome("proxied")
        else:
            wrapped = transport
            self._outcome("direct")
        conn = self._conn_factory("", 0)
        transport.set_protocol(conn)
        conn.connection_made(wrapped)
        if rest:
            conn.data_received(rest)
