"""SIGHUP reloads without dropping a session; SIGTERM drains: users told, deadline kept, exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.lab.process import free_port
from gateway.lab.seed import Tenant, run_db
from tests.integration.daemon.support import NotifiedGateway, NotifySocket, http_get
from tests.integration.support import client_for

StartGateway = Callable[..., NotifiedGateway]


def _session_starts(gw: Any) -> int:
    return len([e for e in gw.events("audit") if e.get("action") == "ssh.session.start"])


def _wait_sessions(gw: Any, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _session_starts(gw) < n:
        assert time.monotonic() < deadline, gw.log_tail()
        time.sleep(0.05)


def test_sighup_keeps_live_sessions_and_serves_the_new_host_key(
    tmp_path: Path, tenant: Tenant, notify: NotifySocket, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    state = gw.state_dir
    try:
        assert gw.proc is not None
        old = client_for(gw, tmp_path)
        live = subprocess.Popen(
            [
                "ssh",
                *old.base(tenant.key),
                "-p",
                str(gw.ssh_port),
                f"{tenant.sandbox_id}@127.0.0.1",
                "sleep 3; echo done",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        _wait_sessions(gw, 1)
        old_line = (state / "ssh_host_ed25519_key.pub").read_text().split()
        for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
            (state / name).unlink()
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                str(state / "ssh_host_ed25519_key"),
            ],
            check=True,
        )
        new_line = (state / "ssh_host_ed25519_key.pub").read_text().split()
        assert new_line[1] != old_line[1]

        gw.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1", 10)
        notify.wait_for("READY", "1", 10)
        reloaded = gw.wait_event("reloaded")
        assert len(reloaded["host_keys"]) == 3

        out, err = live.communicate(timeout=30)
        assert (live.returncode, out) == (0, b"done\n"), err

        only_ed25519 = ["-o", "HostKeyAlgorithms=ssh-ed25519"]
        fresh = client_for(gw, tmp_path)  # known_hosts from the state dir: the new key
        r = fresh.ssh(tenant.key, tenant.sandbox_id, "echo new-key", options=only_ed25519)
        assert (r.returncode, r.stdout) == (0, b"new-key\n"), r.stderr
        stale = old.ssh(tenant.key, tenant.sandbox_id, "true", options=only_ed25519)
        assert stale.returncode == 255
        assert b"HOST IDENTIFICATION HAS CHANGED" in stale.stderr
        assert gw.stop() == 0
    finally:
        gw.stop()


def test_sigterm_drains_tells_users_and_ends_sessions_at_the_deadline(
    database_url: str,
    tmp_path: Path,
    tenant: Tenant,
    notify: NotifySocket,
    start_gateway: StartGateway,
) -> None:
    http = free_port()
    gw = start_gateway(
        {"RTGW_SSH_DRAIN_TIMEOUT_SECONDS": "2", "RTGW_METRICS_LISTEN": f"127.0.0.1:{http}"}
    )
    client = client_for(gw, tmp_path)
    base = [
        "ssh",
        *client.base(tenant.key),
        "-p",
        str(gw.ssh_port),
        f"{tenant.sandbox_id}@127.0.0.1",
    ]

    def spawn(command: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*base, command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

    try:
        assert gw.proc is not None
        assert http_get(http, "/readyz")[0] == 200
        long = spawn("echo started; sleep 30; echo never")
        short = spawn("sleep 1.5; echo finished")
        _wait_sessions(gw, 2)
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", 5)
        status, body = http_get(http, "/readyz")
        assert status == 503 and json.loads(body)["checks"]["not_draining"] is False

        out, err = short.communicate(timeout=30)
        assert (short.returncode, out) == (0, b"finished\n"), err
        assert b"the gateway is restarting" in err

        out, err = long.communicate(timeout=30)
        ended = time.monotonic() - t0
        assert long.returncode == 255, err
        assert out == b"started\n"
        assert b"the gateway is restarting; your session will end in 2 s" in err
        assert 1.5 < ended < 8, ended
        assert gw.proc.wait(30) == 0
    finally:
        gw.stop()

    rows = run_db(
        database_url,
        lambda c: c.fetch(
            "SELECT result, reason, details FROM audit_events "
            "WHERE org_id = $1 AND action = 'ssh.session.end' ORDER BY id",
            tenant.org_id,
        ),
    )
    ends = [(r["result"], r["reason"], json.loads(r["details"])["exit_status"]) for r in rows]
    assert sorted(ends, key=str) == sorted(
        [("ok", None, 0), ("error", "gateway_draining", 255)], key=str
    )
