"""The small, documented layer where the gateway corrects asyncssh 2.24.

1. SHA-1 RSA user signatures. asyncssh verifies a user's RSA signature with any of
   ``RSAKey.all_sig_algorithms``, ``ssh-rsa`` (SHA-1) included, whatever ``signature_algs``
   says (that option only covers host keys and the advertised server-sig-algs). We refuse a
   signature whose algorithm name is ``ssh-rsa`` before asyncssh verifies it, as OpenSSH 8.8+
   does. Upstream-worthy: make user-signature verification honour ``signature_algs``.

2. One transport write per event-loop turn. asyncssh calls ``transport.write()`` once per SSH
   packet (twice, with the empty MSG_IGNORE it puts before each one), i.e. one ``send()``
   syscall per 32 KiB of relayed data. ``SSHConnection._send`` now appends to a per-connection
   list that a ``loop.call_soon`` callback joins and writes once; ``_force_close`` (every
   close, abort and disconnect path ends there) flushes first, so a DISCONNECT is never lost.
   Order is kept: everything goes through ``_send``. Upstream-worthy.

3. Receive buffer read offset. asyncssh consumes its receive buffer with
   ``self._inpbuf = self._inpbuf[n:]`` for each packet header and body, copying the whole rest
   of a (up to 256 KiB) read per 32 KiB packet. ``_recv_pkthdr``/``_recv_packet`` now see a
   buffer holding exactly the bytes they consume, cut at a read offset; ``data_received`` drops
   the consumed prefix once per read. Upstream-worthy (keep an offset, or a bytearray).

4. No empty MSG_IGNORE before every packet unless the cipher is CBC. asyncssh sends an empty
   SSH_MSG_IGNORE ahead of every post-kex packet (the CBC-era countermeasure against
   predictable IVs), doubling the packets encrypted and sent. With the ciphers the gateway
   allows (AES-GCM, chacha20-poly1305, AES-CTR + EtM MACs) it protects nothing; RFC 4253 makes
   sending them optional. The IGNORE is still sent when either direction negotiated a CBC
   cipher. Upstream-worthy: do it only for CBC.

5. Window credit only for data actually delivered. When a paused channel resumes, asyncssh
   delivers its first buffered packet and grants the peer a *full* new window, although most
   of the old window is still sitting undelivered in the channel's receive buffer; every
   pause/resume cycle can add another window (7-16 MB seen per channel against a 2 MiB
   window, several hundred MB for 20 uploads into slow readers). ``_deliver_data`` now counts
   bytes still buffered as not yet consumed, so a channel never holds more than one window of
   received data. Upstream-worthy.

``apply()`` is idempotent and is called by ``gateway.ssh.server`` at import. 2-4 patch
``SSHConnection`` itself, so both legs (client-facing and upstream) get them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh.channel
import asyncssh.connection
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import SSHPacket, String

from gateway.ssh.algorithms import SHA1_SIGNATURES

_APPLIED = False


def signature_algorithm(signature: bytes) -> bytes | None:
    """The algorithm name at the front of an SSH signature blob, or None if malformed."""
    try:
        return SSHPacket(signature).get_string()
    except Exception:  # asyncssh raises PacketDecodeError; any garbage means "no name"
        return None


_EMPTY_IGNORE = String(b"")


def _flush(conn: Any) -> None:
    """Write everything ``_send`` queued for ``conn`` in this event-loop turn, in one call."""
    pending: list[bytes] | None = conn._rtgw_pending
    conn._rtgw_pending = None
    transport = conn._transport
    if not pending or transport is None:
        return
    try:
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
    except ConnectionError:  # pragma: no cover - same as asyncssh's own _send
        pass


def _patch_coalesced_writes(cls: Any) -> None:
    cls._rtgw_pending = None  # class default: no instance needs __init__ changes
    original_force_close = cls._force_close

    def _send(self: Any, data: bytes) -> None:
        if not self._transport:
            return
        pending = self._rtgw_pending
        if pending is None:
            self._rtgw_pending = [data]
            loop: asyncio.AbstractEventLoop = self._loop
            loop.call_soon(_flush, self)
        else:
            pending.append(data)

    def _force_close(self: Any, exc: Exception | None) -> None:
        _flush(self)
        original_force_close(self, exc)

    cls._send = _send
    cls._force_close = _force_close
    cls.rtgw_flush = _flush


def _patch_read_offset(cls: Any) -> None:
    cls._rtgw_pos = 0
    original_pkthdr = cls._recv_pkthdr
    original_packet = cls._recv_packet
    original_data_received = cls.data_received

    def _consume(self: Any, handler: Any, size: int) -> bool:
        # Hand the original handler a buffer of exactly the bytes it consumes; it then sets
        # _inpbuf to the (empty) rest. Put the real buffer back and advance the offset, unless
        # the connection was torn down meanwhile (its cleanup empties the buffer).
        buf: bytes = self._inpbuf
        pos: int = self._rtgw_pos
        self._inpbuf = buf[pos : pos + size]
        self._rtgw_pos = 0
        try:
            return bool(handler(self))
        finally:
            if self._transport is not None:
                self._inpbuf = buf
                self._rtgw_pos = pos + size

    def _recv_pkthdr(self: Any) -> bool:
        size = self._recv_blocksize
        if len(self._inpbuf) - self._rtgw_pos < size:
            return False
        return _consume(self, original_pkthdr, size)

    def _recv_packet(self: Any) -> bool:
        size = 4 + self._pktlen + self._recv_macsize - self._recv_blocksize
        if len(self._inpbuf) - self._rtgw_pos < size:
            return False
        return _consume(self, original_packet, size)

    def data_received(self: Any, data: bytes, datatype: Any = None) -> None:
        pos = self._rtgw_pos
        if pos:
            self._inpbuf = self._inpbuf[pos:]
            self._rtgw_pos = 0
        original_data_received(self, data, datatype)
        if self._rtgw_pos and self._rtgw_pos >= len(self._inpbuf):
            self._inpbuf = b""  # everything consumed: keep no read buffer while idle
            self._rtgw_pos = 0

    cls._recv_pkthdr = _recv_pkthdr
    cls._recv_packet = _recv_packet
    cls.data_received = data_received


def _uses_cbc(conn: Any) -> bool:
    return b"-cbc" in conn._enc_alg_cs or b"-cbc" in conn._enc_alg_sc


def _patch_no_ignore_padding(cls: Any) -> None:
    original_send_packet = cls.send_packet

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (
            pkttype == MSG_IGNORE
            and args == (_EMPTY_IGNORE,)
            and self._send_encryption
            and not _uses_cbc(self)
        ):
            return
        original_send_packet(self, pkttype, *args, handler=handler)

    cls.send_packet = send_packet


def _patch_window_credit(cls: Any) -> None:
    original_deliver = cls._deliver_data

    def _deliver_data(self: Any, data: bytes, datatype: Any) -> None:
        recv_buf = self._recv_buf
        if not recv_buf:  # the common case: nothing buffered, asyncssh's arithmetic is right
            original_deliver(self, data, datatype)
            return
        buffered = sum(len(item[0]) for item in recv_buf)
        # Hide the still-buffered bytes from asyncssh's window check: it then grants only
        # what was delivered (init - window - buffered) once that reaches half a window.
        self._recv_window += buffered
        try:
            original_deliver(self, data, datatype)
        finally:
            self._recv_window -= buffered

    cls._deliver_data = _deliver_data


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    base: Any = asyncssh.connection.SSHConnection
    _patch_coalesced_writes(base)
    _patch_read_offset(base)
    _patch_no_ignore_padding(base)
    _patch_window_credit(asyncssh.channel.SSHChannel)
    cls: Any = asyncssh.connection.SSHServerConnection
    original = cls.validate_public_key

    async def validate_public_key(
        self: Any, username: str, key_data: bytes, msg: bytes, signature: bytes
    ) -> bool:
        if msg and signature_algorithm(signature) in SHA1_SIGNATURES:
            return False
        return bool(await original(self, username, key_data, msg, signature))

    cls.validate_public_key = validate_public_key
