"""Admission before authentication: who may open an SSH connection, decided without crypto.

Pure bookkeeping (no asyncssh, no asyncio, no I/O): the server asks :meth:`Admission.admit` in
``connection_made`` and drops the connection (``conn.abort()``) on a :class:`Refusal`; on a
:class:`Ticket` it reports what happens to that connection until it closes. Time and randomness
are injected (``clock``, ``rng``) so that every decision can be replayed in tests.

Sources
    A connection's *source* is its client address reduced to a network: IPv4 /32 and IPv6 /64 by
    default (``ipv4_prefix``, ``ipv6_prefix``; OpenSSH's ``PerSourceNetBlockSize 32:128`` groups
    IPv6 per address, but one IPv6 subscriber usually holds a whole /64, so per address would let
    one host look like 2**64 sources). IPv4-mapped IPv6 addresses (``::ffff:192.0.2.7``) count as
    IPv4. The address is the PROXY-protocol client address when the peer is a trusted proxy (the
    server decides that; this module just takes the string). An address that cannot be parsed
    (``None``, a UNIX socket's ``''``) is one shared source, ``unknown``.

Checks, in order, each costing a dict lookup or two (refusal reason codes in brackets)
    1. ``source_penalized``: the source's accumulated penalty is active (see Penalties).
    2. ``too_many_unauthenticated_from_source``: the source already holds
       ``max_unauthenticated_per_source`` unauthenticated connections (OpenSSH's
       ``PerSourceMaxStartups``; OpenSSH has no default).
    3. ``too_many_unauthenticated``: the gateway already holds ``startups_full`` unauthenticated
       connections (the hard global cap).
    4. ``startups_random_drop``: OpenSSH's ``MaxStartups start:rate:full``: with ``n``
       unauthenticated connections open, ``start <= n < full``, a new one is dropped with
       probability ``rate/100 + (1 - rate/100) * (n - start) / (full - start)``, i.e. ``rate`` %
       at the start mark rising linearly to 100 % at full. Unlike OpenSSH, a source's first
       ``startups_spared_per_source`` unauthenticated connections are spared this drop (only the
       hard cap applies to them): the sources that made the gateway busy pay for it, and a person
       typing ``ssh`` from an otherwise quiet address still gets in. 0 restores OpenSSH's
       behaviour.

    A connection counts as *unauthenticated* from :meth:`Admission.admit` until
    :meth:`Ticket.authenticated` or :meth:`Ticket.closed`.

Key-exchange grace
    A connection that has not finished key exchange within ``kex_grace_seconds`` should be
    dropped (the login timeout, 30 s, is for the person typing a passphrase, not for a socket that
    never speaks). The timer is the server's: start it on admission, call
    :meth:`Ticket.kex_completed` when key exchange is done (the first ``begin_auth`` will do) and,
    when the timer fires while :attr:`Ticket.kex_pending`, call :meth:`Ticket.grace_exceeded` and
    abort the connection. Call :meth:`Ticket.grace_exceeded` as well when the login timeout
    drops a connection.

Penalties (in the spirit of OpenSSH 9.8's ``PerSourcePenalties``)
    Failures, not traffic, are penalized. When a connection that never authenticated closes
    (:meth:`Ticket.closed`), its source's penalty grows by the amount of the worst thing that
    connection did:

    ``grace_exceeded``  dropped at the key-exchange grace or the login timeout    10 s
    ``authfail``        at least one failed attempt (refused key, bad signature,    5 s
                        invalid login name, unsupported method, too many tries;
                        see :meth:`Ticket.auth_failed`)
    ``noauth``          closed without any attempt (scanners, ``ssh-keyscan``)      1 s

    Refused keys before a successful login are not failures: an agent holding five keys, or
    50 CI runners behind one NAT whose first key is the wrong one, are never penalized. Pass
    ``penalize=False`` to :meth:`Ticket.closed` when the gateway itself is to blame (draining, the
    keystore unavailable). :meth:`Admission.record_failure` applies a penalty directly.

    A source's penalty is a number of seconds that decays at one second per second. Once it
    exceeds ``penalty_min_seconds`` (15 s) the source is *penalized*: all its new connections are
    refused, cheaply, until the penalty has decayed to zero. It is capped at
    ``penalty_max_seconds`` (600 s). Back-off grows twice over: penalties accumulate (at 20 failed
    logins a second, a source is blocked after its fourth, for ~20 s), and each time a source
    becomes penalized its *level* goes up by one, multiplying its later penalties by
    ``penalty_backoff_factor ** level`` (2: blocks of ~20, 20, 20, 40, 80 ... 600 s for a source
    that comes back failing). One level is forgiven per ``penalty_backoff_decay_seconds`` (600 s)
    without penalty. Addresses in ``penalty_exempt_cidrs`` are never penalized nor refused for a
    penalty (other checks still apply).

    The penalty table holds at most ``max_tracked_sources`` sources per address family (IPv4 and
    IPv6 separately, as OpenSSH's ``max-sources4``/``max-sources6``, so that an attacker with a
    routed IPv6 prefix cannot flush IPv4 penalties); when full, the least recently penalized or
    refused source is forgotten. Counts of open unauthenticated connections are bounded by
    ``startups_full``. Memory is therefore bounded whatever the number of attacking addresses.

Defaults, and why (for one gateway process; with N worker processes each has its own
:class:`Admission`, so the effective caps are N times these)
    ``max_unauthenticated_per_source = 64``: 50 simultaneous logins from one address (CI runners
    behind NAT, parallel rsync, an editor opening several connections) must all get in, with
    headroom. One address holding its 64 idle connections is 32 % of the start mark and 6 % of the
    hard cap, so it alone can never start the random drop, let alone fill the gateway: while one
    address holds 150 idle connections (64 admitted) and another fails 20 logins a second
    (penalized after four), a third address is admitted at once.
    ``startups_start, startups_rate, startups_full = 200, 30, 1000``: OpenSSH's 10:30:100 is sized
    for one host's users; a gateway serves every organization. A busy, healthy process (~140
    logins/s per core at ~7 ms of CPU each, each pending for a fraction of a second) holds a few
    dozen unauthenticated connections, so 200 leaves several times that as headroom; at least four
    addresses at their cap are needed to reach it; and 1000 (tens of MiB of per-connection state)
    stays far above any one source's 64.
    ``startups_spared_per_source = 4``: a person's ``ssh``, ``scp`` and an editor's extra
    connection.
    ``kex_grace_seconds = 10``: key exchange is a few round trips and milliseconds of CPU; 10 s
    covers a lossy 1 s-RTT link, while a socket that never speaks holds its slot a third of the
    30 s login timeout (and is penalized ``grace_exceeded``).
    Penalties as OpenSSH's PerSourcePenalties: authfail 5 s, noauth 1 s, grace-exceeded 10 s,
    min 15 s, max 600 s; ``max_tracked_sources = 65536`` per family, as OpenSSH (about 220 bytes
    per tracked source, measured, so ~28 MiB at worst with both tables full; a record whose
    penalty and back-off level have run out is dropped as the table turns over).
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = [
    "AUTHFAIL",
    "GRACE_EXCEEDED",
    "NOAUTH",
    "PENALTY_KINDS",
    "REFUSAL_CODES",
    "SOURCE_PENALIZED",
    "STARTUPS_RANDOM_DROP",
    "TOO_MANY_UNAUTHENTICATED",
    "TOO_MANY_UNAUTHENTICATED_FROM_SOURCE",
    "Admission",
    "AdmissionSettings",
    "AdmissionStats",
    "Refusal",
    "Source",
    "Ticket",
    "source_of",
]

# Refusal reason codes (for logs and metric labels).
SOURCE_PENALIZED: Final = "source_penalized"
TOO_MANY_UNAUTHENTICATED_FROM_SOURCE: Final = "too_many_unauthenticated_from_source"
TOO_MANY_UNAUTHENTICATED: Final = "too_many_unauthenticated"
STARTUPS_RANDOM_DROP: Final = "startups_random_drop"
REFUSAL_CODES: Final = (
    SOURCE_PENALIZED,
    TOO_MANY_UNAUTHENTICATED_FROM_SOURCE,
    TOO_MANY_UNAUTHENTICATED,
    STARTUPS_RANDOM_DROP,
)

# Penalty kinds, from the mildest to the worst.
NOAUTH: Final = "noauth"
AUTHFAIL: Final = "authfail"
GRACE_EXCEEDED: Final = "grace_exceeded"
PENALTY_KINDS: Final = (NOAUTH, AUTHFAIL, GRACE_EXCEEDED)

# Back-off levels stop growing here (2**16 times any base penalty is far above any sane max).
_MAX_LEVEL = 16

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """Admission limits; see the module docstring for the semantics and the reasoning."""

    ipv4_prefix: int = 32
    """IPv4 addresses in the same network of this length are one source."""
    ipv6_prefix: int = 64
    """IPv6 addresses in the same network of this length are one source."""
    max_unauthenticated_per_source: int = 64
    """Unauthenticated connections one source may hold at once."""
    startups_start: int = 200
    """Unauthenticated connections (all sources) from which new ones are randomly dropped."""
    startups_rate: int = 30
    """Drop probability at ``startups_start``, in percent; rises linearly to 100 at full."""
    startups_full: int = 1000
    """Unauthenticated connections (all sources) at which every new one is refused."""
    startups_spared_per_source: int = 4
    """A source's first this many unauthenticated connections skip the random drop."""
    kex_grace_seconds: float = 10.0
    """Time allowed to finish key exchange (the timer is the server's)."""
    penalty_authfail_seconds: float = 5.0
    """Penalty for a connection that failed authentication and never succeeded."""
    penalty_noauth_seconds: float = 1.0
    """Penalty for a connection that closed without authenticating or trying to."""
    penalty_grace_exceeded_seconds: float = 10.0
    """Penalty for a connection dropped at the key-exchange grace or the login timeout."""
    penalty_min_seconds: float = 15.0
    """A source is refused once its accumulated penalty exceeds this."""
    penalty_max_seconds: float = 600.0
    """A source's accumulated penalty never exceeds this."""
    penalty_backoff_factor: float = 2.0
    """Penalties are multiplied by this per back-off level (1 turns growing back-off off)."""
    penalty_backoff_decay_seconds: float = 600.0
    """One back-off level is forgiven per this much time without penalty."""
    penalty_exempt_cidrs: tuple[str, ...] = ()
    """Addresses in these networks are never penalized (e.g. monitoring, a known office)."""
    max_tracked_sources: int = 65536
    """Sources with a penalty remembered, per address family; the least recent is forgotten."""

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"admission settings: {what}")

        need(0 <= self.ipv4_prefix <= 32, "ipv4_prefix must be 0..32")
        need(0 <= self.ipv6_prefix <= 128, "ipv6_prefix must be 0..128")
        need(
            self.max_unauthenticated_per_source >= 1, "max_unauthenticated_per_source must be >= 1"
        )
        need(self.startups_start >= 1, "startups_start must be >= 1")
        need(self.startups_full >= self.startups_start, "startups_full must be >= startups_start")
        need(0 <= self.startups_rate <= 100, "startups_rate must be 0..100 (percent)")
        need(self.startups_spared_per_source >= 0, "startups_spared_per_source must be >= 0")
        need(self.kex_grace_seconds > 0, "kex_grace_seconds must be > 0")
        for name in (
            "penalty_authfail_seconds",
            "penalty_noauth_seconds",
            "penalty_grace_exceeded_seconds",
            "penalty_min_seconds",
        ):
            need(getattr(self, name) >= 0, f"{name} must be >= 0")
        need(self.penalty_max_seconds > 0, "penalty_max_seconds must be > 0")
        need(self.penalty_backoff_factor >= 1, "penalty_backoff_factor must be >= 1")
        need(self.penalty_backoff_decay_seconds > 0, "penalty_backoff_decay_seconds must be > 0")
        need(self.max_tracked_sources >= 1, "max_tracked_sources must be >= 1")
        for cidr in self.penalty_exempt_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(
                    f"admission settings: penalty_exempt_cidrs: {cidr!r} is not a network"
                ) from None

    def penalty_seconds(self, kind: str) -> float:
        """The base penalty for one failure of ``kind`` (one of :data:`PENALTY_KINDS`)."""
        if kind == AUTHFAIL:
            return self.penalty_authfail_seconds
        if kind == NOAUTH:
            return self.penalty_noauth_seconds
        if kind == GRACE_EXCEEDED:
            return self.penalty_grace_exceeded_seconds
        raise ValueError(f"unknown penalty kind {kind!r}; expected one of {PENALTY_KINDS}")


@dataclass(frozen=True, slots=True)
class Source:
    """Where a connection comes from: a network of the configured prefix length.

    ``version`` is 4 or 6, or 0 for the shared ``unknown`` source (unparseable address).
    ``str()`` gives the network in CIDR form, e.g. ``203.0.113.7/32`` or ``2001:db8:1:2::/64``.
    """

    version: int
    network: int
    prefix: int

    def __str__(self) -> str:
        if self.version == 4:
            return f"{ipaddress.IPv4Address(self.network)}/{self.prefix}"
        if self.version == 6:
            return f"{ipaddress.IPv6Address(self.network)}/{self.prefix}"
        return "unknown"


_UNKNOWN = Source(0, 0, 0)


def _parse(peer: str | None) -> _Address | None:
    if not peer:
        return None
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _source(address: _Address | None, ipv4_prefix: int, ipv6_prefix: int) -> Source:
    if address is None:
        return _UNKNOWN
    if address.version == 4:
        width, prefix = 32, ipv4_prefix
    else:
        width, prefix = 128, ipv6_prefix
    host_bits = width - prefix
    return Source(address.version, (int(address) >> host_bits) << host_bits, prefix)


def source_of(peer: str | None, settings: AdmissionSettings | None = None) -> Source:
    """The source of a peer address string, with the prefix lengths of ``settings``."""
    s = settings or AdmissionSettings()
    return _source(_parse(peer), s.ipv4_prefix, s.ipv6_prefix)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A connection to drop at once (``conn.abort()``: no version string, no crypto)."""

    code: str
    """One of :data:`REFUSAL_CODES`."""
    source: Source
    retry_after: float | None = None
    """For ``source_penalized``: seconds until the source's penalty has decayed."""


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """A snapshot for metrics and logs; the ``*_total`` fields only grow."""

    unauthenticated: int
    """Connections admitted and not yet authenticated or closed."""
    awaiting_kex: int
    """Of those, the ones that have not finished key exchange."""
    sources_with_unauthenticated: int
    largest_source_unauthenticated: int
    """The most unauthenticated connections any one source holds."""
    tracked_sources: int
    """Sources in the penalty table (all families)."""
    admitted_total: int
    refused_total: Mapping[str, int]
    """By reason code; every code of :data:`REFUSAL_CODES` is present."""
    penalties_total: Mapping[str, int]
    """Penalties applied, by kind; every kind of :data:`PENALTY_KINDS` is present."""
    penalized_total: int
    """Times a source became penalized (crossed the minimum)."""
    evicted_total: int
    """Sources forgotten because the penalty table was full."""


class _Penalty:
    """One source's penalty: ``expiry - now`` seconds left, and its back-off level."""

    __slots__ = ("active", "calm_from", "expiry", "level")

    def __init__(self, now: float) -> None:
        self.expiry = now
        self.active = False
        self.level = 0
        self.calm_from = now  # levels are forgiven counting from max(expiry, calm_from)


_PRE_KEX, _AUTHENTICATING, _AUTHENTICATED, _CLOSED = range(4)


class Ticket:
    """One admitted connection. Tell it what happens; it keeps the counts right.

    Every method is idempotent and harmless after :meth:`closed`.
    """

    __slots__ = ("_address", "_admission", "_failure", "_state", "opened_at", "source")

    def __init__(
        self, admission: Admission, source: Source, address: _Address | None, now: float
    ) -> None:
        self._admission = admission
        self._address = address
        self._state = _PRE_KEX
        self._failure: str | None = None
        self.source = source
        self.opened_at = now

    @property
    def kex_pending(self) -> bool:
        """True until :meth:`kex_completed` (and while the connection is open)."""
        return self._state == _PRE_KEX

    @property
    def is_authenticated(self) -> bool:
        return self._state == _AUTHENTICATED

    @property
    def is_closed(self) -> bool:
        return self._state == _CLOSED

    def kex_completed(self) -> None:
        """Key exchange is done: the key-exchange grace no longer applies."""
        if self._state == _PRE_KEX:
            self._state = _AUTHENTICATING
            self._admission._awaiting_kex -= 1

    def auth_failed(self) -> None:
        """An authentication attempt failed: a refused key, a bad signature, an invalid login name,
        an unsupported method. Penalized (``authfail``) only if the connection closes without
        ever authenticating.
        """
        if self._state in (_PRE_KEX, _AUTHENTICATING) and self._failure is None:
            self._failure = AUTHFAIL

    def grace_exceeded(self) -> None:
        """The key-exchange grace or the login timeout ran out; the server drops the connection.
        Penalized ``grace_exceeded`` when the connection closes."""
        if self._state in (_PRE_KEX, _AUTHENTICATING):
            self._failure = GRACE_EXCEEDED

    def authenticated(self) -> None:
        """Authentication succeeded: the connection no longer counts as unauthenticated and its
        earlier failed attempts are forgotten."""
        if self._state in (_PRE_KEX, _AUTHENTICATING):
            self._admission._release(self)
            self._state = _AUTHENTICATED
            self._failure = None

    def closed(self, *, penalize: bool = True) -> str | None:
        """The connection is gone. Returns the penalty kind applied to its source, if any.

        A connection that never authenticated costs its source ``grace_exceeded``, ``authfail``
        or ``noauth`` (the worst thing it did) unless ``penalize`` is False: pass False when the
        gateway ended it for reasons of its own (draining, keystore unavailable).
        """
        state = self._state
        if state == _CLOSED:
            return None
        if state != _AUTHENTICATED:
            self._admission._release(self)
        self._state = _CLOSED
        if state == _AUTHENTICATED or not penalize:
            return None
        kind = self._failure or NOAUTH
        if self._admission._penalize(self._address, kind) is None:
            return None
        return kind


class Admission:
    """Admission control for one process. Not thread-safe (one event loop)."""

    def __init__(
        self,
        settings: AdmissionSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._unauthenticated = 0
        self._awaiting_kex = 0
        self._open: dict[Source, int] = {}
        self._penalties: dict[int, OrderedDict[int, _Penalty]] = {
            0: OrderedDict(),
            4: OrderedDict(),
            6: OrderedDict(),
        }
        self._admitted_total = 0
        self._refused_total = dict.fromkeys(REFUSAL_CODES, 0)
        self._penalties_total = dict.fromkeys(PENALTY_KINDS, 0)
        self._penalized_total = 0
        self._evicted_total = 0
        self.settings = AdmissionSettings()
        self._exempt: tuple[_Network, ...] = ()
        self.reconfigure(settings or AdmissionSettings())

    def reconfigure(self, settings: AdmissionSettings) -> None:
        """Apply new settings (SIGHUP). Open connections keep counting against their source;
        penalties are kept unless a prefix length changed (then they are forgotten)."""
        old = self.settings
        self.settings = settings
        self._exempt = tuple(
            ipaddress.ip_network(c, strict=False) for c in settings.penalty_exempt_cidrs
        )
        if (old.ipv4_prefix, old.ipv6_prefix) != (settings.ipv4_prefix, settings.ipv6_prefix):
            for table in self._penalties.values():
                table.clear()
        for table in self._penalties.values():
            while len(table) > settings.max_tracked_sources:
                table.popitem(last=False)
                self._evicted_total += 1

    # --- the questions the server asks ---

    def source(self, peer: str | None) -> Source:
        """The source of a peer address string (as :meth:`admit` computes it)."""
        s = self.settings
        return _source(_parse(peer), s.ipv4_prefix, s.ipv6_prefix)

    def admit(self, peer: str | None) -> Ticket | Refusal:
        """Admit a new connection from ``peer`` (an address string) or refuse it.

        A :class:`Ticket` counts as unauthenticated until :meth:`Ticket.authenticated` or
        :meth:`Ticket.closed`; a :class:`Refusal` counts nothing and the server must drop the
        connection at once.
        """
        s = self.settings
        now = self._clock()
        address = _parse(peer)
        source = _source(address, s.ipv4_prefix, s.ipv6_prefix)

        table = self._penalties[source.version]
        record = table.get(source.network)
        if record is not None:
            self._settle(record, now)
            if record.active and not self._is_exempt(address):
                table.move_to_end(source.network)  # a source still knocking stays remembered
                return self._refuse(SOURCE_PENALIZED, source, record.expiry - now)
            if record.level == 0 and record.expiry <= now:
                del table[source.network]

        held = self._open.get(source, 0)
        if held >= s.max_unauthenticated_per_source:
            return self._refuse(TOO_MANY_UNAUTHENTICATED_FROM_SOURCE, source)
        count = self._unauthenticated
        if count >= s.startups_full:
            return self._refuse(TOO_MANY_UNAUTHENTICATED, source)
        if count >= s.startups_start and held >= s.startups_spared_per_source:
            if self._rng() < self.drop_probability(count):
                return self._refuse(STARTUPS_RANDOM_DROP, source)

        self._open[source] = held + 1
        self._unauthenticated = count + 1
        self._awaiting_kex += 1
        self._admitted_total += 1
        return Ticket(self, source, address, now)

    def drop_probability(self, unauthenticated: int) -> float:
        """MaxStartups: the probability of a random drop with this many connections open."""
        s = self.settings
        if unauthenticated < s.startups_start:
            return 0.0
        if unauthenticated >= s.startups_full:
            return 1.0
        rate = s.startups_rate / 100
        return rate + (1 - rate) * (unauthenticated - s.startups_start) / (
            s.startups_full - s.startups_start
        )

    def record_failure(self, peer: str | None, kind: str) -> float | None:
        """Penalize ``peer``'s source for one failure of ``kind`` now, outside any ticket.

        Returns the source's accumulated penalty in seconds, or None if the address is exempt.
        Prefer :meth:`Ticket.closed`, which penalizes a connection once, for its worst failure.
        """
        return self._penalize(_parse(peer), kind)

    def penalty(self, peer: str | None) -> float:
        """Seconds of penalty ``peer``'s source has accumulated (0 when none)."""
        source = self.source(peer)
        record = self._penalties[source.version].get(source.network)
        if record is None:
            return 0.0
        return max(0.0, record.expiry - self._clock())

    def is_penalized(self, peer: str | None) -> bool:
        """True if a connection from ``peer`` would be refused as ``source_penalized`` now."""
        address = _parse(peer)
        s = self.settings
        source = _source(address, s.ipv4_prefix, s.ipv6_prefix)
        record = self._penalties[source.version].get(source.network)
        if record is None:
            return False
        self._settle(record, self._clock())
        return record.active and not self._is_exempt(address)

    def unauthenticated_from(self, peer: str | None) -> int:
        """Unauthenticated connections ``peer``'s source holds now."""
        return self._open.get(self.source(peer), 0)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            unauthenticated=self._unauthenticated,
            awaiting_kex=self._awaiting_kex,
            sources_with_unauthenticated=len(self._open),
            largest_source_unauthenticated=max(self._open.values(), default=0),
            tracked_sources=sum(len(t) for t in self._penalties.values()),
            admitted_total=self._admitted_total,
            refused_total=MappingProxyType(dict(self._refused_total)),
            penalties_total=MappingProxyType(dict(self._penalties_total)),
            penalized_total=self._penalized_total,
            evicted_total=self._evicted_total,
        )

    # --- internals ---

    def _refuse(self, code: str, source: Source, retry_after: float | None = None) -> Refusal:
        self._refused_total[code] += 1
        return Refusal(code, source, retry_after)

    def _release(self, ticket: Ticket) -> None:
        """``ticket`` no longer counts as unauthenticated."""
        if ticket._state == _PRE_KEX:
            self._awaiting_kex -= 1
        self._unauthenticated -= 1
        held = self._open.get(ticket.source, 0) - 1
        if held > 0:
            self._open[ticket.source] = held
        else:
            self._open.pop(ticket.source, None)

    def _is_exempt(self, address: _Address | None) -> bool:
        return address is not None and any(address in net for net in self._exempt)

    def _settle(self, record: _Penalty, now: float) -> None:
        """Bring a record up to ``now``: end an expired block, forgive back-off levels."""
        if now < record.expiry:
            return
        record.active = False
        if record.level:
            quiet_from = max(record.expiry, record.calm_from)
            steps = int((now - quiet_from) // self.settings.penalty_backoff_decay_seconds)
            if steps > 0:
                record.level = max(0, record.level - steps)
                record.calm_from = quiet_from + steps * self.settings.penalty_backoff_decay_seconds

    def _penalize(self, address: _Address | None, kind: str) -> float | None:
        """Add one ``kind`` penalty to the source of ``address`` (under the current prefixes)."""
        s = self.settings
        base = s.penalty_seconds(kind)  # raises ValueError on an unknown kind
        if self._is_exempt(address):
            return None
        source = _source(address, s.ipv4_prefix, s.ipv6_prefix)
        now = self._clock()
        table = self._penalties[source.version]
        record = table.get(source.network)
        if record is None:
            self._trim(table, now)
            record = _Penalty(now)
            table[source.network] = record
        else:
            self._settle(record, now)
            table.move_to_end(source.network)
        self._penalties_total[kind] += 1
        amount = base * s.penalty_backoff_factor**record.level
        record.expiry = min(max(record.expiry, now) + amount, now + s.penalty_max_seconds)
        remaining = record.expiry - now
        if not record.active and remaining > s.penalty_min_seconds:
            record.active = True
            record.level = min(record.level + 1, _MAX_LEVEL)
            self._penalized_total += 1
        return remaining

    def _trim(self, table: OrderedDict[int, _Penalty], now: float) -> None:
        """Make room for one more record: drop forgotten ones, then the least recent."""
        for _ in range(2):  # amortised clean-up of records with nothing left to remember
            if not table:
                return
            network, oldest = next(iter(table.items()))
            self._settle(oldest, now)
            if oldest.level or oldest.expiry > now:
                break
            del table[network]
        while len(table) >= self.settings.max_tracked_sources:
            table.popitem(last=False)
            self._evicted_total += 1
