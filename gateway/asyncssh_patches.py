"""The small, documented layer where the gateway corrects asyncssh 2.24.

Applying it
-----------
Nothing here changes asyncssh when this module is imported. ``apply()`` installs every patch,
once per process, and is called explicitly where a process that speaks SSH starts: the
``serve`` and ``demo`` commands in ``gateway/cli.py`` (worker processes run ``serve`` too).
Tests that drive patched connections in-process call it from a fixture. ``apply()`` is
idempotent. All but the SHA-1 patch change ``SSHConnection`` or ``SSHChannel`` themselves, so
both legs (client-facing and upstream) get them.

Before patching, ``apply()`` compares ``asyncssh.__version__`` with ``VERIFIED_ON``, the release
these patches were read against and tested on (``check_version`` is the pure rule): another
major.minor raises ``IncompatibleLibrary`` and nothing is patched, since the private methods
wrapped here may have changed; another patch level is applied with a warning in the log.

Every patch is a ``Patch`` in ``PATCHES``: a name, the upstream behaviour it corrects, the class
it changes and asyncssh's own functions, captured when this module is imported. The canary tests
(tests/unit/test_asyncssh_patches.py) drive unpatched asyncssh over loopback in a fresh process
where ``apply()`` never ran (or, for the read offset, read the original functions' source) and
fail once upstream no longer behaves the way a patch assumes: the patch has become unnecessary
(upstream fixed it) or wrong (upstream changed the code it wraps).

The patches
-----------
``refuse-sha1-user-signatures``: asyncssh verifies a user's RSA signature with any of
``RSAKey.all_sig_algorithms``, ``ssh-rsa`` (SHA-1) included, whatever ``signature_algs`` says
(that option only covers host keys and the advertised server-sig-algs). We refuse a signature
whose algorithm name is ``ssh-rsa`` before asyncssh verifies it, as OpenSSH 8.8+ does.
Upstream-worthy: make user-signature verification honour ``signature_algs``.

``coalesce-transport-writes``: asyncssh calls ``transport.write()`` once per SSH packet (twice,
with the empty MSG_IGNORE it puts before each one), i.e. one ``send()`` syscall per 32 KiB of
relayed data. ``SSHConnection._send`` now appends to a per-connection list that a
``loop.call_soon`` callback joins and writes once; ``_force_close`` (every close, abort and
disconnect path ends there) flushes first, so a DISCONNECT is never lost. Order is kept:
everything goes through ``_send``. Bytes queued here are not yet in the transport's buffer, so
the transport's high-water check (and ``pause-writing-reaches-channels``) cannot see them: once
``FLUSH_AT`` bytes are queued they are written at once, which bounds what one turn can add
unseen. A read callback of a connection also writes out what it queued before it returns
(``_flush_queued``, see ``bounded-work-per-read``). Upstream-worthy.

``receive-buffer-read-offset``: asyncssh consumes its receive buffer with
``self._inpbuf = self._inpbuf[n:]`` for each packet header and body, copying the whole rest of a
(up to 256 KiB) read per 32 KiB packet. ``_recv_pkthdr``/``_recv_packet`` now see a buffer
holding exactly the bytes they consume, cut at a read offset; ``data_received`` drops the
consumed prefix once per read. Upstream-worthy (keep an offset, or a bytearray).

``bounded-work-per-read``: asyncssh's ``data_received`` processes every complete packet of a
read in the callback that read it: up to 256 KiB (asyncio's read size), about 8 full data
packets, each decrypted, relayed, re-encrypted and sent before the event loop looks at any
other socket. Beside a bulk upload, an interactive connection's keystroke so waited behind
whole reads of its neighbour, on every hop (issue 14: interactive echo p99 +25..31 ms over
direct). Now a connection's packets are processed in batches of ``READ_BUDGET`` (64 KiB: two
full data packets; a packet counts as at least ``MIN_PACKET_COST``, so at most 32 small ones).
The check sits in the read-offset patch's ``_recv_pkthdr``, before a packet is started, so a
packet is never split. After each batch the connection peeks at the loop (``_others_waiting``:
a zero-timeout ``select`` on the loop's selector, which epoll, level-triggered, reports again
to the loop; sockets that are only writable are left out) and at the other connections'
backlogs. Nobody else waiting: the next batch follows at once, so a lone bulk transfer costs
what it did (no extra turn, no pause). Someone waiting: the rest stays in the receive buffer,
in order, and a ``loop.call_soon`` callback (``_next_turn``) goes on with it, one batch per
event-loop turn, so other connections' callbacks and timers run in between; until that
backlog is done, reading the peer is paused (asyncio transports only: ``is_reading``), so it
cannot grow. Reading is resumed only when neither this backlog nor
``pause-writing-reaches-channels`` (its ``_rtgw_reading_held``) holds it: whichever ends last
resumes it. A connection closed meanwhile drops its backlog as asyncssh drops its buffer
(``_transport`` is None: nothing more runs); an EOF (asyncssh closes the connection on it)
first processes the whole backlog, as asyncssh would have in the callbacks that received it. A
packet with an asynchronous handler (key exchange, auth) still holds the connection's later
packets until its task ends, as in asyncssh, which then goes on through ``_recv_data``, i.e.
with a fresh budget. At the end of each read callback, whatever it queued on any connection
(coalesce-transport-writes) is written at once instead of a turn later, after the neighbour's
next batch; ``FLUSH_AT`` is unchanged. The peek reads ``loop._selector``, an asyncio internal:
a loop without one (not a selector loop) is always treated as busy, i.e. batches always yield.
Cost (bench/README.md, "Scheduling: bounded work per read"): a relay's other leg has something
to read every few packets (window adjusts), so bulk transfers do yield, ~5-15 % of their
throughput and CPU; interactive echo p99 beside bulk went from +6.4 to +1.8..2.4 ms over
direct. Upstream-worthy (bound the packets per ``data_received``; asyncssh owns the loop).

``ignore-padding-only-for-cbc``: asyncssh sends an empty SSH_MSG_IGNORE ahead of every post-kex
packet (the CBC-era countermeasure against predictable IVs), doubling the packets encrypted and
sent. With the ciphers the gateway allows (AES-GCM, chacha20-poly1305, AES-CTR + EtM MACs) it
protects nothing; RFC 4253 makes sending them optional. The IGNORE is still sent when either
direction negotiated a CBC cipher. Upstream-worthy: do it only for CBC.

``pause-writing-reaches-channels`` and ``channel-output-waits-for-transport`` (one change in
two classes): asyncssh's ``SSHConnection.pause_writing``/``resume_writing``, the callbacks
asyncio makes when a transport's write buffer passes its high-water mark and drains again, do
nothing ("Do nothing with this for now"), and ``SSHChannel._flush_send_buf`` sends whatever the
peer's window allows. A peer that advertises a 2 GiB window and stops reading its socket so gets
everything a channel is given queued in the transport: a relay of ``cat /dev/zero`` grew the
gateway by 1.7 GiB in 8 s. Now ``pause_writing`` marks the connection paused and, while it is,
``_flush_send_buf`` runs with a send window of zero: output stays in the channel's own send
buffer, which past its high-water mark calls the session's ``pause_writing`` through asyncssh's
own path (the relay then stops reading the other leg, whose SSH window pushes back on the
sender), and a pending EOF or CLOSE still goes out once that buffer is empty.
``resume_writing`` flushes the connection's channels again (starting with a different one each
time, so none starves), until the transport is full again; asyncssh's own low-water check then
resumes their sessions. A peer that stops reading can still make us answer (global and channel
requests); once the paused transport holds more than ``READ_PAUSE_AT`` (1 MiB, far above what
channel output can reach now) we stop reading that peer until ``resume_writing``.
Upstream-worthy.

``window-credit-for-delivered-data``: when a paused channel resumes, asyncssh delivers its first
buffered packet and grants the peer a *full* new window, although most of the old window is
still sitting undelivered in the channel's receive buffer; every pause/resume cycle can add
another window (7-16 MB seen per channel against a 2 MiB window, several hundred MB for 20
uploads into slow readers). ``_deliver_data`` now counts bytes still buffered as not yet
consumed, so a channel never holds more than one window of received data. Upstream-worthy.

``certificate-decision-by-owner``: asyncssh decides a client certificate itself, asking the
owner only ``validate_ca_key(username, ca_key)``: the owner never sees the certificate's
principals, key id or serial (so an organization's extra principals and its revoked key ids and
serials cannot be checked), and ``SSHOpenSSHCertificate.validate`` skips the principal check
when the certificate has none, accepting it for any user. When the owner defines
``validate_certificate(username, cert)`` (gateway/ssh/server.py), that decides instead
(gateway/ssh/auth.py ``decide_certificate``: validity, principals, revocation); the rest of
asyncssh's path is kept: source-address enforced, the certificate's options kept, so that
force-command and the permit-pty / port / agent forwarding extensions are still applied by
asyncssh. This one replaces the method's body for such owners rather than wrapping it: the
canary reads the original's source so a change there is noticed. Upstream-worthy: hand the
certificate to the owner.

``guessed-kex-per-rfc4253``: a client may guess the kex and send its first kex packet right
after KEXINIT (``first_kex_packet_follows``; Dropbear's dbclient does). RFC 4253 7.1: the guess
is wrong, and that packet must be ignored, when the preferred (first) kex or host-key algorithms
of the two sides differ. asyncssh only checks that the negotiated kex is the peer's first, so it
answered Dropbear's guess while Dropbear, seeing our different preference, sent the packet
again: "Key exchange not in progress". ``_process_kexinit`` now sets ``_ignore_first_kex`` by
the RFC's rule, from both KEXINIT payloads. Upstream-worthy (report to ronf/asyncssh).

``gcm-cipher-object-reuse``: ``GCMCipher.encrypt_and_sign`` and ``verify_and_decrypt`` build a
new ``AESGCM(key)`` for every packet, although the key is the cipher's for its whole life (a
rekey makes new cipher objects). The object is now made once, in ``__init__``: 14 against 20
µs to encrypt a 32 KiB packet, 10 against 18 µs to decrypt one, ~1.5 µs less per small packet
(bench/README.md). The IV bookkeeping is asyncssh's own (``_update_iv``). Upstream-worthy.

``chacha-one-keystream-per-packet``: for chacha20-poly1305@openssh.com, the cipher OpenSSH's
ssh asks for first, asyncssh makes three ChaCha20 contexts per packet on the main key's side
(the Poly1305 key from block 0, the payload from block 1, each from a new context) and
concatenates header and payload for Poly1305. One keystream context now gives the Poly1305
key and then the payload (block 0, then block 1 onwards: the same bytes), and Poly1305 is fed
header and payload in turn: 32 KiB 65-83 -> 58-64 µs to seal, 58-74 -> 50-58 to open. The
output is byte for byte asyncssh's (a test compares both). Upstream-worthy.

Why a layer and not a fork
--------------------------
Decision: keep this layer of named patches on the PyPI release, pinned ``asyncssh>=2.24.1,<2.25``
in pyproject.toml; do not fork. Reasons:

- Installation. CI and production install from package registries only; a git URL is not
  reachable. A fork would have to be published to PyPI under another name (and kept there) or
  vendored into this repository, i.e. a second project to release, and a copy of asyncssh's
  EPL-2.0 code to carry. The layer costs one module.
- Security fixes. asyncssh's recent fixes (Terrapin strict kex, the message-injection CVEs, SCP
  path traversal, the 2.24.1 zero-packet-size loop) arrived as patch releases. With the pin they
  reach us through an ordinary upgrade; a fork gets them only when someone merges them.
- Knowing when to act. ``VERIFIED_ON`` stops the gateway from running the patches on an
  unverified minor release, and the canaries say, patch by patch, whether upstream still
  behaves as assumed. A fork diverges silently; rebasing it tells you nothing per change.
- Upstreaming. Each patch is small, named and upstream-worthy (ronf/asyncssh); once upstream
  takes a fix, its canary fails on that release and the patch is deleted. The aim is for this
  module to shrink, not grow.

Coming work fits the layer. Agent forwarding on per-user upstream connections is public API:
the listener's ``agent_forwarding=True`` and ``SSHServerConnection.get_agent_path()``, handed to
the upstream ``asyncssh.connect(agent_path=..., agent_forwarding=True)``; the hard part,
per-user rather than shared upstream connections, is ours, not asyncssh's.

Revisit the decision if a patch has to *replace* an upstream method's body instead of wrapping
it, or if a minor release breaks several patches at once: then a fork published to PyPI (still
pinned, still with these canaries run against upstream) becomes the cheaper way to carry it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import selectors
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

import asyncssh
import asyncssh.channel
import asyncssh.connection
import asyncssh.crypto.chacha
import asyncssh.crypto.cipher
import structlog
from asyncssh.constants import MSG_IGNORE, MSG_KEXINIT
from asyncssh.packet import SSHPacket, String
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

from gateway.errors import IncompatibleLibrary
from gateway.ssh.algorithms import SHA1_SIGNATURES

# The asyncssh release these patches were read against and tested on. Raise it only after the
# canaries and the patched-behaviour tests pass on the new release (and re-read each patch).
VERIFIED_ON = "2.24.1"

_log = structlog.get_logger("gateway.asyncssh_patches")
_APPLIED = False


@dataclass(frozen=True)
class Patch:
    """One named change to asyncssh and the upstream behaviour it corrects."""

    name: str
    upstream: str  # what asyncssh VERIFIED_ON does, that the patch corrects
    target: type
    originals: Mapping[str, Any]  # attribute name -> asyncssh's own function (None: missing)
    install: Callable[[Patch], None]

    def original(self, attr: str) -> Any:
        """asyncssh's own function for ``attr``, whether or not ``apply()`` ran."""
        return self.originals[attr]

    def installed(self) -> bool:
        """True when ``target`` no longer holds asyncssh's own functions."""
        return any(getattr(self.target, attr, None) is not f for attr, f in self.originals.items())


class _Version:
    """major, minor and the rest of a version string such as ``2.24.1`` or ``2.25.0rc1``."""

    _PATTERN = re.compile(r"(\d+)\.(\d+)(?:\.(.+))?")

    def __init__(self, text: str) -> None:
        match = self._PATTERN.fullmatch(text.strip())
        self.parsed = match is not None
        self.series = (int(match[1]), int(match[2])) if match else (0, 0)
        self.rest = (match[3] or "0") if match else ""


def check_version(found: str, verified: str = VERIFIED_ON) -> str | None:
    """The rule ``apply()`` enforces, for asyncssh version ``found``.

    Same version: None. Same major.minor, another patch level: a warning to log (the patches
    are applied). Another major.minor, or a version we cannot read: ``IncompatibleLibrary``.
    """
    have, want = _Version(found), _Version(verified)
    if not have.parsed or have.series != want.series:
        raise IncompatibleLibrary(
            "asyncssh",
            found,
            verified,
            f"gateway/asyncssh_patches.py changes asyncssh internals, so it refuses another "
            f"major.minor release. Install "
            f'"asyncssh>={verified},<{want.series[0]}.{want.series[1] + 1}" (the pin in '
            f"pyproject.toml), or port the patches: run tests/unit/test_asyncssh_patches.py "
            f"against asyncssh {found}, fix or drop what its canaries report, then raise "
            f"VERIFIED_ON",
        )
    if have.rest != want.rest:
        return (
            f"asyncssh {found} is installed; the gateway's asyncssh patches were verified on "
            f"{verified}. Same {want.series[0]}.{want.series[1]} series, so they are applied; "
            f"run tests/unit/test_asyncssh_patches.py against {found} and raise VERIFIED_ON"
        )
    return None


def applied() -> bool:
    """Whether ``apply()`` has patched asyncssh in this process."""
    return _APPLIED


def apply() -> None:
    """Check asyncssh's version, then install every patch in ``PATCHES``; once per process.

    Raises ``IncompatibleLibrary`` (and patches nothing) for an unverified major.minor release
    or when a function a patch wraps is missing.
    """
    global _APPLIED
    if _APPLIED:
        return
    found = asyncssh.__version__
    warning = check_version(found)
    missing = [
        f"{p.target.__name__}.{attr} (patch {p.name})"
        for p in PATCHES
        for attr, original in p.originals.items()
        if original is None
    ]
    if missing:
        raise IncompatibleLibrary(
            "asyncssh",
            found,
            VERIFIED_ON,
            f"it lacks {', '.join(missing)}, which gateway/asyncssh_patches.py wraps; "
            f"reinstall asyncssh {VERIFIED_ON} or port the patches",
        )
    if warning:
        _log.warning(
            "asyncssh_version_not_verified", found=found, verified=VERIFIED_ON, detail=warning
        )
    for patch in PATCHES:
        patch.install(patch)
    _APPLIED = True


def signature_algorithm(signature: bytes) -> bytes | None:
    """The algorithm name at the front of an SSH signature blob, or None if malformed."""
    try:
        return SSHPacket(signature).get_string()
    except Exception:  # asyncssh raises PacketDecodeError; any garbage means "no name"
        return None


def _originals(cls: type, *attrs: str) -> dict[str, Any]:
    return {attr: getattr(cls, attr, None) for attr in attrs}


# --- refuse-sha1-user-signatures ------------------------------------------------------------


def _install_refuse_sha1(patch: Patch) -> None:
    original = patch.original("validate_public_key")

    async def validate_public_key(
        self: Any, username: str, key_data: bytes, msg: bytes, signature: bytes
    ) -> bool:
        if msg and signature_algorithm(signature) in SHA1_SIGNATURES:
            return False
        return bool(await original(self, username, key_data, msg, signature))

    cls: Any = patch.target
    cls.validate_public_key = validate_public_key


# Class defaults, for every connection whichever patches are installed (``_flush``, the read
# path and ``resume_writing`` read them): write pause, reading held by it, read offset, this
# batch's read budget (unbounded unless bounded-work-per-read sets one), and that patch's state.
_CONN_DEFAULTS: dict[str, Any] = {
    "_rtgw_write_paused": False,
    "_rtgw_reading_held": False,
    "_rtgw_pos": 0,
    "_rtgw_budget": math.inf,
    "_rtgw_over_budget": False,
    "_rtgw_yielded": False,
    "_rtgw_turn_scheduled": False,
}


def _set_defaults(cls: Any) -> None:
    for attr, value in _CONN_DEFAULTS.items():
        setattr(cls, attr, value)


# --- coalesce-transport-writes --------------------------------------------------------------


# Queued bytes are written at once when they reach this much, so that the transport's
# high-water check sees them within the turn (see pause-writing-reaches-channels).
FLUSH_AT = 256 * 1024


# Connections with queued bytes, in the order they queued them: bounded-work-per-read (once
# installed: ``_FLUSH_AFTER_READS``) flushes them at the end of each read callback, so that
# what it relays goes out in that callback, not in the loop's next turn (``_flush`` via
# call_soon, which then finds nothing).
_QUEUED: list[Any] = []
_FLUSH_AFTER_READS = False


def _flush_queued(loop: Any) -> None:
    """Flush every connection of ``loop`` with queued bytes (see ``_QUEUED``)."""
    if not _QUEUED:
        return
    queued = _QUEUED[:]
    _QUEUED.clear()
    for conn in queued:
        if conn._loop is loop:
            _flush(conn)  # the call_soon'd flush then finds nothing


def _flush(conn: Any) -> None:
    """Write everything ``_send`` queued for ``conn`` in this event-loop turn, in one call."""
    pending: list[bytes] | None = conn._rtgw_pending
    conn._rtgw_pending = None
    conn._rtgw_pending_size = 0
    transport = conn._transport
    if not pending or transport is None:
        return
    try:
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
    except ConnectionError:  # pragma: no cover - same as asyncssh's own _send
        pass
    if conn._rtgw_write_paused and not conn._rtgw_reading_held:
        _hold_reading_if_flooded(conn, transport)


def _install_coalesced_writes(patch: Patch) -> None:
    cls: Any = patch.target
    original_force_close = patch.original("_force_close")
    cls._rtgw_pending = None  # class defaults: no instance needs __init__ changes
    cls._rtgw_pending_size = 0
    _set_defaults(cls)

    def _send(self: Any, data: bytes) -> None:
        if not self._transport:
            return
        pending = self._rtgw_pending
        if pending is None:
            self._rtgw_pending = [data]
            self._rtgw_pending_size = len(data)
            loop: asyncio.AbstractEventLoop = self._loop
            loop.call_soon(_flush, self)
            if _FLUSH_AFTER_READS:
                _QUEUED.append(self)
        else:
            pending.append(data)
            self._rtgw_pending_size += len(data)
            if self._rtgw_pending_size >= FLUSH_AT:
                _flush(self)  # the callback already scheduled then finds nothing (or less)

    def _force_close(self: Any, exc: Exception | None) -> None:
        _flush(self)
        original_force_close(self, exc)

    cls._send = _send
    cls._force_close = _force_close
    cls.rtgw_flush = _flush


# --- receive-buffer-read-offset -------------------------------------------------------------


def _release_consumed(conn: Any) -> None:
    """Everything received has been consumed: keep no read buffer while idle."""
    if conn._rtgw_pos and conn._rtgw_pos >= len(conn._inpbuf):
        conn._inpbuf = b""
        conn._rtgw_pos = 0


def _install_read_offset(patch: Patch) -> None:
    cls: Any = patch.target
    original_pkthdr = patch.original("_recv_pkthdr")
    original_packet = patch.original("_recv_packet")
    original_data_received = patch.original("data_received")
    _set_defaults(cls)

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
        if self._rtgw_budget <= 0 and _over_budget(self):  # see bounded-work-per-read
            return False
        return _consume(self, original_pkthdr, size)

    def _recv_packet(self: Any) -> bool:
        size = 4 + self._pktlen + self._recv_macsize - self._recv_blocksize
        if len(self._inpbuf) - self._rtgw_pos < size:
            return False
        self._rtgw_budget -= max(size + self._recv_blocksize, MIN_PACKET_COST)
        return _consume(self, original_packet, size)

    def data_received(self: Any, data: bytes, datatype: Any = None) -> None:
        pos = self._rtgw_pos
        if pos:
            self._inpbuf = self._inpbuf[pos:]
            self._rtgw_pos = 0
        original_data_received(self, data, datatype)
        _release_consumed(self)

    cls._recv_pkthdr = _recv_pkthdr
    cls._recv_packet = _recv_packet
    cls.data_received = data_received


# --- bounded-work-per-read --------------------------------------------------------------------


# While other connections wait, at most this much of one connection's received data is
# processed per event-loop turn (two full 32 KiB data packets) ...
READ_BUDGET = 64 * 1024
# ... and at most READ_BUDGET // MIN_PACKET_COST packets: a smaller packet counts as this much.
MIN_PACKET_COST = 2 * 1024

# Connections with a backlog waiting for their next turn (``_next_turn`` scheduled).
_BACKLOGGED: weakref.WeakSet[Any] = weakref.WeakSet()


def _others_waiting(conn: Any) -> bool:
    """Whether anything else wants the loop: another connection's backlog, or a socket other
    than this connection's own with something to read (a peek: epoll is level-triggered, so
    the loop's own ``select`` sees the same events again; sockets that can be written to are
    left out: a transport's write buffer drains in the same turn anyway, and counting them
    makes a bulk relay, whose other leg is often writable, yield all the time). Not a
    selector loop: always yes."""
    if len(_BACKLOGGED) > (conn in _BACKLOGGED):
        return True
    selector = getattr(conn._loop, "_selector", None)
    if selector is None:
        return True
    try:
        ready = selector.select(0)
    except (OSError, ValueError):
        return True
    own = conn._rtgw_fd
    return any(events & selectors.EVENT_READ and key.fd != own for key, events in ready)


def _over_budget(conn: Any) -> bool:
    """This batch's budget is spent: stop here (the rest waits for a later turn) when others
    want the loop, else start a new batch at once."""
    if _others_waiting(conn):
        conn._rtgw_over_budget = True
        return True
    conn._rtgw_budget = READ_BUDGET
    return False


def _own_fd(transport: Any) -> int:
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (AttributeError, OSError, ValueError):
        return -1


def _yield_turn(conn: Any) -> None:
    """Over budget with received packets left and others waiting: go on in a later turn, and
    stop reading the peer until then so the backlog cannot grow."""
    transport = conn._transport
    if transport is None:
        return
    if not conn._rtgw_turn_scheduled:
        conn._rtgw_turn_scheduled = True
        _BACKLOGGED.add(conn)
        loop: asyncio.AbstractEventLoop = conn._loop
        loop.call_soon(_next_turn, conn)
    # Only asyncio transports: a transport without is_reading (an SSH channel tunnelling this
    # connection) delivers one packet per call, processed in order by data_received anyway.
    if not conn._rtgw_yielded and hasattr(transport, "is_reading"):
        conn._rtgw_yielded = True
        transport.pause_reading()


def _next_turn(conn: Any) -> None:
    """The next batch of the backlog; once it is done, read the peer again (unless
    pause-writing-reaches-channels holds reading: its resume_writing resumes it then)."""
    conn._rtgw_turn_scheduled = False
    _BACKLOGGED.discard(conn)
    if conn._transport is None:  # closed meanwhile: asyncssh's cleanup drops the buffer
        conn._rtgw_yielded = False
        return
    conn._recv_data()  # asyncssh's loop (with our budget), its error handling included
    if conn._rtgw_turn_scheduled:
        return  # still over budget: the turn after goes on
    _release_consumed(conn)
    if conn._rtgw_yielded:
        conn._rtgw_yielded = False
        transport = conn._transport
        if transport is not None and not conn._rtgw_reading_held:
            transport.resume_reading()


def _install_bounded_reads(patch: Patch) -> None:
    cls: Any = patch.target
    original_recv_data = patch.original("_recv_data")
    original_eof_received = patch.original("eof_received")
    global _FLUSH_AFTER_READS
    _set_defaults(cls)
    cls._rtgw_fd = None
    _FLUSH_AFTER_READS = True

    def _recv_data(self: Any) -> None:
        if self._rtgw_fd is None and self._transport is not None:
            self._rtgw_fd = _own_fd(self._transport)
        self._rtgw_budget = READ_BUDGET
        self._rtgw_over_budget = False
        original_recv_data(self)
        if self._rtgw_over_budget:
            self._rtgw_over_budget = False
            _yield_turn(self)
        _flush_queued(self._loop)  # what this callback relayed goes out now, not next turn

    def eof_received(self: Any) -> None:
        # What was received before the EOF is processed first, as asyncssh does in the
        # callback that receives it; then asyncssh closes the connection.
        if self._inpbuf and self._transport is not None:
            self._rtgw_budget = math.inf
            original_recv_data(self)
        original_eof_received(self)

    cls._recv_data = _recv_data
    cls.eof_received = eof_received


# --- ignore-padding-only-for-cbc ------------------------------------------------------------

_EMPTY_IGNORE = String(b"")


def _uses_cbc(conn: Any) -> bool:
    return b"-cbc" in conn._enc_alg_cs or b"-cbc" in conn._enc_alg_sc


def _install_no_ignore_padding(patch: Patch) -> None:
    original_send_packet = patch.original("send_packet")

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (
            pkttype == MSG_IGNORE
            and args == (_EMPTY_IGNORE,)
            and self._send_encryption
            and not _uses_cbc(self)
        ):
            return
        original_send_packet(self, pkttype, *args, handler=handler)

    cls: Any = patch.target
    cls.send_packet = send_packet


# --- window-credit-for-delivered-data -------------------------------------------------------


def _install_window_credit(patch: Patch) -> None:
    original_deliver = patch.original("_deliver_data")

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

    cls: Any = patch.target
    cls._deliver_data = _deliver_data


def _install_userauth_failure_hook(patch: Patch) -> None:
    original = patch.original("send_userauth_failure")

    def send_userauth_failure(self: Any, partial_success: bool) -> None:
        original(self, partial_success)
        hook = getattr(self._owner, "userauth_failed", None)
        if hook is not None:
            hook()

    cls: Any = patch.target
    cls.send_userauth_failure = send_userauth_failure


# --- certificate-decision-by-owner ----------------------------------------------------------


def _install_certificate_decision(patch: Patch) -> None:
    original = patch.original("_validate_openssh_certificate")

    async def _validate_openssh_certificate(self: Any, username: str, cert: Any) -> Any:
        decide = getattr(self._owner, "validate_certificate", None)
        if decide is None or self._authorized_client_keys:
            return await original(self, username, cert)
        result = decide(username, cert)
        if inspect.isawaitable(result):
            result = await result
        if not result:
            return None
        # What asyncssh's own path does after its checks: no authorized_keys options, the
        # certificate's source-address enforced, its options kept for force-command and the
        # permit-* extensions (pty, port and agent forwarding), touch requirement.
        self._key_options = {}
        allowed = cert.options.get("source-address")
        if allowed:
            address = ip_address(self._peer_addr)
            if not any(address in network for network in allowed):
                return None
        self._cert_options = cert.options
        cert.key.set_touch_required(not cert.options.get("no-touch-required", False))
        return cert.key

    cls: Any = patch.target
    cls._validate_openssh_certificate = _validate_openssh_certificate


# --- guessed-kex-per-rfc4253 -----------------------------------------------------------------


def kexinit_guess(payload: bytes) -> tuple[bytes, bytes, bool]:
    """A KEXINIT payload's preferred kex and host-key algorithms and first_kex_packet_follows."""
    packet = SSHPacket(payload)
    packet.get_byte()  # MSG_KEXINIT
    packet.get_bytes(16)  # cookie
    kex = packet.get_namelist()
    host_keys = packet.get_namelist()
    for _ in range(8):  # ciphers, MACs, compression (both ways), languages (both ways)
        packet.get_namelist()
    follows = packet.get_boolean()
    return (kex[0] if kex else b"", host_keys[0] if host_keys else b"", follows)


def guess_is_wrong(mine: bytes, peer: bytes) -> bool:
    """RFC 4253 7.1: the peer's guessed kex packet must be ignored when its preferred kex or
    host-key algorithm differs from ours (OpenSSH's ``proposals_match``, Dropbear's rule)."""
    my_kex, my_host_key, _ = kexinit_guess(mine)
    peer_kex, peer_host_key, follows = kexinit_guess(peer)
    return follows and (my_kex != peer_kex or my_host_key != peer_host_key)


def _install_guessed_kex(patch: Patch) -> None:
    original = patch.original("_process_kexinit")

    async def _process_kexinit(self: Any, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        await original(self, pkttype, pktid, packet)
        # Receiving stays blocked until this coroutine ends, so the guessed packet (if any)
        # has not been looked at yet.
        if self.is_server():
            mine, peer = self._server_kexinit, self._client_kexinit
        else:
            mine, peer = self._client_kexinit, self._server_kexinit
        self._ignore_first_kex = guess_is_wrong(mine, peer)

    cls: Any = patch.target
    cls._process_kexinit = _process_kexinit
    # Packets are dispatched through a table built when the class was defined: replace the
    # entry too, or the wrapper is never called.
    cls._packet_handlers = {**cls._packet_handlers, MSG_KEXINIT: _process_kexinit}


# --- pause-writing-reaches-channels + channel-output-waits-for-transport ----------------------


# A peer that does not read can still make us answer: global and channel requests, pings. Past
# this much in the transport's buffer (channel output stops near the 64 KiB high-water mark,
# so only such answers get here) we stop reading the peer until the buffer drains.
READ_PAUSE_AT = 1024 * 1024


def _hold_reading_if_flooded(conn: Any, transport: Any) -> None:
    if transport.get_write_buffer_size() > READ_PAUSE_AT:
        conn._rtgw_reading_held = True
        transport.pause_reading()


def _install_pause_writing(patch: Patch) -> None:
    cls: Any = patch.target
    original_pause = patch.original("pause_writing")
    original_resume = patch.original("resume_writing")
    cls._rtgw_resume_turn = 0

    def pause_writing(self: Any) -> None:
        original_pause(self)
        self._rtgw_write_paused = True

    def resume_writing(self: Any) -> None:
        original_resume(self)
        self._rtgw_write_paused = False
        if self._rtgw_reading_held:
            self._rtgw_reading_held = False
            # Not while bounded-work-per-read has a backlog: it resumes once that is done.
            if self._transport is not None and not self._rtgw_yielded:
                self._transport.resume_reading()
        channels = list(self._channels.values())
        if not channels:
            return
        start = self._rtgw_resume_turn % len(channels)
        self._rtgw_resume_turn += 1
        for chan in channels[start:] + channels[:start]:
            if self._rtgw_write_paused:
                break  # the transport is full again: the rest wait for the next resume
            if chan._session is None or chan._conn is not self:
                continue  # still opening, or already cleaned up
            try:
                chan._flush_send_buf()
            except Exception:  # as if raised while handling a packet: close the connection
                self.internal_error()
                return

    _set_defaults(cls)
    cls.pause_writing = pause_writing
    cls.resume_writing = resume_writing


def _install_channel_output_wait(patch: Patch) -> None:
    original_flush = patch.original("_flush_send_buf")

    def _flush_send_buf(self: Any) -> None:
        conn = self._conn
        if conn is None or not conn._rtgw_write_paused:
            original_flush(self)
            return
        # The transport asked us to stop: asyncssh's own flush with a zero send window sends
        # no data, pauses the session once the send buffer passes its high-water mark and
        # still sends a pending EOF or CLOSE when the buffer is empty.
        window = self._send_window
        self._send_window = 0
        try:
            original_flush(self)
        finally:
            self._send_window += window

    cls: Any = patch.target
    cls._flush_send_buf = _flush_send_buf


# --- gcm-cipher-object-reuse -----------------------------------------------------------------

_GCM_MAC_SIZE = 16


def _install_gcm_reuse(patch: Patch) -> None:
    cls: Any = patch.target
    original_init = patch.original("__init__")
    cls._rtgw_aead = None  # a cipher made before apply() builds one per packet, as upstream

    def __init__(self: Any, cipher_name: str, key: bytes, iv: bytes) -> None:
        original_init(self, cipher_name, key, iv)
        self._rtgw_aead = AESGCM(key)

    def encrypt_and_sign(self: Any, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        aead = self._rtgw_aead or AESGCM(self._key)
        sealed = aead.encrypt(self._iv, data, header)
        self._update_iv()
        return header + sealed[:-_GCM_MAC_SIZE], sealed[-_GCM_MAC_SIZE:]

    def verify_and_decrypt(self: Any, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        aead = self._rtgw_aead or AESGCM(self._key)
        try:
            opened: bytes | None = aead.decrypt(self._iv, data + mac, header)
        except InvalidTag:
            opened = None
        self._update_iv()
        return opened

    cls.__init__ = __init__
    cls.encrypt_and_sign = encrypt_and_sign
    cls.verify_and_decrypt = verify_and_decrypt


# --- chacha-one-keystream-per-packet --------------------------------------------------------

_CHACHA_BLOCK0 = bytes(64)  # keystream block 0: its first 32 bytes are the Poly1305 key
_CHACHA_COUNTER0 = bytes(8)  # little-endian block counter 0, before the 8-byte nonce (seq)


def _chacha_keystream(key: bytes, nonce: bytes) -> tuple[Any, bytes]:
    """A ChaCha20 context at block 1 of ``key``/``nonce``, and the packet's Poly1305 key."""
    stream = Cipher(ChaCha20(key, _CHACHA_COUNTER0 + nonce), mode=None).encryptor()
    return stream, stream.update(_CHACHA_BLOCK0)[:32]


def _install_chacha_keystream(patch: Patch) -> None:
    cls: Any = patch.target

    def encrypt_and_sign(
        self: Any, header: bytes, data: bytes, nonce: bytes
    ) -> tuple[bytes, bytes]:
        header = (
            Cipher(ChaCha20(self._adkey, _CHACHA_COUNTER0 + nonce), mode=None)
            .encryptor()
            .update(header)
        )
        stream, poly_key = _chacha_keystream(self._key, nonce)
        data = stream.update(data)
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(data)
        return header + data, mac.finalize()

    def verify_and_decrypt(
        self: Any, header: bytes, data: bytes, nonce: bytes, tag: bytes
    ) -> bytes | None:
        stream, poly_key = _chacha_keystream(self._key, nonce)
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(data)
        try:
            mac.verify(tag)  # constant time
        except InvalidSignature:
            return None
        plain: bytes = stream.update(data)
        return plain

    cls.encrypt_and_sign = encrypt_and_sign
    cls.verify_and_decrypt = verify_and_decrypt


_CONN = asyncssh.connection.SSHConnection
_CHAN = asyncssh.channel.SSHChannel
_GCM = asyncssh.crypto.cipher.GCMCipher
_CHACHA = asyncssh.crypto.chacha.ChachaCipher

PATCHES: tuple[Patch, ...] = (
    Patch(
        name="refuse-sha1-user-signatures",
        upstream=(
            "SSHServerConnection.validate_public_key accepts an ssh-rsa (SHA-1) user "
            "signature even when signature_algs leaves ssh-rsa out"
        ),
        target=asyncssh.connection.SSHServerConnection,
        originals=_originals(asyncssh.connection.SSHServerConnection, "validate_public_key"),
        install=_install_refuse_sha1,
    ),
    Patch(
        name="coalesce-transport-writes",
        upstream=(
            "SSHConnection._send calls transport.write() once per SSH packet, so a burst of "
            "packets in one event-loop turn costs one write (syscall) each"
        ),
        target=_CONN,
        originals=_originals(_CONN, "_send", "_force_close"),
        install=_install_coalesced_writes,
    ),
    Patch(
        name="receive-buffer-read-offset",
        upstream=(
            "SSHConnection._recv_pkthdr and _recv_packet consume the receive buffer with "
            "self._inpbuf = self._inpbuf[n:], copying the rest of the read per packet"
        ),
        target=_CONN,
        originals=_originals(_CONN, "_recv_pkthdr", "_recv_packet", "data_received"),
        install=_install_read_offset,
    ),
    Patch(
        name="bounded-work-per-read",
        upstream=(
            "SSHConnection.data_received (via _recv_data) processes every complete packet of "
            "a read (up to 256 KiB, ~8 full data packets: decrypt, relay, encrypt, send) in "
            "one callback, so one busy connection holds the event loop while every other "
            "connection's packets wait"
        ),
        target=_CONN,
        originals=_originals(_CONN, "_recv_data", "eof_received"),
        install=_install_bounded_reads,
    ),
    Patch(
        name="ignore-padding-only-for-cbc",
        upstream=(
            "SSHConnection.send_packet puts an empty SSH_MSG_IGNORE before every encrypted "
            "post-kex packet, whatever the cipher"
        ),
        target=_CONN,
        originals=_originals(_CONN, "send_packet"),
        install=_install_no_ignore_padding,
    ),
    Patch(
        name="window-credit-for-delivered-data",
        upstream=(
            "SSHChannel._deliver_data grants the peer a full new window on resume although "
            "most of the old one is still undelivered in the channel's receive buffer"
        ),
        target=_CHAN,
        originals=_originals(_CHAN, "_deliver_data"),
        install=_install_window_credit,
    ),
    Patch(
        name="userauth-failure-hook",
        upstream=(
            "SSHServer has no callback for a failed authentication attempt: bad signatures, "
            "certificates, unknown key blobs and 'none' requests are answered with "
            "USERAUTH_FAILURE without the owner hearing of it, so MaxAuthTries cannot count "
            "them; the owner's userauth_failed() is now called after each USERAUTH_FAILURE"
        ),
        target=_CONN,
        originals=_originals(_CONN, "send_userauth_failure"),
        install=_install_userauth_failure_hook,
    ),
    Patch(
        name="certificate-decision-by-owner",
        upstream=(
            "SSHServerConnection._validate_openssh_certificate asks the owner only "
            "validate_ca_key(username, ca_key), never shows it the certificate's principals, "
            "key id or serial, and accepts a certificate without principals for any user "
            "(SSHOpenSSHCertificate.validate skips the principal check when the list is "
            "empty); an owner's validate_certificate(username, cert) now decides instead"
        ),
        target=asyncssh.connection.SSHServerConnection,
        originals=_originals(
            asyncssh.connection.SSHServerConnection, "_validate_openssh_certificate"
        ),
        install=_install_certificate_decision,
    ),
    Patch(
        name="guessed-kex-per-rfc4253",
        upstream=(
            "SSHConnection._process_kexinit keeps a peer's guessed first kex packet "
            "(first_kex_packet_follows) whenever the negotiated kex is the peer's first, "
            "although RFC 4253 7.1 (and OpenSSH, Dropbear) call the guess wrong when the two "
            "sides' preferred kex or host-key algorithms differ: Dropbear's dbclient then "
            "sends its kex packet again and gets 'Key exchange not in progress'"
        ),
        target=_CONN,
        originals=_originals(_CONN, "_process_kexinit"),
        install=_install_guessed_kex,
    ),
    Patch(
        name="pause-writing-reaches-channels",
        upstream=(
            "SSHConnection.pause_writing and resume_writing, asyncio's back-pressure callbacks, "
            "do nothing: a peer that stops reading its socket lets the transport's write buffer "
            "grow without bound"
        ),
        target=_CONN,
        originals=_originals(_CONN, "pause_writing", "resume_writing"),
        install=_install_pause_writing,
    ),
    Patch(
        name="channel-output-waits-for-transport",
        upstream=(
            "SSHChannel._flush_send_buf sends as much as the peer's window allows whatever the "
            "transport's buffer holds, so a 2 GiB window lets a channel queue 2 GiB there; "
            "with pause-writing-reaches-channels it now holds output while the transport is "
            "paused"
        ),
        target=_CHAN,
        originals=_originals(_CHAN, "_flush_send_buf"),
        install=_install_channel_output_wait,
    ),
    Patch(
        name="gcm-cipher-object-reuse",
        upstream=(
            "GCMCipher.encrypt_and_sign and verify_and_decrypt build a new AESGCM(key) for "
            "every packet, though the key does not change for the cipher's life"
        ),
        target=_GCM,
        originals=_originals(_GCM, "__init__", "encrypt_and_sign", "verify_and_decrypt"),
        install=_install_gcm_reuse,
    ),
    Patch(
        name="chacha-one-keystream-per-packet",
        upstream=(
            "ChachaCipher makes a new ChaCha20 context for the Poly1305 key and another for "
            "the payload of every packet, and joins header and payload to compute the tag"
        ),
        target=_CHACHA,
        originals=_originals(_CHACHA, "encrypt_and_sign", "verify_and_decrypt"),
        install=_install_chacha_keystream,
    ),
)


def patch_named(name: str) -> Patch:
    """The entry of ``PATCHES`` called ``name``."""
    for patch in PATCHES:
        if patch.name == name:
            return patch
    raise KeyError(name)
