"""Helpers for the daemon tests: a real NOTIFY_SOCKET, gateways started by READY=1, log parsing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import REPO, GatewayProcess, SshClient, free_port


class NotifySocket:
    """A real sd_notify receiver: an AF_UNIX datagram socket, as systemd provides."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[dict[str, str]] = []
        self.seen: list[dict[str, str]] = []  # everything ever received, in order

    def _drain(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
                self.messages.append(fields)
                self.seen.append(fields)
                self.sock.settimeout(0.01)
        except (TimeoutError, BlockingIOError):
            return

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0) -> dict[str, str]:
        """The first message not seen by an earlier wait_for that has ``key`` (= ``value``)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.messages):
                if key in msg and (value is None or msg[key] == value):
                    del self.messages[: i + 1]
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key}={value} notification within {timeout} s")
            self._drain(min(left, 0.2))

    def collect(self, seconds: float) -> list[dict[str, str]]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._drain(0.05)
        out, self.messages = self.messages, []
        return out

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def fresh_state(base: Path, shared_state: Path, name: str) -> Path:
    """A state dir with the shared upstream identity (sandboxes trust it) and host keys."""
    path = base / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for item in shared_state.iterdir():
        if item.name.startswith(("ssh_host_", "upstream_")):
            shutil.copy2(item, path / item.name)
    return path


class NotifiedGateway(GatewayProcess):
    """The gateway as a subprocess, considered started when it sends READY=1."""

    notify: NotifySocket | None = None
    argv_prefix: list[str] | None = None
    pass_fds: tuple[int, ...] = ()
    config_file: Path | None = None

    def start(self, timeout: float = 60.0) -> NotifiedGateway:
        assert self.notify is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ssh_port = self.ssh_port or free_port()
        self.api_port = self.api_port or free_port()
        env = self.env()
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        args = [sys.executable, "-m", "gateway"]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        args.append("serve")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*(self.argv_prefix or []), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            pass_fds=self.pass_fds,
        )
        log.close()
        try:
            self.notify.wait_for("READY", "1", timeout)
        except TimeoutError:
            self.stop(signal.SIGKILL)
            raise RuntimeError("gateway never sent READY=1:\n" + self.log_tail()) from None
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(name):
                if pred(event):
                    return event
            time.sleep(0.05)
        raise TimeoutError(f"no {name} log event within {timeout} s:\n{self.log_tail()}")


def start_gateway(
    database_url: str,
    state: Path,
    notify: NotifySocket,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> NotifiedGateway:
    gw = NotifiedGateway(database_url=database_url, state_dir=state, env_extra=dict(env or {}))
    gw.notify = notify
    for key, value in kwargs.items():
        setattr(gw, key, value)
    return gw.start()


def client_for(gw: GatewayProcess, workdir: Path, port: int | None = None) -> SshClient:
    port = port or gw.ssh_port
    known = workdir / f"known_hosts-{port}-{time.monotonic_ns()}"
    keys = []
    for name in ("ssh_host_ed25519_key.pub", "ssh_host_ecdsa_key.pub", "ssh_host_rsa_key.pub"):
        parts = (gw.state_dir / name).read_text().split()
        keys.append(f"[127.0.0.1]:{port} {parts[0]} {parts[1]}")
    known.write_text("\n".join(keys) + "\n")
    return SshClient(port=port, known_hosts=known, workdir=workdir)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
