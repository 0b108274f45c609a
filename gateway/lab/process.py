"""The gateway as a real subprocess (``python -m gateway serve``), for the tests and the bench.

Each :class:`GatewayProcess` has its own state dir (host keys, upstream key, log file) and its
own ports, and is configured through ``RTGW_*`` variables only. ``start()`` returns once the SSH
port answers with a banner; subclasses may wait for something else (``wait_ready``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from gateway.lab.host import free_port

__all__ = ["REPO", "GatewayProcess", "free_port", "wait_for_banner"]

# The source checkout gateway.lab lives in (it is not shipped in the wheel): the working
# directory of the subprocesses, so ``python -m gateway`` runs this very tree.
REPO = Path(__file__).resolve().parents[2]
HOST_KEY_FILES = ("ssh_host_ed25519_key.pub", "ssh_host_ecdsa_key.pub", "ssh_host_rsa_key.pub")


def wait_for_banner(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until 127.0.0.1:``port`` answers ``SSH-2.0-``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.settimeout(1.0)
            if s.recv(64).startswith(b"SSH-2.0-"):
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered SSH on port {port} within {timeout} s")


@dataclass
class GatewayProcess:
    """``python -m gateway serve`` with its own state dir and log file.

    :param env_extra: ``RTGW_*`` (or any) variables set on top of the defaults of :meth:`env`.
    :param ssh_port: / :param api_port: / :param metrics_port: 0 picks a free port at
        ``start()``. ``metrics_port`` is the ops listener (/metrics, /healthz, /readyz,
        ``RTGW_METRICS_LISTEN``); with ``RTGW_METRICS_LISTEN`` in ``env_extra`` it is the port
        given there (the API port for "").
    :param config_file: passed as ``--config``.
    :param argv_prefix: run the gateway through this command (e.g. a socket-activation shim).
    :param pass_fds: file descriptors the subprocess inherits.
    """

    database_url: str
    state_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    ssh_port: int = 0
    api_port: int = 0
    metrics_port: int = 0
    config_file: Path | None = None
    argv_prefix: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    start_timeout = 30.0

    @property
    def log_path(self) -> Path:
        return self.state_dir / "gateway.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the gateway is not running"
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RTGW_DATABASE_URL=self.database_url,
            RTGW_SSH_LISTEN=f"127.0.0.1:{self.ssh_port}",
            RTGW_API_LISTEN=f"127.0.0.1:{self.api_port}",
            RTGW_METRICS_LISTEN=f"127.0.0.1:{self.metrics_port}",
            RTGW_STATE_DIR=str(self.state_dir),
            RTGW_LOG_LEVEL="debug",
            RTGW_UPSTREAM_CONNECT_TIMEOUT_SECONDS="3",
            # Tests and the bench log in from 127.0.0.1 over and over, failures included;
            # tests of penalties attack from other loopback addresses (127.0.0.x).
            RTGW_ADMISSION_PENALTY_EXEMPT_CIDRS="127.0.0.1/32",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env_extra)
        return env

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "gateway"]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        return [*self.argv_prefix, *args, "serve"]

    def start(self, timeout: float | None = None) -> Self:
        """Start the subprocess and wait until it is ready; on failure stop it and raise
        ``RuntimeError`` with the tail of its log."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ssh_port = self.ssh_port or free_port()
        self.api_port = self.api_port or free_port()
        listen = self.env_extra.get("RTGW_METRICS_LISTEN")
        if listen is None:
            self.metrics_port = self.metrics_port or free_port()
        elif listen == "":
            self.metrics_port = self.api_port  # served on the API listener
        else:
            self.metrics_port = int(listen.rpartition(":")[2])
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                pass_fds=self.pass_fds,
            )
        try:
            self.wait_ready(self.start_timeout if timeout is None else timeout)
        except (RuntimeError, TimeoutError) as exc:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"gateway did not start ({exc}):\n{self.log_tail()}") from None
        return self

    def wait_ready(self, timeout: float) -> None:
        """Ready means the SSH port answers with a banner."""
        wait_for_banner(self.ssh_port, timeout, self.proc)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send ``sig``, wait (SIGKILL after ``timeout``); the exit code, None if not running.

        Safe to call more than once.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def restart(self) -> None:
        """Stop and start again: same ports, keys and state."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (every one, or those with ``"event": name``), oldest first."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
        return out

    def wait_event(
        self,
        name: str,
        pred: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = 15,
    ) -> dict[str, Any]:
        """The first logged ``name`` event ``pred`` accepts; ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(name):
                if pred(event):
                    return event
            time.sleep(0.05)
        raise TimeoutError(f"no {name} log event within {timeout} s:\n{self.log_tail()}")

    def known_hosts_line(self, port: int | None = None) -> str:
        """``known_hosts`` lines for the gateway's host keys at ``[127.0.0.1]:port``."""
        port = port or self.ssh_port
        keys = []
        for name in HOST_KEY_FILES:
            parts = (self.state_dir / name).read_text().split()
            keys.append(f"[127.0.0.1]:{port} {parts[0]} {parts[1]}")
        return "\n".join(keys) + "\n"
