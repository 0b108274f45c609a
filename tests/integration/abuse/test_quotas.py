"""Issue 9 findings 3, 4 and 9, issue 12 finding 3: quotas after auth and the upstream pool's
capacity, with the real OpenSSH ``ssh`` (ControlMaster, ``-L``), a real sshd as the sandbox and
PostgreSQL.

What the gateway holds is read from its own ``/metrics``: ``rtgw_upstream_pool{state}``
(connections, leases, waiting) and ``rtgw_quota_refusals_total{reason}``. Forwarded
connections end at a TCP listener of this test process (``Sink``), reached from inside the
sandbox, which counts what was really opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest

from gateway import messages
from gateway.lab.process import GatewayProcess, free_port
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, Upstream, unique
from gateway.lab.user_keys import UserKey, make_key
from gateway.ssh import hostkeys
from tests.integration.support import GatewayFactory, SshClient, client_for

# --- helpers ----------------------------------------------------------------------------------


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def scrape(gw: GatewayProcess) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def pool(gw: GatewayProcess, state: str) -> float:
    return scrape(gw).get(f'rtgw_upstream_pool{{state="{state}"}}', -1.0)


def refusals(gw: GatewayProcess, reason: str) -> float:
    return scrape(gw).get(f'rtgw_quota_refusals_total{{reason="{reason}"}}', 0.0)


class Sink:
    """A TCP listener that accepts and holds every connection: the service in the sandbox."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(conn)
            self.accepted += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._held:
            conn.close()


@contextlib.contextmanager
def sink() -> Iterator[Sink]:
    s = Sink()
    try:
        yield s
    finally:
        s.close()


class Forwarder:
    """``ssh -N -L local:127.0.0.1:dest``: one client connection whose channels we open by
    connecting to ``local``."""

    def __init__(self, client: SshClient, key: UserKey, login: str, dest: int) -> None:
        self.local = free_port()
        self.proc = subprocess.Popen(
            [
                "ssh",
                *client.base(key),
                "-p",
                str(client.port),
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                f"127.0.0.1:{self.local}:127.0.0.1:{dest}",
                f"{login}@127.0.0.1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.sockets: list[socket.socket] = []
        assert _wait(self._listening, 15), self.stderr()

    def _listening(self) -> bool:
        """ssh listens on ``local`` (probed by binding it: a probe connection would be a
        forwarding channel of its own)."""
        if self.proc.poll() is not None:
            return True
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", self.local))
            except OSError:
                return True
        return False

    def open(self, count: int) -> None:
        """``count`` TCP connections to the local end: one forwarding channel each."""
        for _ in range(count):
            self.sockets.append(socket.create_connection(("127.0.0.1", self.local), timeout=5))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        for s in self.sockets:
            s.close()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            self.kill()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


@contextlib.contextmanager
def forwarder(client: SshClient, key: UserKey, login: str, dest: int) -> Iterator[Forwarder]:
    fw = Forwarder(client, key, login, dest)
    try:
        yield fw
    finally:
        fw.kill()


class Master:
    """An OpenSSH ControlMaster: one client connection, sessions run through ``ssh -S``."""

    def __init__(self, client: SshClient, key: UserKey, login: str, workdir: Path) -> None:
        self.client, self.key, self.login = client, key, login
        self.control = workdir / f"cm-{unique('m')}"
        r = subprocess.run(
            self._cmd("-o", "ControlMaster=yes", "-o", "ControlPersist=300", "-N", "-f"),
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stderr
        self.held: list[subprocess.Popen[bytes]] = []

    def _cmd(self, *options: str) -> list[str]:
        return [
            "ssh",
            *self.client.base(self.key),
            "-p",
            str(self.client.port),
            "-o",
            f"ControlPath={self.control}",
            *options,
            f"{self.login}@127.0.0.1",
        ]

    def run(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self._cmd("-o", "ControlMaster=no"), command],
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def hold(self, count: int, command: str = "echo up; sleep 300") -> None:
        """``count`` sessions that stay open (each prints ``up`` once it runs)."""
        for _ in range(count):
            p = subprocess.Popen(
                [*self._cmd("-o", "ControlMaster=no"), command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert p.stdout is not None and p.stderr is not None
            line = p.stdout.readline()
            if line != b"up\n":
                p.kill()
                raise AssertionError(f"session did not start: {p.stderr.read()!r}")
            self.held.append(p)

    def exit(self) -> None:
        subprocess.run(
            self._cmd("-O", "exit"), capture_output=True, timeout=30, stdin=subprocess.DEVNULL
        )
        for p in self.held:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(10)


@contextlib.contextmanager
def master(client: SshClient, key: UserKey, login: str, workdir: Path) -> Iterator[Master]:
    m = Master(client, key, login, workdir)
    try:
        yield m
    finally:
        m.exit()


class BurstyLink:
    """A TCP relay to the gateway that forwards what the client sends every ``interval``
    seconds, in one write: a link that delivers packets in bursts (a WAN with delayed ACKs,
    a busy gateway reading late). The gateway then sees the client's CLOSE of one session and
    its OPEN of the next in one read."""

    def __init__(self, port: int, interval: float = 0.03) -> None:
        self.target, self.interval = port, interval
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        client.setblocking(False)
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                time.sleep(self.interval)
                burst, eof = b"", False
                while True:
                    try:
                        data = client.recv(65536)
                    except BlockingIOError:
                        break
                    if not data:
                        eof = True
                        break
                    burst += data
                if burst:
                    upstream.sendall(burst)
                if eof:
                    upstream.shutdown(socket.SHUT_WR)
                    return

    @staticmethod
    def _down(upstream: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


def member(tenant: Tenant, tmp_path: Path, name: str) -> UserKey:
    """Another member of the tenant's organization: a key of their own."""
    key = make_key(tmp_path, unique(name))
    tenant.register(key.public_line, name=name)
    return key


# --- issue 9 finding 9: session slots are free as soon as a session's channel closes ----------


def test_back_to_back_sessions_on_a_controlmaster_all_open(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    """Nine sessions stay open on one ControlMaster while 200 more run one after another: the
    connection never has more than ten (ssh.max_sessions_per_connection), so none is refused,
    even when the client's CLOSE of one and its OPEN of the next arrive together."""
    assert tenant.key is not None
    gw = gateway_factory()
    link = BurstyLink(gw.ssh_port)
    client = client_for(gw, tmp_path, port=link.port)
    try:
        with master(client, tenant.key, tenant.sandbox_id, tmp_path) as m:
            m.hold(9)
            failed = []
            t0 = time.monotonic()
            for i in range(200):
                r = m.run(f"echo {i}")
                if r.returncode != 0 or r.stdout != f"{i}\n".encode():
                    failed.append((i, r.returncode, r.stderr.decode(errors="replace")))
            elapsed = time.monotonic() - t0
            assert failed == [], f"{len(failed)} of 200 failed, e.g. {failed[:3]}"
            assert elapsed < 120
            # A refused mux session silently falls back to a connection of its own: every one
            # went over the master's connection, none was refused.
            logins = [e for e in gw.events("auth_ok") if e.get("sandbox") == tenant.sandbox_id]
            assert len(logins) == 1, f"{len(logins) - 1} sessions were refused and logged in anew"
            # The tenth session still fits; the eleventh is refused with a message the mux
            # client's user sees (not just "Session open refused by peer").
            m.hold(1)
            over = m.run("echo should-not-run")
            assert over.returncode == 255
            assert over.stdout == b""
            assert b"too many sessions on one connection (limit 10)" in over.stderr
        assert refusals(gw, messages.TOO_MANY_SESSIONS.code) == 1
    finally:
        link.close()


async def test_back_to_back_sessions_from_a_protocol_client_all_open(
    gateway_factory: GatewayFactory, tenant: Tenant
) -> None:
    """The same with a client that opens the next session right after it closed the last
    (asyncssh): ten at a time, 200 in all, none refused."""
    assert tenant.key is not None
    gw = gateway_factory()
    key = asyncssh.read_private_key(str(tenant.key.path))
    failed: list[object] = []
    async with asyncssh.connect(
        "127.0.0.1", gw.ssh_port, username=tenant.sandbox_id, client_keys=[key], known_hosts=None
    ) as conn:

        async def one_after_another(worker: int) -> None:
            for i in range(20):
                try:
                    r = await conn.run(f"echo {worker}-{i}")
                except asyncssh.Error as exc:
                    failed.append((worker, i, repr(exc)))
                    continue
                if r.exit_status != 0:
                    failed.append((worker, i, r.exit_status, r.stderr))

        await asyncio.wait_for(asyncio.gather(*(one_after_another(w) for w in range(10))), 120)
    assert failed == [], f"{len(failed)} of 200 failed, e.g. {failed[:3]}"


# --- issue 12 finding 3: capacity is sized for real use, new upstream connections open ---------


def test_the_81st_concurrent_channel_opens_promptly(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    """80 channels open (two client connections with 40 forwards each): the old pool's
    8 x 10 is full. The 81st, a session, gets a new upstream connection at once."""
    assert tenant.key is not None
    gw = gateway_factory()
    client = client_for(gw, tmp_path)
    with sink() as service:
        with (
            forwarder(client, tenant.key, tenant.sandbox_id, service.port) as a,
            forwarder(client, tenant.key, tenant.sandbox_id, service.port) as b,
        ):
            a.open(40)
            b.open(40)
            assert _wait(lambda: service.accepted == 80, 30), service.accepted
            t0 = time.monotonic()
            r = client.ssh(tenant.key, tenant.sandbox_id, "sleep 0.1; echo 81st", timeout=10)
            elapsed = time.monotonic() - t0
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"81st\n"
            assert elapsed < 2, f"the 81st took {elapsed:.2f} s"
            assert pool(gw, "connections") >= 9
            assert pool(gw, "leases") == 80  # the 81st has ended


# --- issue 9 finding 4: one member cannot block a sandbox for everyone --------------------------


def test_one_connection_cannot_take_the_sandbox_from_another_member(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    """One connection asks for 100 forwarding channels: 64 (quotas.max_forwards_per_connection)
    open, the rest are refused with a message; another member's ssh is not held up."""
    assert tenant.key is not None
    gw = gateway_factory()
    client = client_for(gw, tmp_path)
    other = member(tenant, tmp_path, "member")
    with sink() as service:
        fw = Forwarder(client, tenant.key, tenant.sandbox_id, service.port)
        try:
            fw.open(100)
            assert _wait(lambda: service.accepted >= 64, 30), service.accepted
            time.sleep(0.5)  # whatever else would open has opened
            t0 = time.monotonic()
            r = client.ssh(other, tenant.sandbox_id, "echo in", timeout=10)
            elapsed = time.monotonic() - t0
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"in\n"
            assert elapsed < 2, f"the other member waited {elapsed:.2f} s"
            assert service.accepted == 64
            assert refusals(gw, messages.TOO_MANY_FORWARDS.code) == 36
        finally:
            stderr = fw.stderr()
    assert "too many forwarded connections on one SSH connection (limit 64)" in stderr, stderr
    assert service.accepted == 64


def test_a_small_sandbox_is_shared_fairly_and_a_full_one_says_so_in_time(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    """A sandbox of 10 channels (1 upstream connection x 10) and a share of 50 %: one member's
    connection gets 5 forwards, another member's 5 sessions; a third member's session then
    waits upstream.lease_timeout_seconds (1 s) and is refused with what happened."""
    assert tenant.key is not None
    gw = gateway_factory(
        {
            "RTGW_UPSTREAM_MAX_CONNECTIONS_PER_SANDBOX": "1",
            "RTGW_QUOTAS_UPSTREAM_SHARE_PERCENT": "50",
            "RTGW_UPSTREAM_LEASE_TIMEOUT_SECONDS": "1",
        }
    )
    client = client_for(gw, tmp_path)
    second, third = member(tenant, tmp_path, "second"), member(tenant, tmp_path, "third")
    with sink() as service:
        fw = Forwarder(client, tenant.key, tenant.sandbox_id, service.port)
        try:
            fw.open(20)
            assert _wait(lambda: refusals(gw, messages.UPSTREAM_SHARE_EXCEEDED.code) == 15, 30)
            assert _wait(lambda: service.accepted == 5, 10), service.accepted
            with master(client, second, tenant.sandbox_id, tmp_path) as m:
                m.hold(5)
                over = m.run("echo should-not-run")  # the second member's sixth: over its share
                assert over.returncode == 255
                assert b"its fair share" in over.stderr, over.stderr
                assert pool(gw, "leases") == 10
                t0 = time.monotonic()
                r = client.ssh(third, tenant.sandbox_id, "echo should-not-run", timeout=30)
                elapsed = time.monotonic() - t0
                assert r.returncode == 255
                assert r.stdout == b""
                text = r.stderr.decode()
                assert f"all 10 channels the gateway may open to {tenant.sandbox_id}" in text
                assert "none came free within 1 s" in text and "try again" in text
                assert 1 <= elapsed < 4
                assert refusals(gw, messages.UPSTREAM_BUSY.code) == 1
                assert pool(gw, "waiting") == 0
        finally:
            stderr = fw.stderr()
    assert "its fair share" in stderr, stderr


# --- issue 9 finding 3: no slot outlives the client that asked for it -------------------------


def test_a_client_killed_while_its_forwards_wait_leaves_no_slot_behind(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    """The old 8 x 10 sandbox, one connection may take all of it. A holds all 80 slots; B's 50
    forwarding channels wait for one; B is killed. Nothing B asked for is ever opened, and once
    A is gone the sandbox's 80 slots are all free again."""
    assert tenant.key is not None
    gw = gateway_factory(
        {
            "RTGW_UPSTREAM_MAX_CONNECTIONS_PER_SANDBOX": "8",
            "RTGW_QUOTAS_UPSTREAM_SHARE_PERCENT": "100",
            "RTGW_QUOTAS_MAX_FORWARDS_PER_CONNECTION": "100",
            "RTGW_UPSTREAM_LEASE_TIMEOUT_SECONDS": "300",
        }
    )
    client = client_for(gw, tmp_path)
    other = member(tenant, tmp_path, "member")
    with sink() as service:
        with forwarder(client, tenant.key, tenant.sandbox_id, service.port) as a:
            a.open(80)
            assert _wait(lambda: service.accepted == 80, 30), service.accepted
            with forwarder(client, other, tenant.sandbox_id, service.port) as b:
                b.open(50)
                _wait(lambda: pool(gw, "waiting") == 50, 15)
                waiting_before = pool(gw, "waiting")
                b.kill()
                _wait(lambda: pool(gw, "waiting") == 0, 3)
                waiting_after = pool(gw, "waiting")
        # A is gone too: had B's channels still been waiting, they would now get A's slots
        # and open their tunnels for nobody.
        time.sleep(2)
        assert service.accepted == 80, "tunnels were opened for a client that had left"
        assert (waiting_before, waiting_after) == (50, 0)
        assert _wait(lambda: pool(gw, "leases") == 0, 10), pool(gw, "leases")
        with forwarder(client, other, tenant.sandbox_id, service.port) as c:
            c.open(80)
            assert _wait(lambda: service.accepted == 160, 30), service.accepted
            assert pool(gw, "leases") == 80


# --- a sandbox that refuses a session (its MaxSessions) ---------------------------------------


@pytest.fixture
def small_sandbox(state_dir: Path) -> Iterator[SandboxSshd]:
    """A sandbox whose sshd has MaxSessions 3, below the gateway's default of 10."""
    line = hostkeys.public_line(hostkeys.load_upstream_key(state_dir))
    sshd = SandboxSshd(authorized_keys=[line], max_sessions=3)
    sshd.start()
    yield sshd
    sshd.stop()


def test_a_session_the_sandbox_refuses_as_full_goes_to_another_upstream_connection(
    gateway_factory: GatewayFactory, tenant: Tenant, small_sandbox: SandboxSshd, tmp_path: Path
) -> None:
    assert tenant.key is not None
    sandbox = tenant.add_sandbox(Upstream.of(small_sandbox))
    gw = gateway_factory()
    client = client_for(gw, tmp_path)
    with master(client, tenant.key, sandbox, tmp_path) as m:
        m.hold(7)  # 3 + 3 + 1 on three upstream connections
        r = m.run("echo eighth")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"eighth\n"
        assert pool(gw, "connections") == 3
        assert pool(gw, "leases") == 7
    full = [e for e in gw.events("upstream_full") if e.get("sandbox") == sandbox]
    assert full, "the sandbox's refusal was not noticed"


# --- connections per key and per organization ----------------------------------------------


def test_connections_per_key_are_capped_with_a_message(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    assert tenant.key is not None
    gw = gateway_factory({"RTGW_QUOTAS_MAX_CONNECTIONS_PER_KEY": "2"})
    client = client_for(gw, tmp_path)
    other = member(tenant, tmp_path, "member")
    with (
        master(client, tenant.key, tenant.sandbox_id, tmp_path),
        master(client, tenant.key, tenant.sandbox_id, tmp_path),
    ):
        r = client.ssh(tenant.key, tenant.sandbox_id, "echo should-not-run", timeout=30)
        assert r.returncode == 255
        assert r.stdout == b""
        assert b"this key already has 2 connections open" in r.stderr, r.stderr
        assert client.ssh(other, tenant.sandbox_id, "true", timeout=30).returncode == 0
        assert refusals(gw, messages.TOO_MANY_CONNECTIONS_PER_KEY.code) == 1
    assert client.ssh(tenant.key, tenant.sandbox_id, "true", timeout=30).returncode == 0
