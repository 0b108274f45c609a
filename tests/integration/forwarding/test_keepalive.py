"""Keepalives to clients (issue 11): an idle session survives many intervals, a client that
stops answering is dropped after about interval x count. Real OpenSSH client."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant
from tests.integration.support import GatewayFactory, client_for

INTERVAL = 1
COUNT = 3


def test_idle_session_survives_and_a_silent_client_is_dropped(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    gw: GatewayProcess = gateway_factory(
        {
            "RTGW_SSH_KEEPALIVE_INTERVAL_SECONDS": str(INTERVAL),
            "RTGW_SSH_KEEPALIVE_COUNT_MAX": str(COUNT),
        }
    )
    client = client_for(gw, tmp_path)
    key = tenant.key
    assert key is not None
    argv = ["ssh", *client.base(key), "-p", str(client.port), "-tt"]
    dest = f"{tenant.sandbox_id}@127.0.0.1"
    # Idle, interactive, well past count x interval: the client answers every probe.
    t0 = time.monotonic()
    r = subprocess.run(
        [*argv, dest, "sleep 8; echo still-here"],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    assert b"still-here" in r.stdout
    assert time.monotonic() - t0 >= 8

    def stopped_for(seconds: float) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [*argv, dest, "sleep 30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        time.sleep(2.0)  # logged in, session running
        assert p.poll() is None
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(p.pid, signal.SIGCONT)
        return p

    # A short silence (under interval x count) is forgiven.
    short = stopped_for(INTERVAL * COUNT * 0.4)
    time.sleep(1.0)
    assert short.poll() is None, short.communicate()
    short.terminate()
    short.wait(10)
    # A client that stops answering is dropped after about interval x count.
    long = stopped_for(INTERVAL * (COUNT + 3))
    try:
        rc = long.wait(5)  # gone as soon as it runs again, not when sleep 30 ends
    finally:
        if long.poll() is None:
            long.kill()
            long.wait(5)
    assert rc == 255, long.communicate()
