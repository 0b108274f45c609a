"""Real processes for integration tests: the gateway as a subprocess, OpenSSH clients, keys."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_banner(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
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


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class UserKey:
    path: Path

    @property
    def pub(self) -> Path:
        return self.path.with_name(self.path.name + ".pub")

    @property
    def public_line(self) -> str:
        return self.pub.read_text().strip()


def make_key(directory: Path, name: str, kind: str = "ed25519", bits: int | None = None) -> UserKey:
    path = directory / name
    cmd = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"{name}@test", "-f", str(path)]
    if bits:
        cmd += ["-b", str(bits)]
    subprocess.run(cmd, check=True)
    return UserKey(path)


@dataclass
class GatewayProcess:
    """``python -m gateway serve`` with its own state dir and log file."""

    database_url: str
    state_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    ssh_port: int = 0
    api_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "gateway.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RTGW_DATABASE_URL=self.database_url,
            RTGW_SSH_LISTEN=f"127.0.0.1:{self.ssh_port}",
            RTGW_API_LISTEN=f"127.0.0.1:{self.api_port}",
            RTGW_STATE_DIR=str(self.state_dir),
            RTGW_LOG_LEVEL="debug",
            RTGW_UPSTREAM_CONNECT_TIMEOUT_SECONDS="3",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env_extra)
        return env

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ssh_port = self.ssh_port or free_port()
        self.api_port = self.api_port or free_port()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()
        try:
            wait_for_banner(self.ssh_port, timeout, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError("gateway did not start:\n" + self.log_tail()) from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
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

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def known_hosts_line(self) -> str:
        keys = []
        for name in ("ssh_host_ed25519_key.pub", "ssh_host_ecdsa_key.pub", "ssh_host_rsa_key.pub"):
            parts = (self.state_dir / name).read_text().split()
            keys.append(f"[127.0.0.1]:{self.ssh_port} {parts[0]} {parts[1]}")
        return "\n".join(keys) + "\n"


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
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self.url = url_template.replace("{port}", str(self.port))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stopped = False

    @classmethod
    def to_url(cls, url: str) -> TcpRelay:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 5432
        netloc = parts.netloc.rsplit("@", 1)
        userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
        template = parts._replace(netloc=f"{userinfo}127.0.0.1:{{port}}").geturl()
        return cls(host, port, template)

    def start(self) -> None:
        import threading

        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

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
