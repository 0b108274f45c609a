"""Helpers for the live-revocation tests: a real ``ssh`` session running in the background whose
exit is timed, the key API and the admin CLI driven as a user would, and the gateway's own
``/readyz`` and ``/metrics``. Fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.lab.seed import run_db
from gateway.lab.user_keys import UserKey
from keystore import db as keystore_db
from tests.integration.support import REPO, SshClient

T = TypeVar("T")

# The promise: a revocation reaches every live session within this many seconds.
REVOCATION_DEADLINE = 2.0
# The longest any test waits for a session to start (a fresh login, upstream connect included).
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class ExtraKey:
    """Another key of the tenant's organization, registered like the first."""

    key: UserKey
    id: uuid.UUID


def wait_until(what: str, check: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


class LiveSession:
    """``ssh ... '<command>'`` running in the background, read as it goes.

    ``command`` should print ``started`` first (the session is then surely open end to end).
    A thread waits for the process and records the wall-clock time it exited, so the exit is
    timed precisely whatever the test is doing meanwhile (e.g. running the CLI).
    """

    def __init__(
        self,
        client: SshClient,
        key: UserKey,
        login: str,
        command: str = "echo started $SSH_CONNECTION; exec sleep 30",
        *,
        options: Sequence[str] = (),
        stdin: bool = False,
    ) -> None:
        self.argv = [
            "ssh",
            *client.base(key),
            "-p",
            str(client.port),
            *options,
            f"{login}@127.0.0.1",
            command,
        ]
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exited_at: float | None = None  # time.time() when the process exited
        self._lock = threading.Lock()
        self._done = threading.Event()
        readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._wait, args=(readers,), daemon=True).start()

    def _read(self, stream: Any, into: bytearray) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            with self._lock:
                into.extend(chunk)

    def _wait(self, readers: list[threading.Thread]) -> None:
        self.proc.wait()
        self.exited_at = time.time()
        for reader in readers:
            reader.join(5)
        self._done.set()

    # --- reading it ---

    def out(self) -> str:
        with self._lock:
            return self.stdout.decode(errors="replace")

    def err(self) -> str:
        with self._lock:
            return self.stderr.decode(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_started(self, timeout: float = START_TIMEOUT) -> str:
        """Wait for the ``started`` line; the rest of that line (e.g. ``$SSH_CONNECTION``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"^started ?(.*)$", self.out(), re.M)
            if match:
                return match.group(1).strip()
            if self._done.is_set():
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(
            f"session did not start (exit {self.proc.returncode}):\n"
            f"stdout: {self.out()!r}\nstderr: {self.err()!r}"
        )

    def wait_output(self, text: str, timeout: float = 10.0) -> None:
        wait_until(f"{text!r} on the session's stdout", lambda: text in self.out(), timeout)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status, or None if the process still runs after ``timeout`` seconds."""
        self._done.wait(timeout)
        return self.proc.returncode if self._done.is_set() else None

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self._done.wait(5)

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class ControlMaster:
    """``ssh -M -N -f`` with ControlPersist: the backgrounded master real users keep open."""

    def __init__(self, client: SshClient, key: UserKey, login: str, path: Path) -> None:
        self.client, self.key, self.login = client, key, login
        self.socket = ["-o", f"ControlPath={path}"]

    def ssh(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                "ssh",
                *self.client.base(self.key),
                "-p",
                str(self.client.port),
                *self.socket,
                *args,
            ],
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        r = self.ssh(
            "-o",
            "ControlMaster=yes",
            "-o",
            "ControlPersist=yes",
            "-N",
            "-f",
            f"{self.login}@127.0.0.1",
        )
        assert r.returncode == 0, r.stderr

    def session(self, command: str, *, stdin: bool = False) -> LiveSession:
        """A session multiplexed on the master's connection (never a connection of its own)."""
        return LiveSession(
            self.client,
            self.key,
            self.login,
            command,
            options=[*self.socket, "-o", "ControlMaster=no"],
            stdin=stdin,
        )

    def alive(self) -> bool:
        return self.ssh("-O", "check", f"{self.login}@127.0.0.1").returncode == 0

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.ssh("-O", "exit", f"{self.login}@127.0.0.1", timeout=10)


def ended_within(session: LiveSession, since: float, deadline: float) -> float:
    """Wait for ``session`` to end; its lag from ``since`` (epoch seconds). Fails when it
    outlives ``since + deadline`` by more than the wait's own slack."""
    left = max(0.0, since + deadline - time.time()) + 1.0  # a late exit is measured, not hung on
    code = session.wait_exit(left)
    assert code is not None, (
        f"session still running {deadline} s after the change\n"
        f"stdout: {session.out()!r}\nstderr: {session.err()!r}"
    )
    assert session.exited_at is not None
    return session.exited_at - since


def access_ended_line(session: LiveSession) -> str:
    """The one stderr line the gateway wrote when it ended the session."""
    lines = [line for line in session.err().splitlines() if "your access to" in line]
    assert len(lines) == 1, f"expected one access-ended line, stderr: {session.err()!r}"
    return lines[0]


# --- the admin CLI, the key API, the database ----------------------------------------------


def cli(database_url: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` against ``database_url``, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTGW_")}
    env["RTGW_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def http(
    method: str,
    port: int,
    path: str,
    *,
    token: str | None = None,
    body: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    """One HTTP request to 127.0.0.1:``port``; (status, parsed JSON body or raw text)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 - http: only
            status, raw = int(reply.status), reply.read()
    except urllib.error.HTTPError as exc:
        status, raw = int(exc.code), exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def gateway_metric(metrics_port: int, name: str, **labels: str) -> float:
    """One sample of a gateway's /metrics right now (0 when it has not been counted yet)."""
    status, text = http("GET", metrics_port, "/metrics")
    assert status == 200, text
    return metric_value(str(text), name, **labels) or 0.0


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample in ``text`` (None if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, rest = series.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p)) if rest else ""
        if metric == name and got == want:
            return float(value)
    return None


def sql(database_url: str, query: str, *args: Any) -> Any:
    """One statement on a fresh connection; the rows of a query (``fetch``)."""
    return run_db(database_url, lambda conn: conn.fetch(query, *args))


class HeldConnection:
    """One database connection kept open on an event loop of its own (a thread), usable from
    synchronous test code: it still works while new connections are refused."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._conn = self._run(keystore_db.connect_raw(url, timeout_seconds=10))

    def _run(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def fetch(self, query: str, *args: Any) -> Any:
        return self._run(self._conn.fetch(query, *args))

    def fetchval(self, query: str, *args: Any) -> Any:
        return self._run(self._conn.fetchval(query, *args))

    def execute(self, query: str, *args: Any) -> Any:
        return self._run(self._conn.execute(query, *args))

    def close(self) -> None:
        try:
            self._run(self._conn.close(), timeout=5)
        except Exception:
            self._conn.terminate()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> HeldConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FreezableRelay:
    """A loopback TCP relay to a database that can go silent: after :meth:`freeze`, bytes in
    either direction are swallowed and new connections are accepted but never answered, like
    a host that vanished from the network (no FIN, no RST) rather than one that shut down."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.frozen.set()

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._keep(client)
            if self.frozen.is_set():
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._keep(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self.frozen.is_set():
                    dst.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()
