"""Helpers shared by the integration areas: gateways started by a factory, OpenSSH clients,
a TCP relay we can cut. The lab parts themselves (processes, seeding, keys) are in gateway/lab.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gateway.lab.process import GatewayProcess, free_port
from gateway.lab.seed import unique
from gateway.lab.user_keys import UserKey

REPO = Path(__file__).resolve().parents[2]

G = TypeVar("G", bound=GatewayProcess)


def fresh_state(base: Path, shared_state: Path, name: str) -> Path:
    """A state dir with the shared upstream identity (sandboxes trust it) and host keys."""
    path = base / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for item in shared_state.iterdir():
        if item.name.startswith(("ssh_host_", "upstream_")):
            shutil.copy2(item, path / item.name)
    return path


class GatewayFactory:
    """Starts gateway processes and stops every one of them in :meth:`stop_all`.

    The ``gateway_factory`` fixtures (tests/integration/conftest.py) make one per test, per
    module or for the session; call it as
    ``gateway_factory({"RTGW_…": "…"}, cls=…, state_dir=…, **attributes)``.
    Unless given ``state_dir``, each gateway gets a fresh state dir holding copies of the
    shared host keys and upstream identity (the session sandbox sshd trusts it).
    """

    def __init__(self, database_url: str, shared_state: Path, base_dir: Path) -> None:
        self.database_url = database_url
        self.shared_state = shared_state
        self.base_dir = base_dir
        self.started: list[GatewayProcess] = []

    def __call__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        cls: type[G] = GatewayProcess,  # type: ignore[assignment]
        state_dir: Path | None = None,
        database_url: str | None = None,
        timeout: float | None = None,
        **attributes: Any,
    ) -> G:
        state = state_dir or fresh_state(self.base_dir, self.shared_state, unique("state"))
        gw = cls(
            database_url=database_url or self.database_url,
            state_dir=state,
            env_extra=dict(env or {}),
            **attributes,
        )
        self.started.append(gw)
        return gw.start(timeout)

    def stop_all(self) -> None:
        for gw in reversed(self.started):
            with contextlib.suppress(Exception):
                gw.stop()
        self.started.clear()

    def __enter__(self) -> GatewayFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def client_for(gw: GatewayProcess, workdir: Path, port: int | None = None) -> SshClient:
    """An OpenSSH client trusting ``gw``'s host keys (as they are now) at ``port``."""
    port = port or gw.ssh_port
    known = workdir / f"known_hosts-{port}-{time.monotonic_ns()}"
    known.write_text(gw.known_hosts_line(port))
    return SshClient(port=port, known_hosts=known, workdir=workdir)


@dataclass
class SshClient:
    """The real OpenSSH client, configured from nothing but its command line."""

    port: int
    known_hosts: Path
    workdir: Path

    def base(self, key: UserKey | Sequence[UserKey] | None, *, batch: bool = True) -> list[str]:
        cmd = [
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=0",
        ]
        if batch:
            cmd += ["-o", "BatchMode=yes"]
        keys = [key] if isinstance(key, UserKey) else list(key or [])
        cmd += ["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]
        for k in keys:
            cmd += ["-i", str(k.path)]
        return cmd

    def ssh(
        self,
        key: UserKey | Sequence[UserKey] | None,
        login: str,
        *remote: str,
        options: Sequence[str] = (),
        input: bytes | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = [
            "ssh",
            *self.base(key),
            "-p",
            str(self.port),
            *options,
            f"{login}@127.0.0.1",
            *remote,
        ]
        return subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def scp(
        self, key: UserKey, *args: str, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = ["scp", *self.base(key), "-P", str(self.port), *args]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def sftp(
        self, key: UserKey, login: str, batch: str, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        batch_file = self.workdir / f"sftp-{uuid.uuid4().hex[:8]}.batch"
        batch_file.write_text(batch)
        cmd = [
            "sftp",
            *self.base(key),
            "-P",
            str(self.port),
            "-b",
            str(batch_file),
            f"{login}@127.0.0.1",
        ]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def ssh_command_for_rsync(self, key: UserKey) -> str:
        return " ".join(["ssh", *self.base(key), "-p", str(self.port)])


class TcpRelay:
    """A loopback TCP forwarder we can cut, to take a database away from a running gateway."""

    def __init__(self, target_host: str, target_port: int, url_template: str) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.url = url_template.replace("{port}", str(self.port))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stopped = False

    @classmethod
    def to_url(cls, url: str) -> TcpRelay:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 5432
        netloc = parts.netloc.rsplit("@", 1)
        userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
        template = parts._replace(netloc=f"{userinfo}127.0.0.1:{{port}}").geturl()
        return cls(host, port, template)

    def start(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stopped = True
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave the
            # socket listening until that accept() returned.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            self._sockets.clear()
