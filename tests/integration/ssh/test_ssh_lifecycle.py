"""A real terminal, and what happens when either side goes away."""

from __future__ import annotations

import random
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from gateway.lab.seed import Tenant, unique
from tests.integration.support import SshClient


def _wait(predicate, timeout: float, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by scripts/bootstrap")
def test_terminal_size_and_resizes_reach_the_sandbox(ssh_client: SshClient, tenant: Tenant) -> None:
    session = unique("tmux")
    cmd = shlex.join(
        [
            "ssh",
            *ssh_client.base(tenant.key),
            "-p",
            str(ssh_client.port),
            "-tt",
            f"{tenant.sandbox_id}@127.0.0.1",
        ]
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "40", cmd], check=True
    )

    def screen() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
        ).stdout

    def type_line(text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", session, text, "Enter"], check=True)

    try:
        assert _wait(lambda: "$" in screen(), 15), screen()
        type_line("echo size=$(stty size)")
        assert _wait(lambda: "size=40 100" in screen(), 10), screen()
        subprocess.run(
            ["tmux", "resize-window", "-t", session, "-x", "120", "-y", "30"], check=True
        )
        time.sleep(0.3)
        type_line("echo size=$(stty size) term=$TERM")
        assert _wait(lambda: "size=30 120" in screen(), 10), screen()
        type_line("exit")
        assert _wait(
            lambda: (
                subprocess.run(
                    ["tmux", "has-session", "-t", session], capture_output=True
                ).returncode
                != 0
            ),
            10,
        )
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_when_the_client_vanishes_the_sandbox_session_is_hung_up(
    ssh_client: SshClient, tenant: Tenant
) -> None:
    marker = f"{random.randint(1000, 9999)}.{random.randint(100, 999)}"
    proc = subprocess.Popen(
        [
            "ssh",
            *ssh_client.base(tenant.key),
            "-p",
            str(ssh_client.port),
            "-tt",
            f"{tenant.sandbox_id}@127.0.0.1",
            f"sleep {marker}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait(lambda: _running(f"sleep {marker}"), 15)
        proc.send_signal(signal.SIGKILL)  # no goodbye: the TCP connection just drops
        proc.wait(5)
        assert _wait(lambda: not _running(f"sleep {marker}"), 15)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_when_the_sandbox_session_dies_the_client_is_told_and_exits(
    ssh_client: SshClient, tenant: Tenant
) -> None:
    t0 = time.monotonic()
    # Kill the sandbox's own sshd session process: the upstream channel drops with no exit status.
    r = ssh_client.ssh(
        tenant.key,
        tenant.sandbox_id,
        "echo started; sleep 0.5; kill -9 $PPID; sleep 30",
        timeout=30,
    )
    assert time.monotonic() - t0 < 15
    assert r.returncode == 255
    assert r.stdout == b"started\n"
    assert b"runtools:" in r.stderr
