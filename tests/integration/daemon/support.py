"""Helpers for the daemon tests: a real NOTIFY_SOCKET, gateways started by READY=1, HTTP."""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gateway.lab.process import GatewayProcess


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


@dataclass
class NotifiedGateway(GatewayProcess):
    """The gateway as a subprocess, considered started when it sends READY=1 to ``notify``."""

    notify: NotifySocket | None = None

    start_timeout = 60.0

    def env(self) -> dict[str, str]:
        assert self.notify is not None, "NotifiedGateway needs a NotifySocket"
        return {**super().env(), "NOTIFY_SOCKET": str(self.notify.path)}

    def wait_ready(self, timeout: float) -> None:
        assert self.notify is not None
        self.notify.wait_for("READY", "1", timeout)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
