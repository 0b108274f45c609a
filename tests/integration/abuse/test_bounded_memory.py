"""Issue 9, finding 2: a client that stops reading cannot run the gateway out of memory.

The attack: an authenticated client advertises a 2 GiB channel window, runs ``cat /dev/zero``
in its sandbox (the real OpenSSH sshd) and stops reading its TCP socket. Before the fix the
gateway kept relaying into its transport buffer: 71 MiB -> 1,831 MiB in 8 s. Now the client's
connection pauses its channels when the transport is full, the relay stops reading the sandbox,
and the sandbox's SSH window pushes back on ``cat``: RSS stays within a few MiB. Memory is read
from /proc/<pid>/status of a gateway of this test's own.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import asyncssh

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant
from tests.integration.support import GatewayFactory

HUGE_WINDOW = 2**31 - 1
MIB = 1024 * 1024
WATCH_SECONDS = 8.0
ALLOWED_GROWTH = 32 * MIB


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class Sink(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.received = 0

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.received += len(data)


async def _until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _stop_reading(gw: GatewayProcess, tenant: Tenant) -> dict[str, Any]:
    assert tenant.key is not None
    async with asyncssh.connect(
        "127.0.0.1",
        gw.ssh_port,
        username=tenant.sandbox_id,
        client_keys=[str(tenant.key.path)],
        known_hosts=None,
        agent_path=None,
        config=None,
    ) as conn:
        chan, session = await conn.create_session(
            Sink, "cat /dev/zero", encoding=None, window=HUGE_WINDOW
        )
        sink = cast(Sink, session)
        await _until(lambda: sink.received >= 16 * MIB, 10)  # the relay streams
        before = rss(gw.pid)
        chan.pause_reading()
        transport: Any = conn._transport  # type: ignore[attr-defined]
        transport.pause_reading()  # and the socket is not read any more
        peak, t0 = before, time.monotonic()
        while time.monotonic() - t0 < WATCH_SECONDS:
            await asyncio.sleep(0.25)
            peak = max(peak, rss(gw.pid))
            if peak - before > 4 * ALLOWED_GROWTH:
                break  # failed already; do not feed the machine a gigabyte
        # Back-pressure must let go too: reading again, the stream resumes.
        transport.resume_reading()
        chan.resume_reading()
        resumed_at = sink.received
        await _until(lambda: sink.received >= resumed_at + 16 * MIB, 10)
        chan.close()
    return {"before": before, "peak": peak, "growth": peak - before}


def test_a_client_that_stops_reading_costs_the_gateway_a_few_mib(
    gateway_factory: GatewayFactory, tenant: Tenant
) -> None:
    gw: GatewayProcess = gateway_factory()
    result = asyncio.run(asyncio.wait_for(_stop_reading(gw, tenant), 40))
    print(
        f"gateway RSS {result['before'] / MIB:.1f} MiB -> peak {result['peak'] / MIB:.1f} MiB "
        f"over {WATCH_SECONDS:g} s with the client not reading"
    )
    assert result["growth"] < ALLOWED_GROWTH, result
