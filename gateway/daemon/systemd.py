"""The two systemd protocols a daemon speaks: sd_notify and socket activation, without libsystemd.

sd_notify is one datagram of ``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET`` (a
leading ``@`` means the abstract namespace). With no ``NOTIFY_SOCKET`` every call is a no-op, so
the gateway behaves the same under systemd, in a container and in a terminal.

Socket activation: systemd passes listening sockets as fds 3.. and says how many in
``LISTEN_FDS``, for the process named by ``LISTEN_PID`` only (so children never take them by
mistake).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("gateway.daemon.systemd")

SD_LISTEN_FDS_START = 3


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends sd_notify messages; silent when the process was not started with NOTIFY_SOCKET."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None
        self._watchdog_seconds = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), _address(self.address))
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc), socket=self.address)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self, status: str = "reloading configuration") -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1: a third of WatchdogSec (systemd asks for < half)."""
        if self._watchdog_seconds is None or self.address is None:
            return None
        return self._watchdog_seconds / 3

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def listen_fds(env: Mapping[str, str] | None = None) -> list[int]:
    """The fds systemd passed to this very process (empty when not socket-activated)."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, count)))


def forget_listen_env() -> None:
    """What sd_listen_fds(1) does: children must not believe the fds are theirs."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)


def socket_from_fd(fd: int) -> socket.socket:
    """A listening stream socket from an inherited fd, checked and made non-inheritable."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        raise OSError(f"fd {fd} is not a stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise OSError(f"fd {fd} is not a listening socket")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock
