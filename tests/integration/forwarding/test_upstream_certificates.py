"""Upstream certificates (issue 11 part 4): a sandbox sshd that trusts only the gateway's user CA
lets dedicated upstream connections in and logs who is behind each; shared ones keep the static
key; sandbox host keys may be trusted through a host CA. Real sshd, real ssh, real PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, Upstream, create_tenant, unique
from gateway.lab.user_keys import UserKey, make_key
from gateway.ssh import hostkeys
from gateway.upstream import certificates
from tests.integration.forwarding.support import Agent, fingerprint
from tests.integration.support import GatewayFactory, SshClient, client_for


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upstream-cas")
    path.chmod(0o700)
    return path


@pytest.fixture(scope="module")
def user_ca(keys_dir: Path) -> Path:
    """The gateway's user CA (upstream.ca_key_file)."""
    path = keys_dir / "upstream_user_ca"
    certificates.generate_ca_key(path)
    return path


def ca_line(path: Path) -> str:
    return Path(f"{path}.pub").read_text().strip()


@pytest.fixture(scope="module")
def ca_only_sshd(user_ca: Path) -> Iterator[SandboxSshd]:
    """A sandbox that trusts the gateway's CA and nothing else (no authorized_keys)."""
    sshd = SandboxSshd(
        authorized_keys=[], trusted_user_ca_keys=[ca_line(user_ca)], log_level="VERBOSE"
    )
    sshd.start()
    yield sshd
    sshd.stop()


def tenant_on(database_url: str, upstream: Upstream, tmp_path: Path) -> Tenant:
    key = make_key(tmp_path, unique("id"))
    return asyncio.run(create_tenant(database_url, upstream, key=key, key_name="laptop"))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for one in started:
        one.stop()


def ssh_with_agent(
    client: SshClient, key: UserKey, agent: Agent, login: str, command: str
) -> subprocess.CompletedProcess[bytes]:
    base = [
        f"IdentityAgent={agent.sock}" if o == "IdentityAgent=none" else o for o in client.base(key)
    ]
    return subprocess.run(
        ["ssh", *base, "-A", "-p", str(client.port), f"{login}@127.0.0.1", command],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def sshd_log(sshd: SandboxSshd) -> str:
    return Path(sshd.log_path).read_text(errors="replace")


def wait_for_log(sshd: SandboxSshd, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, sshd_log(sshd))
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the sandbox sshd log:\n{sshd_log(sshd)}")
        time.sleep(0.05)


def serve_forever(reply: bytes) -> tuple[int, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(reply)
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1], srv


# --- (a) a sandbox that trusts only the gateway's CA ---


def test_agent_forwarding_logs_in_with_a_certificate_the_sandbox_logs(
    gateway_factory: GatewayFactory,
    database_url: str,
    ca_only_sshd: SandboxSshd,
    user_ca: Path,
    tmp_path: Path,
    agent: list[Agent],
) -> None:
    gw: GatewayProcess = gateway_factory({"RTGW_UPSTREAM_CA_KEY_FILE": str(user_ca)})
    tenant = tenant_on(database_url, Upstream.of(ca_only_sshd), tmp_path)
    key = tenant.key
    assert key is not None
    agent.append(Agent(tmp_path, key))
    r = ssh_with_agent(client_for(gw, tmp_path), key, agent[0], tenant.sandbox_id, "ssh-add -l")
    assert r.returncode == 0, r.stderr
    assert fingerprint(key).encode() in r.stdout  # the client's agent, through the sandbox

    issued = gw.wait_event("upstream_certificate")
    conn_id = issued["conn_id"]
    key_id = f"runtools-gateway conn={conn_id} org={tenant.slug} key={fingerprint(key)}"
    assert issued["key_id"] == key_id
    assert issued["principal"] == ca_only_sshd.login_user
    serial = issued["serial"]
    # What the sandbox's sshd says about that login: the key id and serial, CA-signed.
    accepted = wait_for_log(
        ca_only_sshd,
        rf"Accepted publickey for {ca_only_sshd.login_user} from 127\.0\.0\.1 port \d+ ssh2: "
        rf"ED25519-CERT SHA256:\S+ ID {re.escape(key_id)} \(serial {serial}\) CA ED25519 "
        rf"(SHA256:\S+)",
    )
    ca_fingerprint = accepted.group(1)
    assert (
        ca_fingerprint
        in subprocess.run(
            ["ssh-keygen", "-lf", f"{user_ca}.pub"], capture_output=True, text=True, check=True
        ).stdout
    )
    # LogLevel VERBOSE: the certificate itself, and by which CA.
    wait_for_log(
        ca_only_sshd,
        rf'Accepted certificate ID "{re.escape(key_id)}" \(serial {serial}\) signed by '
        rf"ED25519 CA {re.escape(ca_fingerprint)}",
    )
    # (d) valid from 30 s before it was made, for at most 5 minutes after.
    assert issued["valid_before"] - issued["valid_after"] == 330
    made = time.time()
    assert issued["valid_before"] <= made + 300
    opened = gw.wait_event("upstream_dedicated_open", lambda e: e.get("conn_id") == conn_id)
    assert opened["certificate_serial"] == serial


def test_remote_forwarding_runs_on_a_certificate_and_each_connection_gets_its_own(
    gateway_factory: GatewayFactory,
    database_url: str,
    ca_only_sshd: SandboxSshd,
    user_ca: Path,
    tmp_path: Path,
) -> None:
    gw: GatewayProcess = gateway_factory(
        {
            "RTGW_UPSTREAM_CA_KEY_FILE": str(user_ca),
            "RTGW_UPSTREAM_CERTIFICATE_LIFETIME_SECONDS": "60",
        }
    )
    tenant = tenant_on(database_url, Upstream.of(ca_only_sshd), tmp_path)
    key = tenant.key
    assert key is not None
    client = client_for(gw, tmp_path)
    port, srv = serve_forever(b"hello-from-the-client-side\n")
    serials = []
    try:
        for _ in range(2):
            proc = subprocess.Popen(
                [
                    "ssh",
                    *client.base(key),
                    "-p",
                    str(client.port),
                    "-N",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-R",
                    f"0:127.0.0.1:{port}",
                    f"{tenant.sandbox_id}@127.0.0.1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                assert proc.stderr is not None
                line = proc.stderr.readline().decode()
                allocated = re.search(r"Allocated port (\d+)", line)
                assert allocated, line
                # The listener is in the sandbox (this host's loopback): it reaches our client.
                with socket.create_connection(("127.0.0.1", int(allocated.group(1))), 5) as s:
                    assert s.recv(64) == b"hello-from-the-client-side\n"
            finally:
                proc.terminate()
                proc.wait(10)
            issued = gw.events("upstream_certificate")[-1]
            assert issued["valid_before"] - issued["valid_after"] == 90  # 30 s back, 60 ahead
            serials.append(issued["serial"])
            wait_for_log(ca_only_sshd, rf"\(serial {issued['serial']}\)")
    finally:
        srv.close()
    assert serials[0] != serials[1]  # a fresh certificate per client connection


def test_a_reload_switches_to_a_new_ca_key_and_refuses_an_unusable_one(
    gateway_factory: GatewayFactory,
    database_url: str,
    user_ca: Path,
    keys_dir: Path,
    tmp_path: Path,
    agent: list[Agent],
) -> None:
    """Rotation: the sandbox trusts the old and the new CA; the gateway moves on a reload."""
    new_ca = keys_dir / "rotated_user_ca"
    certificates.generate_ca_key(new_ca)
    config = tmp_path / "gateway.toml"
    config.write_text(f'[upstream]\nca_key_file = "{user_ca}"\n')
    gw: GatewayProcess = gateway_factory(config_file=config)
    with SandboxSshd(
        authorized_keys=[], trusted_user_ca_keys=[ca_line(user_ca), ca_line(new_ca)]
    ) as sshd:
        tenant = tenant_on(database_url, Upstream.of(sshd), tmp_path)
        key = tenant.key
        assert key is not None
        agent.append(Agent(tmp_path, key))
        client = client_for(gw, tmp_path)

        def login_signed_by() -> str:
            r = ssh_with_agent(client, key, agent[0], tenant.sandbox_id, "true")
            assert r.returncode == 0, r.stderr
            serial = gw.events("upstream_certificate")[-1]["serial"]
            return wait_for_log(sshd, rf"\(serial {serial}\) CA ED25519 (SHA256:\S+)").group(1)

        def ca_fingerprint(path: Path) -> str:
            out = subprocess.run(
                ["ssh-keygen", "-lf", f"{path}.pub"], capture_output=True, text=True, check=True
            )
            return out.stdout.split()[1]

        assert login_signed_by() == ca_fingerprint(user_ca)
        assert gw.proc is not None
        config.write_text(f'[upstream]\nca_key_file = "{new_ca}"\n')
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_event("reloaded")
        assert login_signed_by() == ca_fingerprint(new_ca)

        loose = keys_dir / "loose_rotated_ca"
        certificates.generate_ca_key(loose)
        loose.chmod(0o644)
        config.write_text(f'[upstream]\nca_key_file = "{loose}"\n')
        gw.proc.send_signal(signal.SIGHUP)
        failed = gw.wait_event("reload_failed")
        assert "upstream.ca_key_file" in failed["error"] and "chmod 600" in failed["error"]
        assert login_signed_by() == ca_fingerprint(new_ca)  # the old config stays


# --- (b) shared upstream connections keep the static key ---


def test_a_plain_session_uses_the_static_key_which_that_sandbox_refuses(
    gateway_factory: GatewayFactory,
    database_url: str,
    ca_only_sshd: SandboxSshd,
    user_ca: Path,
    tmp_path: Path,
) -> None:
    gw: GatewayProcess = gateway_factory({"RTGW_UPSTREAM_CA_KEY_FILE": str(user_ca)})
    tenant = tenant_on(database_url, Upstream.of(ca_only_sshd), tmp_path)
    assert tenant.key is not None
    r = client_for(gw, tmp_path).ssh(tenant.key, tenant.sandbox_id, "echo nope")
    assert r.returncode == 255
    assert b"nope" not in r.stdout
    assert f"{tenant.sandbox_id} refused the gateway's login".encode() in r.stderr
    assert b"must trust the gateway's upstream key" in r.stderr
    assert gw.events("upstream_certificate") == []  # no certificate on a shared connection


def test_a_sandbox_that_trusts_only_the_static_key_still_takes_dedicated_connections(
    gateway_factory: GatewayFactory,
    tenant: Tenant,
    user_ca: Path,
    tmp_path: Path,
    agent: list[Agent],
) -> None:
    """The session sandbox has no TrustedUserCAKeys: the certificate is refused, the key alone
    is offered next and accepted."""
    gw: GatewayProcess = gateway_factory({"RTGW_UPSTREAM_CA_KEY_FILE": str(user_ca)})
    key = tenant.key
    assert key is not None
    agent.append(Agent(tmp_path, key))
    r = ssh_with_agent(client_for(gw, tmp_path), key, agent[0], tenant.sandbox_id, "echo ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"ok\n"
    assert gw.events("upstream_certificate")


def test_a_ca_key_others_can_read_stops_the_start(
    gateway_factory: GatewayFactory, keys_dir: Path
) -> None:
    loose = keys_dir / "loose_ca"
    certificates.generate_ca_key(loose)
    loose.chmod(0o644)
    with pytest.raises(RuntimeError, match="chmod 600"):
        gateway_factory({"RTGW_UPSTREAM_CA_KEY_FILE": str(loose)}, timeout=15)


# --- (c) host keys trusted through a host CA ---


@pytest.fixture(scope="module")
def host_cas(keys_dir: Path) -> tuple[Path, Path, Path]:
    """Our host CA, another one, and the file that trusts ours (upstream.host_ca_keys_file)."""
    ours, other = keys_dir / "host_ca", keys_dir / "other_host_ca"
    certificates.generate_ca_key(ours)
    certificates.generate_ca_key(other)
    trusted = keys_dir / "trusted_host_cas"
    trusted.write_text(f"# sandbox host CA\n{ca_line(ours)}\n")
    return ours, other, trusted


@pytest.fixture(scope="module")
def static_line(state_dir: Path) -> str:
    return hostkeys.public_line(hostkeys.load_upstream_key(state_dir))


@pytest.fixture(scope="module")
def certified_sshds(
    host_cas: tuple[Path, Path, Path], static_line: str
) -> Iterator[tuple[SandboxSshd, SandboxSshd]]:
    """Sandboxes whose host keys are certified by our host CA, and by the other one."""
    ours, other, _ = host_cas
    started = []
    try:
        for ca in (ours, other):
            sshd = SandboxSshd(authorized_keys=[static_line], host_ca_key=str(ca))
            sshd.start()
            started.append(sshd)
        yield started[0], started[1]
    finally:
        for sshd in started:
            sshd.stop()


def unpinned(sshd: SandboxSshd, tmp_path: Path, *, stale_pin: bool = False) -> Upstream:
    """The sandbox's endpoint with no host key pinned (trusted through the host CA only,
    migration 0006), or with some other host key pinned (a stale pin)."""
    if not stale_pin:
        return Upstream(sshd.host, sshd.port, sshd.login_user, ())
    stranger = make_key(tmp_path, unique("stale-host-key")).public_line
    return Upstream(sshd.host, sshd.port, sshd.login_user, (" ".join(stranger.split()[:2]),))


def test_a_host_certificate_from_the_trusted_host_ca_replaces_the_pin(
    gateway_factory: GatewayFactory,
    database_url: str,
    host_cas: tuple[Path, Path, Path],
    certified_sshds: tuple[SandboxSshd, SandboxSshd],
    tmp_path: Path,
) -> None:
    _, _, trusted = host_cas
    ours_sshd, other_sshd = certified_sshds
    gw: GatewayProcess = gateway_factory({"RTGW_UPSTREAM_HOST_CA_KEYS_FILE": str(trusted)})
    plain: GatewayProcess = gateway_factory({})
    tenant = tenant_on(database_url, unpinned(ours_sshd, tmp_path), tmp_path)
    key = tenant.key
    assert key is not None
    r = client_for(gw, tmp_path).ssh(key, tenant.sandbox_id, "echo certified")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"certified\n"
    # Without the host CA the same sandbox is refused: its key is not the pinned one.
    r = client_for(plain, tmp_path).ssh(key, tenant.sandbox_id, "echo nope")
    assert r.returncode == 255
    assert b"presented an unexpected host key" in r.stderr

    # A stale pin beside the certificate changes nothing.
    stale = tenant.add_sandbox(unpinned(ours_sshd, tmp_path, stale_pin=True))
    r = client_for(gw, tmp_path).ssh(key, stale, "echo certified")
    assert r.returncode == 0, r.stderr

    # Signed by another CA, not pinned: refused with the host-key message, logged as an error.
    other = tenant.add_sandbox(unpinned(other_sshd, tmp_path))
    r = client_for(gw, tmp_path).ssh(key, other, "echo nope")
    assert r.returncode == 255
    assert b"nope" not in r.stdout
    assert f"{other} presented an unexpected host key".encode() in r.stderr
    failed = gw.wait_event(
        "upstream_failed", lambda e: e.get("reason") == "upstream_host_key_mismatch"
    )
    assert failed["level"] == "error"
    assert "Host CA key is not trusted" in failed["error"]


def test_a_host_certificate_for_another_host_name_is_refused(
    gateway_factory: GatewayFactory,
    database_url: str,
    host_cas: tuple[Path, Path, Path],
    static_line: str,
    tmp_path: Path,
) -> None:
    ours, _, trusted = host_cas
    gw: GatewayProcess = gateway_factory({"RTGW_UPSTREAM_HOST_CA_KEYS_FILE": str(trusted)})
    with SandboxSshd(
        authorized_keys=[static_line],
        host_ca_key=str(ours),
        host_certificate_principals=["sandbox-elsewhere.example"],
    ) as sshd:
        tenant = tenant_on(database_url, unpinned(sshd, tmp_path), tmp_path)
        assert tenant.key is not None
        r = client_for(gw, tmp_path).ssh(tenant.key, tenant.sandbox_id, "echo nope")
    assert r.returncode == 255
    assert b"presented an unexpected host key" in r.stderr
    failed = gw.wait_event("upstream_failed")
    assert "principal mismatch" in failed["error"]


def test_a_pinned_key_still_counts_when_its_certificate_comes_from_another_ca(
    gateway_factory: GatewayFactory,
    database_url: str,
    host_cas: tuple[Path, Path, Path],
    certified_sshds: tuple[SandboxSshd, SandboxSshd],
    tmp_path: Path,
) -> None:
    """Trusted "in addition to" the pins: the plain key is checked against them (as OpenSSH
    falls back to the plain key when no CA matches)."""
    _, _, trusted = host_cas
    _, other_sshd = certified_sshds
    gw: GatewayProcess = gateway_factory({"RTGW_UPSTREAM_HOST_CA_KEYS_FILE": str(trusted)})
    tenant = tenant_on(database_url, Upstream.of(other_sshd), tmp_path)
    assert tenant.key is not None
    r = client_for(gw, tmp_path).ssh(tenant.key, tenant.sandbox_id, "echo pinned")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"pinned\n"
