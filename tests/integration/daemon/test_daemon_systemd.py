"""systemd citizenship: Type=notify on a real NOTIFY_SOCKET, socket activation, the unit files."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.lab.process import free_port
from gateway.lab.seed import Tenant
from tests.integration.daemon.support import NotifiedGateway, NotifySocket
from tests.integration.support import REPO, client_for

StartGateway = Callable[..., NotifiedGateway]

# A stand-in for systemd's exec step: the socket at fd 3, LISTEN_FDS=1, LISTEN_PID = our pid.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_notify_ready_watchdog_reload_and_stopping(
    tmp_path: Path, tenant: Tenant, notify: NotifySocket, start_gateway: StartGateway
) -> None:
    gw = start_gateway({"WATCHDOG_USEC": "1500000"})  # WatchdogSec=1.5s: pings every < 0.75 s
    try:
        assert gw.proc is not None
        seen = notify.seen
        ready_at = next(i for i, m in enumerate(seen) if m.get("READY") == "1")
        before = [m.get("STATUS") for m in seen[:ready_at]]
        assert "loading host keys" in before and "waiting for the database" in before
        assert seen[ready_at]["MAINPID"] == str(gw.proc.pid)
        assert "serving SSH on port" in seen[ready_at]["STATUS"]
        # READY=1 means usable: the very next login works, no waiting for a banner.
        r = client_for(gw, tmp_path).ssh(tenant.key, tenant.sandbox_id, "echo up")
        assert r.returncode == 0, r.stderr
        pings = [m for m in notify.collect(1.6) if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 3, pings

        gw.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1", 10)
        usec = int(reloading["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 10
        ready = notify.wait_for("READY", "1", 10)
        assert "serving SSH" in ready["STATUS"]

        gw.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", "1", 10)
        assert "draining" in stopping["STATUS"]
        assert gw.proc.wait(30) == 0
    finally:
        gw.stop()


def test_socket_activation_serves_the_passed_socket(
    tmp_path: Path, tenant: Tenant, start_gateway: StartGateway
) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    unused = free_port()
    wrapper = [sys.executable, "-c", ACTIVATE, str(fd)]
    gw = start_gateway(
        ssh_port=unused,  # ssh.listen says this port; the passed socket must win
        argv_prefix=wrapper,
        pass_fds=(fd,),
    )
    listener.close()  # only the gateway holds it now
    try:
        listening = gw.wait_event("listening")
        assert listening["socket_activated"] is True
        assert listening["ssh"].endswith(f":{port}")
        r = client_for(gw, tmp_path, port).ssh(tenant.key, tenant.sandbox_id, "echo activated")
        assert (r.returncode, r.stdout) == (0, b"activated\n"), r.stderr
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", unused), 1):
            pass
    finally:
        assert gw.stop() == 0


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    path = tmp_path_factory.mktemp("units")
    for unit in (REPO / "systemd").iterdir():
        text = unit.read_text()
        # verify checks that ExecStart's binary exists; here it is not installed.
        text = text.replace("/usr/local/bin/runtools-gateway", sys.executable)
        (path / unit.name).write_text(text)
    return path


def test_unit_files_verify_clean(unit_dir: Path) -> None:
    units = sorted(str(p) for p in unit_dir.iterdir())
    assert any(u.endswith(".socket") for u in units)
    r = subprocess.run(
        ["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "runtools-gateway" not in r.stderr, r.stderr


def test_unit_security_exposure_is_at_most_2(unit_dir: Path) -> None:
    r = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--no-pager",
            str(unit_dir / "runtools-gateway.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for runtools-gateway\.service: (\d+\.\d+)", out)
    assert m, out
    assert float(m.group(1)) <= 2.0, out
    unit = (unit_dir / "runtools-gateway.service").read_text()
    for needed in ("Type=notify", "WatchdogSec=", "ExecReload=", "DynamicUser=yes"):
        assert needed in unit
