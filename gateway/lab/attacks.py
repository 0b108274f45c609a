"""Abuse traffic for tests and the soak bench, from loopback addresses other than 127.0.0.1.

A client socket bound to 127.0.0.2 is another source to the gateway (which listens on
127.0.0.1), so attackers and legitimate users can be told apart on one machine. Every loop
here is bounded by its context manager: leaving the ``with`` block stops it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import asyncssh


class IdleHolder:
    """One source holding ``count`` silent TCP connections, reopening each as it is dropped."""

    def __init__(self, port: int, source: str, count: int) -> None:
        self.port, self.source, self.count = port, source, count
        self.opened = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(count)]

    def _hold(self) -> None:
        while not self._stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), 2, (self.source, 0))
            except OSError:
                time.sleep(0.05)
                continue
            self.opened += 1
            s.settimeout(0.5)
            try:
                while not self._stop.is_set():
                    try:
                        if s.recv(4096) == b"":
                            break  # dropped by the gateway: reopen
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                s.close()
            # Reopen at once, but yield the CPU: the attacker's own cost runs on this machine
            # too, and must not be mistaken for the gateway's.
            time.sleep(0.02)

    def __enter__(self) -> IdleHolder:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


class FailingLogins:
    """One source making ``per_second`` failing logins (an unregistered key) until stopped."""

    def __init__(self, port: int, source: str, login: str, per_second: float) -> None:
        self.port, self.source, self.login, self.per_second = port, source, login, per_second
        self.attempts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, key: asyncssh.SSHKey) -> None:
        self.attempts += 1
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    "127.0.0.1",
                    self.port,
                    local_addr=(self.source, 0),
                    username=self.login,
                    client_keys=[key],
                    known_hosts=None,
                    agent_path=None,
                    config=None,
                ),
                5,
            )
            conn.close()
        except (OSError, TimeoutError, asyncssh.Error):
            pass

    async def _run(self) -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        tasks: set[asyncio.Task[None]] = set()
        while not self._stop.is_set():
            task = asyncio.create_task(self._one(key))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / self.per_second)
        for task in list(tasks):
            task.cancel()

    def __enter__(self) -> FailingLogins:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
