"""Agent, remote and Unix-socket forwarding on per-client upstream connections (issue 11):
real OpenSSH client, ssh-agent and sandbox sshd."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant, unique
from gateway.lab.user_keys import UserKey, make_key
from tests.integration.forwarding.support import Agent, fingerprint
from tests.integration.support import GatewayFactory, SshClient, client_for

PY_CONNECT = (
    "python3 -c \"import socket,sys; s=socket.create_connection(('127.0.0.1',{port}),5);"
    'print(s.recv(64).decode())"'
)


PY_REFUSED = (
    "python3 -c \"import socket\ntry:\n socket.create_connection(('127.0.0.1',{port}),5)"
    "\n print('open')\nexcept OSError:\n print('refused')\""
)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[UserKey], Agent]]:
    started: list[Agent] = []

    def start(key: UserKey) -> Agent:
        agent = Agent(tmp_path, key)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def serve_once_forever(reply: bytes) -> tuple[int, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(reply)
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1], srv


def with_agent(client: SshClient, key: UserKey, agent: Agent) -> list[str]:
    """ssh options forwarding ``agent`` (-A): IdentityAgent=none would turn -A off."""
    base = client.base(key)
    return [f"IdentityAgent={agent.sock}" if o == "IdentityAgent=none" else o for o in base] + [
        "-A"
    ]


def run_with_agent(
    client: SshClient, key: UserKey, agent: Agent, login: str, command: str
) -> subprocess.CompletedProcess[bytes]:
    argv = ["ssh", *with_agent(client, key, agent), "-p", str(client.port)]
    return subprocess.run(
        [*argv, f"{login}@127.0.0.1", command],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def second_user(tenant: Tenant, tmp_path: Path) -> UserKey:
    key = make_key(tmp_path, unique("idb"))
    tenant.register(key.public_line, name="second")
    return key


def test_agent_forwarding_reaches_only_its_own_client(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path, agents: Callable[[UserKey], Agent]
) -> None:
    a_key = tenant.key
    assert a_key is not None
    b_key = second_user(tenant, tmp_path)
    a_agent, b_agent = agents(a_key), agents(b_key)
    # A holds a session open while B logs in to the same sandbox.
    a = subprocess.Popen(
        [
            "ssh",
            *with_agent(ssh_client, a_key, a_agent),
            "-p",
            str(ssh_client.port),
            f"{tenant.sandbox_id}@127.0.0.1",
            "ssh-add -l; sleep 3; ssh-add -l",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    b = run_with_agent(ssh_client, b_key, b_agent, tenant.sandbox_id, "ssh-add -l")
    b_none = ssh_client.ssh(b_key, tenant.sandbox_id, "ssh-add -l; echo rc=$?")
    a_out, a_err = a.communicate(timeout=30)
    assert a.returncode == 0, a_err
    assert a_out.decode().count(fingerprint(a_key)) == 2
    assert fingerprint(b_key) not in a_out.decode()
    assert b.returncode == 0, b.stderr
    assert fingerprint(b_key) in b.stdout.decode()
    assert fingerprint(a_key) not in b.stdout.decode()
    # B without -A: no agent at all (the shared upstream connections carry none).
    assert b"rc=2" in b_none.stdout, b_none
    assert fingerprint(a_key).encode() not in b_none.stdout


def test_remote_forwards_come_back_to_their_own_client(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path
) -> None:
    a_key = tenant.key
    assert a_key is not None
    b_key = second_user(tenant, tmp_path)
    a_port, a_srv = serve_once_forever(b"service-of-A")
    b_port, b_srv = serve_once_forever(b"service-of-B")
    procs = []
    try:
        ports = []
        for key, local in ((a_key, a_port), (b_key, b_port)):
            p = subprocess.Popen(
                [
                    "ssh",
                    *ssh_client.base(key),
                    "-p",
                    str(ssh_client.port),
                    "-N",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-R",
                    f"0:127.0.0.1:{local}",
                    f"{tenant.sandbox_id}@127.0.0.1",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            procs.append(p)
            assert p.stderr is not None
            line = p.stderr.readline().decode()
            m = re.search(r"Allocated port (\d+)", line)
            assert m, line
            ports.append(int(m.group(1)))
        for port, want in zip(ports, (b"service-of-A", b"service-of-B"), strict=True):
            r = ssh_client.ssh(b_key, tenant.sandbox_id, PY_CONNECT.format(port=port))
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == want
        # A fixed port too.
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        fixed = probe.getsockname()[1]  # free now (the sandbox is this machine)
        probe.close()
        r = ssh_client.ssh(
            a_key,
            tenant.sandbox_id,
            PY_CONNECT.format(port=fixed),
            options=[
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                f"127.0.0.1:{fixed}:127.0.0.1:{a_port}",
            ],
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == b"service-of-A"
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        a_srv.close()
        b_srv.close()


def test_unix_socket_forwarding_both_ways(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path
) -> None:
    key = tenant.key
    assert key is not None
    os.chmod(tmp_path, 0o777)
    # -R /remote.sock:/local.sock, then -L /local2.sock:/remote.sock through it.
    local_sock = tmp_path / "local.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(local_sock))
    srv.listen(4)

    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(b"unix-service")
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    remote_sock = f"/tmp/rtgw-{unique('r')}.sock"
    probe = (
        'python3 -c "import socket; s=socket.socket(socket.AF_UNIX); '
        f"s.connect('{remote_sock}'); print(s.recv(64).decode())\""
    )
    r = ssh_client.ssh(
        key,
        tenant.sandbox_id,
        probe,
        options=[
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
            "-R",
            f"{remote_sock}:{local_sock}",
        ],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"unix-service"
    # -L to a Unix socket in the sandbox: reach one served by a -R in the same connection.
    # A fresh path: the sandbox's sshd leaves the first one's file behind (without its own
    # StreamLocalBindUnlink, see config/README.md) and would refuse to bind it again.
    remote_sock = f"/tmp/rtgw-{unique('r')}.sock"
    l_sock = tmp_path / "l.sock"
    p = subprocess.Popen(
        [
            "ssh",
            *ssh_client.base(key),
            "-p",
            str(ssh_client.port),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
            "-R",
            f"{remote_sock}:{local_sock}",
            "-L",
            f"{l_sock}:{remote_sock}",
            f"{tenant.sandbox_id}@127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not l_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert p.poll() is None, p.stderr.read() if p.stderr else b""
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(l_sock))
        c.settimeout(10)
        assert c.recv(64) == b"unix-service"
        c.close()
    finally:
        p.terminate()
        p.wait(10)
        srv.close()


def test_forwarding_switched_off_is_refused_with_a_message(
    gateway_factory: GatewayFactory,
    tenant: Tenant,
    tmp_path: Path,
    agents: Callable[[UserKey], Agent],
) -> None:
    gw: GatewayProcess = gateway_factory(
        {
            "RTGW_FORWARDING_AGENT": "false",
            "RTGW_FORWARDING_REMOTE": "false",
            "RTGW_FORWARDING_STREAMLOCAL": "false",
        }
    )
    client = client_for(gw, tmp_path)
    key = tenant.key
    assert key is not None
    agent = agents(key)
    r = run_with_agent(client, key, agent, tenant.sandbox_id, "ssh-add -l; echo rc=$?")
    assert b"rc=2" in r.stdout
    assert b"Agent forwarding (ssh -A) is turned off" in r.stderr
    r = client.ssh(key, tenant.sandbox_id, "sleep 1; echo done", options=["-R", "0:127.0.0.1:9"])
    assert b"remote port forwarding failed" in r.stderr
    assert b"Remote port forwarding (ssh -R) is turned off" in r.stderr
    l_sock = tmp_path / "l.sock"
    p = subprocess.Popen(
        [
            "ssh",
            *client.base(key),
            "-p",
            str(client.port),
            "-N",
            "-L",
            f"{l_sock}:/tmp/whatever.sock",
            f"{tenant.sandbox_id}@127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not l_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(l_sock))
        c.settimeout(5)
        assert c.recv(64) == b""
        c.close()
        time.sleep(0.3)
    finally:
        p.terminate()
        _, err = p.communicate(timeout=10)
    assert b"Unix-socket forwarding is turned off" in err


def test_remote_forward_cancelled_and_gone_with_the_connection(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path
) -> None:
    key = tenant.key
    assert key is not None
    port, srv = serve_once_forever(b"cancel-me")
    remote = socket.socket()
    remote.bind(("127.0.0.1", 0))
    fixed = remote.getsockname()[1]
    remote.close()  # a port free now (the sandbox is this machine)
    ctl = tmp_path / "ctl"
    spec = f"127.0.0.1:{fixed}:127.0.0.1:{port}"
    base = [*ssh_client.base(key), "-p", str(ssh_client.port), "-S", str(ctl)]
    dest = f"{tenant.sandbox_id}@127.0.0.1"
    master = subprocess.Popen(
        ["ssh", *base, "-M", "-N", "-o", "ExitOnForwardFailure=yes", "-R", spec, dest],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not ctl.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        r = ssh_client.ssh(key, tenant.sandbox_id, PY_CONNECT.format(port=fixed))
        assert r.stdout.strip() == b"cancel-me", r.stderr
        c = subprocess.run(
            ["ssh", *base, "-O", "cancel", "-R", spec, dest], capture_output=True, timeout=30
        )
        assert c.returncode == 0, c.stderr
        time.sleep(0.5)
        r = ssh_client.ssh(key, tenant.sandbox_id, PY_REFUSED.format(port=fixed))
        assert r.stdout.strip() == b"refused", r
        # Forwarded again, then the connection goes: so does the listener in the sandbox.
        f = subprocess.run(
            ["ssh", *base, "-O", "forward", "-R", spec, dest], capture_output=True, timeout=30
        )
        assert f.returncode == 0, f.stderr
        r = ssh_client.ssh(key, tenant.sandbox_id, PY_CONNECT.format(port=fixed))
        assert r.stdout.strip() == b"cancel-me", r.stderr
        assert master.poll() is None
    finally:
        master.terminate()
        master.wait(10)
        srv.close()
    time.sleep(1.0)
    r = ssh_client.ssh(key, tenant.sandbox_id, PY_REFUSED.format(port=fixed))
    assert r.stdout.strip() == b"refused", r
