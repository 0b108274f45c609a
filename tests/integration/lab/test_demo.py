"""The README's first command: the demo comes up, lets you in, and leaves nothing behind."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.lab.process import free_port
from gateway.lab.user_keys import UserKey
from tests.integration.support import REPO


class Output:
    """The demo's stdout, read by a thread (a buffered pipe would hide lines from select())."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import queue
        import threading

        assert proc.stdout is not None
        stream = proc.stdout
        self._q: queue.Queue[str | None] = queue.Queue()
        self.lines: list[str] = []

        def pump() -> None:
            for line in stream:
                self._q.put(line.rstrip("\n"))
            self._q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, marker: str | None, timeout: float) -> list[str]:
        """Lines up to the one containing ``marker`` (None: up to end of output)."""
        import queue

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                if marker is None:
                    return self.lines
                break
            self.lines.append(line)
            if marker is not None and marker in line:
                return self.lines
        raise AssertionError(f"no {marker!r} in demo output:\n" + "\n".join(self.lines))


def test_demo_starts_lets_the_user_in_and_stops_cleanly(
    user_key: UserKey, private_tmpdir: Path
) -> None:
    key = user_key
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--key", str(key.pub)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(private_tmpdir)),
    )
    try:
        output = Output(proc)
        lines = output.until("Press Ctrl-C", timeout=90)
        ssh_line = lines[lines.index("Connect with:") + 1].strip()
        cmd = shlex.split(ssh_line)
        assert cmd[0] == "ssh" and cmd[-1] == "sandbox-demo@127.0.0.1"
        # Exactly the printed line, plus our key and no prompts.
        cmd[1:1] = [
            "-F",
            "/dev/null",
            "-i",
            str(key.path),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ]
        r = subprocess.run(
            [*cmd, "echo hello from $(whoami); exit 9"],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 9, r.stderr
        assert r.stdout.startswith(b"hello from ")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out = "\n".join(output.until(None, timeout=60))
            proc.wait(10)
        except (AssertionError, subprocess.TimeoutExpired):
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "nothing left behind" in out
    assert sorted(private_tmpdir.iterdir()) == []  # PostgreSQL's, sshd's and its own dirs
    leftovers = subprocess.run(
        ["pgrep", "-f", f"Port {port}|demo --port {port}"], capture_output=True, text=True
    ).stdout.split()
    assert [p for p in leftovers if int(p) != os.getpid()] == []


def test_demo_on_a_busy_port_says_which_option_to_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
    assert r.returncode == 1
    assert f"port {port} is in use" in r.stderr and "--port" in r.stderr
