"""What the compat flows share: the two ends (``End``), the ``record`` signature, running a
client with a bound, a TCP echo server reachable from inside the sandbox (the sandbox's sshd is
on this machine, so 127.0.0.1 is "inside") and a minimal SOCKS5 client."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.lab.user_keys import UserKey


@dataclass(frozen=True)
class End:
    """One way to reach the sandbox: host, port, login and the key to use."""

    name: str  # direct | gateway
    port: int
    login: str
    key: UserKey
    workdir: Path  # a directory the sandbox's login user can write (same machine)
    known_hosts: str  # known_hosts lines for this end's host keys at [127.0.0.1]:port

    @property
    def dest(self) -> str:
        return f"{self.login}@127.0.0.1"

    def ssh_opts(self) -> list[str]:
        return [
            "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "ConnectTimeout=10",
            "-i", str(self.key.path),
        ]  # fmt: skip

    def ssh_argv(self, *options: str) -> list[str]:
        """``ssh`` with this end's options and port, then ``options``, then the destination."""
        return ["ssh", *self.ssh_opts(), "-p", str(self.port), *options, self.dest]

    def host_key_fingerprints(self) -> list[str]:
        """SHA256 fingerprints of this end's host keys (for PuTTY's ``-hostkey``)."""
        path = self.workdir / "known_hosts"
        path.write_text(self.known_hosts)
        out = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, timeout=10
        ).stdout
        return [line.split()[1] for line in out.splitlines() if line.strip()]

    def ppk(self) -> Path:
        """This end's key converted for PuTTY."""
        path = self.workdir / "key.ppk"
        if not path.exists():
            subprocess.run(
                ["puttygen", str(self.key.path), "-O", "private", "-o", str(path)],
                check=True,
                capture_output=True,
                timeout=20,
                stdin=subprocess.DEVNULL,
            )
        return path


class Record(Protocol):
    def __call__(
        self,
        outcome: object,
        *,
        differs_as: str | None = None,
        accepted: Callable[[object], bool] | None = None,
    ) -> None: ...


def run(
    argv: list[str],
    input: bytes | None = None,
    timeout: float = 30,
    env: dict[str, str] | None = None,
) -> tuple[int, bytes, bytes]:
    p = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        timeout=timeout,
        env=env,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return p.returncode, p.stdout, p.stderr


def wait_for(check: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()


def connect_when_listening(port: int, timeout: float = 15) -> socket.socket:
    """A connection to 127.0.0.1:port once something listens there (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.settimeout(10)
            return s
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(min(65536, n - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def echo_through(s: socket.socket, payload: bytes) -> bool:
    with s:
        s.sendall(payload)
        return recv_exactly(s, len(payload)) == payload


def socks5_connect(proxy_port: int, host: str, port: int, timeout: float = 15) -> socket.socket:
    """SOCKS5 CONNECT (no auth) through ``ssh -D`` at proxy_port; raises if refused."""
    s = connect_when_listening(proxy_port, timeout)
    s.sendall(b"\x05\x01\x00")
    if recv_exactly(s, 2) != b"\x05\x00":
        raise OSError("SOCKS5 greeting refused")
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    reply = recv_exactly(s, 10)
    if len(reply) < 2 or reply[1] != 0:
        raise OSError(f"SOCKS5 CONNECT refused: {reply!r}")
    return s


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (reachable from inside the sandbox); yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """Read proc's stdout until ``marker`` appears or ``timeout`` passes (never blocks longer)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def stop(proc: subprocess.Popen[bytes]) -> int:
    """Terminate a client we started (SIGTERM, then SIGKILL), bounded; its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(5)
