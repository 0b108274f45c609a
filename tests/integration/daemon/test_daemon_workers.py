"""process.workers: processes share the SSH port, all serve, a crashed one comes back."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.lab.process import free_port
from gateway.lab.seed import Tenant
from tests.integration.daemon.support import NotifiedGateway, NotifySocket, http_get
from tests.integration.support import client_for


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def test_two_workers_share_the_port_and_both_serve(
    tmp_path: Path,
    tenant: Tenant,
    notify: NotifySocket,
    start_gateway: Callable[..., NotifiedGateway],
) -> None:
    http = free_port()
    gw = start_gateway({"RTGW_PROCESS_WORKERS": "2", "RTGW_METRICS_LISTEN": f"127.0.0.1:{http}"})
    try:
        assert gw.proc is not None
        supervisor = gw.proc.pid
        workers = _children(supervisor)
        assert len(workers) == 2, workers
        # Only the supervisor spoke to our NOTIFY_SOCKET, and READY=1 came once for the group.
        ready = [m for m in notify.seen if m.get("READY") == "1"]
        assert len(ready) == 1 and ready[0]["MAINPID"] == str(supervisor)
        assert ready[0]["STATUS"] == "2 of 2 workers serving SSH"

        client = client_for(gw, tmp_path)

        def login(i: int) -> int:
            r = client.ssh(tenant.key, tenant.sandbox_id, f"echo {i}")
            assert r.stdout == f"{i}\n".encode(), r.stderr
            return r.returncode

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(login, range(16))) == {0}
        served = {e["pid"] for e in gw.events("auth_ok")}
        assert served == workers, (served, workers)

        # Metrics from worker 0 add up every worker's logins.
        status, body = http_get(http, "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        ok = sum(
            s.value
            for s in families["rtgw_auth"].samples
            if s.name == "rtgw_auth_total" and s.labels["result"] == "ok"
        )
        assert ok == 16

        # A crashed worker is restarted and serving again.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            now = _children(supervisor)
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < deadline, gw.log_tail()
            time.sleep(0.1)
        gw.wait_event("worker_exited", lambda e: e.get("worker_pid") == victim)
        replacement = (now - workers).pop()
        gw.wait_event("listening", lambda e: e.get("pid") == replacement)
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(login, range(8))) == {0}

        gw.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1", 10)
        notify.wait_for("READY", "1", 15)

        gw.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", 10)
        assert gw.proc.wait(30) == 0
        assert not any(Path(f"/proc/{p}").exists() for p in now)
    finally:
        gw.stop()
