"""gateway.ssh.admission: who may open an SSH connection before authenticating.

Every test drives the pure admission logic with a fake clock and a scripted random source, the
way the server will: admit in connection_made, kex_completed at the first begin_auth,
auth_failed per failed attempt, authenticated in auth_completed, closed in connection_lost.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import subprocess
import sys

import pytest

from gateway.ssh.admission import (
    AUTHFAIL,
    GRACE_EXCEEDED,
    NOAUTH,
    PENALTY_KINDS,
    REFUSAL_CODES,
    SOURCE_PENALIZED,
    STARTUPS_RANDOM_DROP,
    TOO_MANY_UNAUTHENTICATED,
    TOO_MANY_UNAUTHENTICATED_FROM_SOURCE,
    Admission,
    AdmissionSettings,
    Refusal,
    Source,
    Ticket,
    source_of,
)

# --------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedRng:
    """Returns ``value`` (default: never drop) and records how often it was asked."""

    def __init__(self, value: float = 0.999) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, rng: ScriptedRng | None = None, **settings: object) -> Admission:
    return Admission(
        AdmissionSettings(**settings),  # type: ignore[arg-type]
        clock=clock,
        rng=rng or ScriptedRng(),
    )


def ticket(result: Ticket | Refusal) -> Ticket:
    assert isinstance(result, Ticket), f"expected admission, got {result}"
    return result


def refusal(result: Ticket | Refusal, code: str) -> Refusal:
    assert isinstance(result, Refusal), f"expected refusal {code}, got a ticket"
    assert result.code == code
    return result


def failed_login(adm: Admission, peer: str, attempts: int = 1) -> Ticket | Refusal:
    """A whole connection that tries ``attempts`` keys, all refused, then gives up."""
    result = adm.admit(peer)
    if isinstance(result, Ticket):
        result.kex_completed()
        for _ in range(attempts):
            result.auth_failed()
        result.closed()
    return result


def good_login(adm: Admission, peer: str) -> Ticket:
    t = ticket(adm.admit(peer))
    t.kex_completed()
    t.authenticated()
    return t


# --------------------------------------------------------------------------- the story


def test_one_source_holding_idle_connections_does_not_lock_out_another(clock: FakeClock) -> None:
    adm = make(clock)
    held = [adm.admit("198.51.100.66") for _ in range(150)]

    assert sum(isinstance(r, Ticket) for r in held) == 64
    for r in held[64:]:
        refusal(r, TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)
    assert adm.stats().unauthenticated == 64

    good_login(adm, "203.0.113.5")


def test_idle_holder_and_failing_logins_do_not_stop_a_third_address(clock: FakeClock) -> None:
    """Issue 9: one address holds 150 idle connections (reopening each as it is dropped),
    another fails 20 logins a second; a third address logs in every second for 45 s."""
    rng = ScriptedRng(0.0)  # every draw says "drop": no connection may meet the random drop
    adm = make(clock, rng)
    settings = adm.settings
    idle: list[Ticket] = []
    idle_refusals: dict[str, int] = {}
    failing_refusals: dict[str, int] = {}
    clean_ok = 0

    for step in range(45 * 20):  # 50 ms steps
        # The server's key-exchange timer drops idle connections that never finished kex.
        for t in [t for t in idle if clock.now - t.opened_at >= settings.kex_grace_seconds]:
            t.grace_exceeded()
            t.closed()
            idle.remove(t)
        while len(idle) < 150:
            r = adm.admit("198.51.100.66")
            if isinstance(r, Refusal):
                idle_refusals[r.code] = idle_refusals.get(r.code, 0) + 1
                break
            idle.append(r)
        r = failed_login(adm, "192.0.2.20", attempts=6)
        if isinstance(r, Refusal):
            failing_refusals[r.code] = failing_refusals.get(r.code, 0) + 1
        if step % 20 == 0:
            t = good_login(adm, "203.0.113.5")
            t.closed()
            clean_ok += 1
        clock.advance(0.05)

    assert clean_ok == 45
    # The failing source was shut out after a handful of logins, for nearly all of the 45 s.
    assert failing_refusals == {SOURCE_PENALIZED: failing_refusals[SOURCE_PENALIZED]}
    assert failing_refusals[SOURCE_PENALIZED] > 45 * 20 * 0.9
    # The idle holder never had more than its share, then was penalized for its dropped ones.
    assert idle_refusals[TOO_MANY_UNAUTHENTICATED_FROM_SOURCE] > 0
    assert adm.is_penalized("198.51.100.66")
    assert adm.stats().refused_total[STARTUPS_RANDOM_DROP] == 0


def test_fifty_simultaneous_valid_logins_from_one_address_all_get_in(clock: FakeClock) -> None:
    adm = make(clock)
    tickets = [ticket(adm.admit("198.51.100.7")) for _ in range(50)]
    assert adm.unauthenticated_from("198.51.100.7") == 50
    for t in tickets:
        t.kex_completed()
        t.auth_failed()  # each runner's agent offers a wrong key first
        t.auth_failed()
        t.authenticated()

    assert adm.unauthenticated_from("198.51.100.7") == 0
    for t in tickets:
        assert t.closed() is None
    assert adm.penalty("198.51.100.7") == 0
    assert sum(adm.stats().penalties_total.values()) == 0


def test_authenticated_connections_do_not_count_against_the_caps(clock: FakeClock) -> None:
    adm = make(clock, max_unauthenticated_per_source=3, startups_start=5, startups_full=5)
    for _ in range(20):
        good_login(adm, "198.51.100.7")  # 20 live sessions from one address
    assert adm.stats().unauthenticated == 0
    ticket(adm.admit("198.51.100.7"))


def test_a_quiet_address_gets_in_while_many_addresses_crowd_the_gateway(clock: FakeClock) -> None:
    """Ten attacking addresses at their per-source cap put the gateway in the random-drop zone;
    a person's single connection from elsewhere is spared the drop."""
    rng = ScriptedRng()
    adm = make(clock, rng)
    for i in range(10):
        for _ in range(64):
            ticket(adm.admit(f"198.51.100.{i}"))
    assert adm.stats().unauthenticated == 640
    assert adm.drop_probability(640) > 0.6
    rng.value = 0.0  # from now on every random draw says "drop"

    person = [ticket(adm.admit("203.0.113.5")) for _ in range(4)]  # ssh, scp, an editor...
    # Past its spared connections, a source takes its chances (and loses them here).
    refusal(adm.admit("203.0.113.5"), STARTUPS_RANDOM_DROP)
    refusal(adm.admit("198.51.100.0"), TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)
    for t in person:
        t.kex_completed()
        t.authenticated()
    assert adm.penalty("203.0.113.5") == 0


# --------------------------------------------------------------------------- MaxStartups


def test_random_early_drop_rises_linearly_from_rate_at_start_to_certain_at_full(
    clock: FakeClock,
) -> None:
    adm = make(clock, startups_start=200, startups_rate=30, startups_full=1000)
    assert adm.drop_probability(0) == 0
    assert adm.drop_probability(199) == 0
    assert adm.drop_probability(200) == pytest.approx(0.30)
    assert adm.drop_probability(600) == pytest.approx(0.65)
    assert adm.drop_probability(999) == pytest.approx(0.30 + 0.70 * 799 / 800)
    assert adm.drop_probability(1000) == 1
    assert adm.drop_probability(5000) == 1


def test_random_drop_uses_the_injected_random_source(clock: FakeClock) -> None:
    rng = ScriptedRng()
    adm = make(
        clock,
        rng,
        startups_start=10,
        startups_rate=50,
        startups_full=20,
        max_unauthenticated_per_source=100,
        startups_spared_per_source=0,
    )
    for _ in range(10):
        ticket(adm.admit("198.51.100.1"))
    assert rng.calls == 0  # below the start mark no draw is made

    # 10 open: p = 0.5. A draw under p drops, a draw at or above p admits.
    rng.value = 0.49
    refusal(adm.admit("198.51.100.1"), STARTUPS_RANDOM_DROP)
    rng.value = 0.5
    ticket(adm.admit("198.51.100.1"))
    # 11 open: p = 0.55.
    rng.value = 0.54
    refusal(adm.admit("203.0.113.9"), STARTUPS_RANDOM_DROP)
    rng.value = 0.56
    ticket(adm.admit("203.0.113.9"))
    assert adm.stats().refused_total[STARTUPS_RANDOM_DROP] == 2


def test_random_drop_with_a_real_generator_drops_about_the_expected_share(
    clock: FakeClock,
) -> None:
    settings = AdmissionSettings(startups_start=100, startups_rate=30, startups_full=300)
    adm = Admission(settings, clock=clock, rng=random.Random(9).random)
    for i in range(200):  # 50 sources with 4 each: all spared
        ticket(adm.admit(f"10.1.{i // 4}.1"))
    adm.reconfigure(dataclasses.replace(settings, startups_spared_per_source=0))
    # 200 open: p = 0.3 + 0.7 * 100/200 = 0.65.
    dropped = 0
    for _ in range(2000):
        r = adm.admit("10.9.9.9")
        if isinstance(r, Refusal):
            dropped += 1
        else:
            r.closed(penalize=False)
    assert 0.60 < dropped / 2000 < 0.70


def test_sources_spared_the_random_drop_up_to_the_configured_number(clock: FakeClock) -> None:
    rng = ScriptedRng(0.0)
    adm = make(
        clock,
        rng,
        startups_start=10,
        startups_full=100,
        startups_spared_per_source=2,
        max_unauthenticated_per_source=10,
    )
    for _ in range(10):
        ticket(adm.admit("198.51.100.1"))
    ticket(adm.admit("203.0.113.5"))
    ticket(adm.admit("203.0.113.5"))
    refusal(adm.admit("203.0.113.5"), STARTUPS_RANDOM_DROP)


def test_sparing_nobody_is_openssh_maxstartups(clock: FakeClock) -> None:
    adm = make(
        clock,
        ScriptedRng(0.0),
        startups_start=10,
        startups_full=100,
        startups_spared_per_source=0,
    )
    for _ in range(10):
        ticket(adm.admit("198.51.100.1"))
    refusal(adm.admit("203.0.113.5"), STARTUPS_RANDOM_DROP)


def test_at_the_full_mark_every_new_connection_is_refused(clock: FakeClock) -> None:
    adm = make(clock, startups_start=5, startups_full=8, max_unauthenticated_per_source=3)
    for i in range(8):
        ticket(adm.admit(f"198.51.100.{i}"))
    refusal(adm.admit("203.0.113.5"), TOO_MANY_UNAUTHENTICATED)
    assert adm.stats().refused_total[TOO_MANY_UNAUTHENTICATED] == 1


def test_a_closed_connection_frees_its_place(clock: FakeClock) -> None:
    adm = make(clock, max_unauthenticated_per_source=2)
    a = ticket(adm.admit("198.51.100.1"))
    ticket(adm.admit("198.51.100.1"))
    refusal(adm.admit("198.51.100.1"), TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)
    a.closed(penalize=False)
    ticket(adm.admit("198.51.100.1"))


# --------------------------------------------------------------------------- penalties


def test_penalty_grows_with_failures_and_decays(clock: FakeClock) -> None:
    adm = make(clock)
    peer = "192.0.2.20"
    for expected in (5, 10, 15):
        failed_login(adm, peer)
        assert adm.penalty(peer) == pytest.approx(expected)
    # 15 s is the minimum, not yet over it: still admitted.
    assert not adm.is_penalized(peer)
    failed_login(adm, peer)
    assert adm.penalty(peer) == pytest.approx(20)
    assert adm.is_penalized(peer)
    refused = refusal(adm.admit(peer), SOURCE_PENALIZED)
    assert refused.retry_after == pytest.approx(20)

    clock.advance(12)
    assert adm.penalty(peer) == pytest.approx(8)
    refusal(adm.admit(peer), SOURCE_PENALIZED)  # once penalized, refused until it is all gone
    clock.advance(8)
    assert adm.penalty(peer) == 0
    assert not adm.is_penalized(peer)
    good_login(adm, peer)


def test_failures_spread_out_in_time_decay_before_they_add_up(clock: FakeClock) -> None:
    adm = make(clock)
    for _ in range(100):  # a failed login every 5 s: each decays before the next
        failed_login(adm, "192.0.2.20")
        clock.advance(5)
    assert not adm.is_penalized("192.0.2.20")


def test_refusals_while_penalized_add_no_penalty(clock: FakeClock) -> None:
    adm = make(clock)
    for _ in range(4):
        failed_login(adm, "192.0.2.20")
    before = adm.penalty("192.0.2.20")
    for _ in range(1000):
        refusal(adm.admit("192.0.2.20"), SOURCE_PENALIZED)
    assert adm.penalty("192.0.2.20") == before


def test_penalty_is_capped_at_the_maximum(clock: FakeClock) -> None:
    adm = make(clock)
    for _ in range(500):
        adm.record_failure("192.0.2.20", GRACE_EXCEEDED)
    assert adm.penalty("192.0.2.20") == pytest.approx(600)
    clock.advance(599)
    assert adm.is_penalized("192.0.2.20")
    clock.advance(1)
    assert not adm.is_penalized("192.0.2.20")


def test_a_connection_is_penalized_once_for_the_worst_thing_it_did(clock: FakeClock) -> None:
    adm = make(clock)
    t = ticket(adm.admit("192.0.2.1"))
    t.kex_completed()
    for _ in range(6):
        t.auth_failed()
    assert t.closed() == AUTHFAIL
    assert adm.penalty("192.0.2.1") == pytest.approx(5)

    t = ticket(adm.admit("192.0.2.2"))
    t.kex_completed()
    t.auth_failed()
    t.grace_exceeded()
    t.auth_failed()
    assert t.closed() == GRACE_EXCEEDED
    assert adm.penalty("192.0.2.2") == pytest.approx(10)

    t = ticket(adm.admit("192.0.2.3"))  # a scanner: connects, says nothing, leaves
    assert t.closed() == NOAUTH
    assert adm.penalty("192.0.2.3") == pytest.approx(1)
    assert dict(adm.stats().penalties_total) == {NOAUTH: 1, AUTHFAIL: 1, GRACE_EXCEEDED: 1}


def test_failed_attempts_are_forgiven_by_a_successful_login(clock: FakeClock) -> None:
    adm = make(clock)
    for _ in range(30):
        t = ticket(adm.admit("198.51.100.7"))
        t.kex_completed()
        t.auth_failed()
        t.auth_failed()
        t.authenticated()
        assert t.closed() is None
    assert adm.penalty("198.51.100.7") == 0


def test_gateway_side_closes_cost_the_source_nothing(clock: FakeClock) -> None:
    """Draining, or the keystore down: not the client's fault, not the client's penalty."""
    adm = make(clock)
    for _ in range(50):
        t = ticket(adm.admit("198.51.100.7"))
        t.kex_completed()
        t.auth_failed()
        assert t.closed(penalize=False) is None
    assert adm.penalty("198.51.100.7") == 0
    good_login(adm, "198.51.100.7")


def test_back_off_grows_for_a_source_that_keeps_failing(clock: FakeClock) -> None:
    adm = make(clock)
    peer = "192.0.2.20"
    blocks = []
    for _ in range(9):
        while not adm.is_penalized(peer):
            failed_login(adm, peer)
            clock.advance(0.05)
        blocked = adm.penalty(peer)
        blocks.append(round(blocked))
        clock.advance(blocked)
    # 4 x 5 s, then 2 x 10 s, then 1 x 20 s, then one failure each at 40, 80, 160 ... 600 s.
    assert blocks == [20, 20, 20, 40, 80, 160, 320, 600, 600]


def test_back_off_level_is_forgiven_after_quiet_time(clock: FakeClock) -> None:
    adm = make(clock, penalty_backoff_decay_seconds=600)
    peer = "192.0.2.20"
    for _ in range(3):  # three blocks: level 3, so penalties are multiplied by 2**3
        while not adm.is_penalized(peer):
            failed_login(adm, peer)
        clock.advance(adm.penalty(peer))
    assert adm.record_failure(peer, NOAUTH) == pytest.approx(8)  # under the minimum
    clock.advance(8)

    clock.advance(2 * 600 - 1)  # one quiet period (not quite two): level 2 ...
    assert adm.record_failure(peer, NOAUTH) == pytest.approx(4)
    clock.advance(4 + 2 * 600)  # ... counted again from the end of that penalty: level 0
    assert adm.record_failure(peer, NOAUTH) == pytest.approx(1)
    clock.advance(1)
    failed_login(adm, peer)
    assert adm.penalty(peer) == pytest.approx(5)  # back to OpenSSH's plain 5 s


def test_back_off_factor_one_is_plain_accumulation(clock: FakeClock) -> None:
    adm = make(clock, penalty_backoff_factor=1.0)
    for _ in range(5):
        while not adm.is_penalized("192.0.2.20"):
            failed_login(adm, "192.0.2.20")
        assert adm.penalty("192.0.2.20") == pytest.approx(20)
        clock.advance(20)


def test_exempt_network_is_never_penalized(clock: FakeClock) -> None:
    adm = make(clock, penalty_exempt_cidrs=("192.0.2.0/24", "2001:db8:aaaa::/48"))
    for _ in range(100):
        failed_login(adm, "192.0.2.20")
        assert adm.record_failure("2001:db8:aaaa:1::5", GRACE_EXCEEDED) is None
    assert adm.penalty("192.0.2.20") == 0
    assert adm.stats().tracked_sources == 0
    good_login(adm, "192.0.2.20")
    good_login(adm, "2001:db8:aaaa:1::5")
    # Exemption is from penalties only: the per-source cap still holds.
    adm2 = make(clock, penalty_exempt_cidrs=("192.0.2.0/24",), max_unauthenticated_per_source=1)
    ticket(adm2.admit("192.0.2.20"))
    refusal(adm2.admit("192.0.2.20"), TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)


def test_an_exempt_address_inside_a_penalized_network_still_gets_in(clock: FakeClock) -> None:
    adm = make(clock, penalty_exempt_cidrs=("2001:db8:1:2::10/128",))
    for _ in range(4):
        failed_login(adm, "2001:db8:1:2::99")
    refusal(adm.admit("2001:db8:1:2::98"), SOURCE_PENALIZED)
    assert not adm.is_penalized("2001:db8:1:2::10")
    good_login(adm, "2001:db8:1:2::10")


def test_unknown_penalty_kind_is_a_programming_error(clock: FakeClock) -> None:
    adm = make(clock)
    with pytest.raises(ValueError, match="unknown penalty kind"):
        adm.record_failure("192.0.2.1", "crash")


def test_record_failure_reports_the_accumulated_penalty(clock: FakeClock) -> None:
    adm = make(clock)
    assert adm.record_failure("192.0.2.1", AUTHFAIL) == pytest.approx(5)
    clock.advance(2)
    assert adm.record_failure("192.0.2.1", NOAUTH) == pytest.approx(4)


# --------------------------------------------------------------------------- sources


def test_ipv6_sources_are_grouped_by_64(clock: FakeClock) -> None:
    adm = make(clock, max_unauthenticated_per_source=2)
    ticket(adm.admit("2001:db8:1:2::1"))
    ticket(adm.admit("2001:db8:1:2:ffff:ffff:ffff:ffff"))
    refusal(adm.admit("2001:db8:1:2:abcd::9"), TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)
    ticket(adm.admit("2001:db8:1:3::1"))  # the next /64 is another source

    adm2 = make(clock)
    for _ in range(4):
        failed_login(adm2, "2001:db8:1:3::7")
    assert adm2.is_penalized("2001:db8:1:3::abc")
    assert not adm2.is_penalized("2001:db8:1:4::7")
    assert str(adm.source("2001:db8:1:2:abcd::9")) == "2001:db8:1:2::/64"


def test_ipv4_sources_are_single_addresses(clock: FakeClock) -> None:
    adm = make(clock)
    for _ in range(4):
        failed_login(adm, "192.0.2.20")
    assert adm.is_penalized("192.0.2.20")
    assert not adm.is_penalized("192.0.2.21")
    assert str(adm.source("192.0.2.20")) == "192.0.2.20/32"


def test_ipv4_mapped_ipv6_addresses_count_as_ipv4(clock: FakeClock) -> None:
    adm = make(clock, max_unauthenticated_per_source=2)
    ticket(adm.admit("::ffff:192.0.2.20"))
    ticket(adm.admit("192.0.2.20"))
    refusal(adm.admit("::ffff:c000:214"), TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)
    assert adm.source("::ffff:192.0.2.20") == adm.source("192.0.2.20")
    assert adm.source("::ffff:192.0.2.20").version == 4


def test_prefix_lengths_are_configurable(clock: FakeClock) -> None:
    settings = AdmissionSettings(ipv4_prefix=24, ipv6_prefix=48)
    assert source_of("192.0.2.200", settings) == source_of("192.0.2.1", settings)
    assert str(source_of("192.0.2.200", settings)) == "192.0.2.0/24"
    assert source_of("2001:db8:1:ffff::1", settings) == source_of("2001:db8:1:2::1", settings)
    assert str(source_of("2001:db8:1:2::1", settings)) == "2001:db8:1::/48"
    assert str(source_of("2001:db8:1:2::1", AdmissionSettings(ipv6_prefix=128))) == (
        "2001:db8:1:2::1/128"
    )
    assert str(source_of("192.0.2.1", AdmissionSettings(ipv4_prefix=0))) == "0.0.0.0/0"


def test_ipv6_scope_ids_are_ignored() -> None:
    assert source_of("fe80::1%eth0") == source_of("fe80::2")


@pytest.mark.parametrize("peer", [None, "", "not an address", "192.0.2.300", "/run/sock"])
def test_unparseable_peer_addresses_are_one_shared_source(
    clock: FakeClock, peer: str | None
) -> None:
    adm = make(clock, max_unauthenticated_per_source=1)
    assert adm.source(peer) == Source(0, 0, 0)
    assert str(adm.source(peer)) == "unknown"
    ticket(adm.admit(peer))
    refusal(adm.admit(None), TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)
    ticket(adm.admit("192.0.2.1"))


# --------------------------------------------------------------------------- bounded memory


def _v4(i: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + i))


def _v6(i: int) -> str:
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) | (i << 64) | 1))


def test_table_is_bounded(clock: FakeClock) -> None:
    adm = make(clock, max_tracked_sources=100)
    for i in range(10_000):
        adm.record_failure(_v4(i), GRACE_EXCEEDED)
        adm.record_failure(_v4(i), GRACE_EXCEEDED)  # 20 s: every one of them is penalized
    stats = adm.stats()
    assert stats.tracked_sources == 100
    assert stats.evicted_total == 9_900
    # The most recent are remembered; the oldest were forgotten.
    assert adm.is_penalized(_v4(9_999))
    assert not adm.is_penalized(_v4(0))


def test_a_penalized_source_that_keeps_knocking_is_not_the_one_forgotten(
    clock: FakeClock,
) -> None:
    adm = make(clock, max_tracked_sources=10)
    for _ in range(4):
        failed_login(adm, "192.0.2.20")
    for i in range(100):
        adm.record_failure(_v4(i), AUTHFAIL)
        refusal(adm.admit("192.0.2.20"), SOURCE_PENALIZED)  # still knocking
    assert adm.is_penalized("192.0.2.20")


def test_an_ipv6_flood_does_not_flush_ipv4_penalties(clock: FakeClock) -> None:
    adm = make(clock, max_tracked_sources=50)
    for _ in range(4):
        failed_login(adm, "192.0.2.20")
    for i in range(5_000):
        adm.record_failure(_v6(i), GRACE_EXCEEDED)
    assert adm.is_penalized("192.0.2.20")
    assert adm.stats().tracked_sources == 51


def test_records_with_nothing_left_to_remember_are_dropped_as_the_table_turns_over(
    clock: FakeClock,
) -> None:
    adm = make(clock, max_tracked_sources=1000)
    for i in range(1000):
        adm.record_failure(_v4(i), NOAUTH)  # 1 s each, never penalized
        clock.advance(0.5)
    # Each new record clears up to two expired ones from the old end: no eviction is needed.
    assert adm.stats().evicted_total == 0
    assert adm.stats().tracked_sources < 10


def test_open_connection_counts_are_bounded_by_the_full_mark(clock: FakeClock) -> None:
    adm = make(clock, startups_start=50, startups_full=100, max_unauthenticated_per_source=1)
    for i in range(10_000):
        adm.admit(_v6(i))
    stats = adm.stats()
    assert stats.unauthenticated == 100
    assert stats.sources_with_unauthenticated == 100


# --------------------------------------------------------------------------- tickets


def test_kex_grace_is_exposed_and_tracked(clock: FakeClock) -> None:
    adm = make(clock, kex_grace_seconds=7.5)
    assert adm.settings.kex_grace_seconds == 7.5
    t = ticket(adm.admit("192.0.2.1"))
    slow = ticket(adm.admit("192.0.2.2"))
    assert t.kex_pending and slow.kex_pending
    assert adm.stats().awaiting_kex == 2
    t.kex_completed()
    assert not t.kex_pending
    assert adm.stats().awaiting_kex == 1
    assert adm.stats().unauthenticated == 2

    clock.advance(7.5)  # the server's timer fires: slow is still in key exchange
    assert slow.kex_pending
    slow.grace_exceeded()
    assert slow.closed() == GRACE_EXCEEDED
    assert adm.penalty("192.0.2.2") == pytest.approx(10)
    assert adm.stats().awaiting_kex == 0


def test_ticket_methods_are_idempotent_and_counts_never_go_negative(clock: FakeClock) -> None:
    adm = make(clock)
    t = ticket(adm.admit("192.0.2.1"))
    t.kex_completed()
    t.kex_completed()
    t.authenticated()
    t.authenticated()
    t.auth_failed()  # after success: ignored
    t.grace_exceeded()
    assert t.is_authenticated
    assert t.closed() is None
    assert t.closed() is None
    t.authenticated()
    t.kex_completed()
    assert t.is_closed

    u = ticket(adm.admit("192.0.2.1"))
    assert u.closed() == NOAUTH
    assert u.closed() is None
    u.authenticated()

    stats = adm.stats()
    assert (stats.unauthenticated, stats.awaiting_kex, stats.sources_with_unauthenticated) == (
        0,
        0,
        0,
    )
    assert adm.penalty("192.0.2.1") == pytest.approx(1)


def test_authenticating_before_kex_is_reported_still_balances_the_counts(
    clock: FakeClock,
) -> None:
    adm = make(clock)
    t = ticket(adm.admit("192.0.2.1"))
    t.authenticated()
    t.kex_completed()
    assert adm.stats().awaiting_kex == 0
    assert adm.stats().unauthenticated == 0


def test_stats_report_counts_and_totals(clock: FakeClock) -> None:
    adm = make(clock, max_unauthenticated_per_source=2)
    a = ticket(adm.admit("192.0.2.1"))
    ticket(adm.admit("192.0.2.1"))
    refusal(adm.admit("192.0.2.1"), TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)
    ticket(adm.admit("192.0.2.2")).kex_completed()
    a.closed()

    stats = adm.stats()
    assert stats.unauthenticated == 2
    assert stats.awaiting_kex == 1
    assert stats.sources_with_unauthenticated == 2
    assert stats.largest_source_unauthenticated == 1
    assert stats.tracked_sources == 1
    assert stats.admitted_total == 3
    assert set(stats.refused_total) == set(REFUSAL_CODES)
    assert stats.refused_total[TOO_MANY_UNAUTHENTICATED_FROM_SOURCE] == 1
    assert set(stats.penalties_total) == set(PENALTY_KINDS)
    assert stats.penalties_total[NOAUTH] == 1
    assert stats.penalized_total == 0
    with pytest.raises(TypeError):
        stats.refused_total[SOURCE_PENALIZED] = 5  # type: ignore[index]


def test_counts_stay_consistent_under_random_traffic() -> None:
    """Thousands of random events from a few sources: the books always balance."""
    gen = random.Random(20240607)
    clock = FakeClock()
    adm = Admission(
        AdmissionSettings(
            max_unauthenticated_per_source=5,
            startups_start=12,
            startups_full=30,
            max_tracked_sources=6,
        ),
        clock=clock,
        rng=gen.random,
    )
    peers = [_v4(i) for i in range(9)] + [_v6(i) for i in range(9)] + ["::ffff:10.0.0.1", None]
    sources = {adm.source(peer) for peer in peers}
    busy = peers + [_v4(0)] * 10  # one source connects far more often than the others
    live: list[Ticket] = []
    for _ in range(5_000):
        op = gen.random()
        if op < 0.35:
            r = adm.admit(gen.choice(busy))
            if isinstance(r, Ticket):
                live.append(r)
        elif op < 0.85 and live:
            t = gen.choice(live)
            action = gen.choice(
                ["kex", "fail", "grace", "auth", "close", "close_quiet", "close", "close"]
            )
            if action == "kex":
                t.kex_completed()
            elif action == "fail":
                t.auth_failed()
            elif action == "grace":
                t.grace_exceeded()
            elif action == "auth":
                t.authenticated()
            else:
                t.closed(penalize=action == "close")
                live.remove(t)
        elif op < 0.9:
            adm.record_failure(gen.choice(peers), gen.choice(PENALTY_KINDS))
        else:
            clock.advance(gen.choice([0.1, 1, 5, 30, 700]))

        unauth = [t for t in live if not t.is_authenticated]
        stats = adm.stats()
        assert stats.unauthenticated == len(unauth)
        assert stats.awaiting_kex == sum(t.kex_pending for t in live)
        assert stats.unauthenticated <= 30
        assert stats.tracked_sources <= 6 + 6 + 1  # IPv4, IPv6, unknown
        held = {src: 0 for src in sources}
        for t in unauth:
            held[t.source] += 1
        assert max(held.values()) <= 5
        assert stats.sources_with_unauthenticated == sum(1 for n in held.values() if n)
        for peer in peers:
            assert adm.unauthenticated_from(peer) == held[adm.source(peer)]

    # The run went through every kind of refusal and penalty, and turned the table over.
    stats = adm.stats()
    assert all(stats.refused_total.values()), stats.refused_total
    assert all(stats.penalties_total.values()), stats.penalties_total
    assert stats.penalized_total > 0
    assert stats.evicted_total > 0


# --------------------------------------------------------------------------- settings, purity


def test_defaults_are_sized_for_the_gateway() -> None:
    s = AdmissionSettings()
    assert (s.ipv4_prefix, s.ipv6_prefix) == (32, 64)
    assert s.max_unauthenticated_per_source >= 50
    assert (s.startups_start, s.startups_rate, s.startups_full) == (200, 30, 1000)
    assert s.startups_start >= 3 * s.max_unauthenticated_per_source
    assert (s.penalty_authfail_seconds, s.penalty_noauth_seconds) == (5, 1)
    assert (s.penalty_grace_exceeded_seconds, s.penalty_min_seconds) == (10, 15)
    assert s.penalty_max_seconds == 600
    assert s.kex_grace_seconds < 30


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ipv4_prefix": 33}, "ipv4_prefix"),
        ({"ipv6_prefix": -1}, "ipv6_prefix"),
        ({"max_unauthenticated_per_source": 0}, "max_unauthenticated_per_source"),
        ({"startups_start": 10, "startups_full": 9}, "startups_full"),
        ({"startups_rate": 101}, "startups_rate"),
        ({"startups_spared_per_source": -1}, "startups_spared_per_source"),
        ({"kex_grace_seconds": 0}, "kex_grace_seconds"),
        ({"penalty_authfail_seconds": -1}, "penalty_authfail_seconds"),
        ({"penalty_max_seconds": 0}, "penalty_max_seconds"),
        ({"penalty_backoff_factor": 0.5}, "penalty_backoff_factor"),
        ({"penalty_backoff_decay_seconds": 0}, "penalty_backoff_decay_seconds"),
        ({"max_tracked_sources": 0}, "max_tracked_sources"),
        ({"penalty_exempt_cidrs": ("10.0.0.0/33",)}, "10.0.0.0/33"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        AdmissionSettings(**kwargs)  # type: ignore[arg-type]


def test_reconfigure_keeps_open_counts_and_forgets_penalties_when_prefixes_change(
    clock: FakeClock,
) -> None:
    adm = make(clock)
    t = ticket(adm.admit("192.0.2.1"))
    for _ in range(4):
        failed_login(adm, "192.0.2.20")

    adm.reconfigure(AdmissionSettings(max_unauthenticated_per_source=1))
    assert adm.is_penalized("192.0.2.20")  # same prefixes: penalties kept
    refusal(adm.admit("192.0.2.1"), TOO_MANY_UNAUTHENTICATED_FROM_SOURCE)

    adm.reconfigure(AdmissionSettings(ipv4_prefix=24, penalty_exempt_cidrs=("10.0.0.0/8",)))
    assert not adm.is_penalized("192.0.2.20")
    t.closed(penalize=False)  # counted under its old source, released under it
    assert adm.stats().unauthenticated == 0
    assert adm.record_failure("10.1.2.3", AUTHFAIL) is None


def test_a_connection_from_before_a_prefix_change_is_penalized_under_the_new_prefix(
    clock: FakeClock,
) -> None:
    adm = make(clock)
    t = ticket(adm.admit("192.0.2.1"))
    adm.reconfigure(AdmissionSettings(ipv4_prefix=24))
    assert t.closed() == NOAUTH
    assert adm.penalty("192.0.2.200") == pytest.approx(1)
    assert adm.stats().unauthenticated == 0


def test_reconfigure_to_a_smaller_table_evicts_the_oldest(clock: FakeClock) -> None:
    adm = make(clock)
    for i in range(20):
        adm.record_failure(_v4(i), GRACE_EXCEEDED)
    adm.reconfigure(AdmissionSettings(max_tracked_sources=5))
    assert adm.stats().tracked_sources == 5
    assert adm.penalty(_v4(19)) > 0
    assert adm.penalty(_v4(0)) == 0


def test_admission_needs_no_asyncssh_asyncio_or_crypto() -> None:
    code = (
        "import sys, gateway.ssh.admission\n"
        "bad = [m for m in ('asyncssh', 'asyncio', 'cryptography') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
