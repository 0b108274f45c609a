"""What the gateway refuses: legacy crypto, SHA-1 signatures, garbage on the port."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant, run_db, unique
from gateway.lab.user_keys import make_key
from tests.integration.support import GatewayFactory, SshClient


def test_sha1_rsa_signature_is_refused_while_sha2_opens(
    ssh_client: SshClient, tenant: Tenant, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    rsa = make_key(tmp_path, unique("rsa"), "rsa", 3072)
    tenant.register(rsa.public_line, "rsa key")
    sha2 = ssh_client.ssh(
        rsa, tenant.sandbox_id, "echo in", options=["-o", "PubkeyAcceptedAlgorithms=rsa-sha2-256"]
    )
    assert sha2.returncode == 0, sha2.stderr
    sha1 = ssh_client.ssh(
        rsa, tenant.sandbox_id, "echo in", options=["-o", "PubkeyAcceptedAlgorithms=ssh-rsa"]
    )
    assert sha1.returncode == 255
    assert sha1.stdout == b""


@pytest.mark.parametrize(
    "option",
    [
        "KexAlgorithms=diffie-hellman-group14-sha1",
        "KexAlgorithms=diffie-hellman-group1-sha1",
        "HostKeyAlgorithms=ssh-rsa",
        "HostKeyAlgorithms=ssh-dss",
        "Ciphers=aes128-cbc",
        "Ciphers=3des-cbc",
        "MACs=hmac-sha1",
    ],
)
def test_legacy_algorithms_are_not_negotiated(
    ssh_client: SshClient, tenant: Tenant, option: str
) -> None:
    options = ["-o", option]
    if option.startswith("MACs"):
        options += ["-o", "Ciphers=aes128-ctr"]  # AEAD ciphers ignore the MAC list
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "true", options=options)
    assert r.returncode == 255
    assert b"no matching" in r.stderr or b"Unable to negotiate" in r.stderr, r.stderr


def test_strict_key_exchange_is_offered_against_terrapin(
    ssh_client: SshClient, tenant: Tenant
) -> None:
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "true", options=["-vvv"])
    assert r.returncode == 0
    assert b"kex-strict-s-v00@openssh.com" in r.stderr


def test_key_types_without_registration_policy_are_refused_at_registration(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from keystore.errors import InvalidPublicKey
    from keystore.keys import parse_public_key

    small = make_key(tmp_path, "small", "rsa", 1024)
    with pytest.raises(InvalidPublicKey) as err:
        parse_public_key(small.public_line)
    assert err.value.code == "rsa_too_small"


def _still_serves(ssh_client: SshClient, tenant: Tenant) -> None:
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "echo alive")
    assert r.returncode == 0 and r.stdout == b"alive\n"


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"SSH-2.0-evil\r\n" + os.urandom(70_000),
        os.urandom(1_000_000),
        b"\x00" * 300_000,
    ],
    ids=["http", "banner-then-noise", "1mb-noise", "nul-flood"],
)
def test_garbage_on_the_ssh_port_is_dropped_and_the_gateway_keeps_serving(
    gateway: GatewayProcess, ssh_client: SshClient, tenant: Tenant, payload: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.ssh_port), timeout=10) as s:
        assert s.recv(256).startswith(b"SSH-2.0-")
        try:
            s.sendall(payload)
            s.settimeout(10)
            while s.recv(65536):
                pass  # the gateway closes the connection
        except (ConnectionResetError, BrokenPipeError):
            pass
    _still_serves(ssh_client, tenant)


@pytest.mark.parametrize(
    ("length", "message"),
    [(500, b"is not a sandbox login"), (5000, b"Username too long")],  # asyncssh caps at 1024
)
def test_a_huge_login_name_is_refused_and_logged_safely(
    ssh_client: SshClient, tenant: Tenant, gateway: GatewayProcess, length: int, message: bytes
) -> None:
    login = "sandbox-" + "a" * length
    r = ssh_client.ssh(tenant.key, login, "true")
    assert r.returncode == 255
    assert message in r.stderr
    assert ("a" * 200) not in gateway.log_path.read_text()
    _still_serves(ssh_client, tenant)


def test_a_silent_client_is_cut_off_at_the_login_timeout(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    proc = gateway_factory({"RTGW_SSH_LOGIN_TIMEOUT_SECONDS": "2"}, state_dir=tmp_path / "state")
    try:
        with socket.create_connection(("127.0.0.1", proc.ssh_port), timeout=10) as s:
            s.recv(256)
            s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            t0 = time.monotonic()
            s.settimeout(10)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            assert time.monotonic() - t0 < 6
    finally:
        proc.stop()


def test_last_used_is_recorded_after_a_login(ssh_client: SshClient, tenant: Tenant) -> None:
    from keystore import ssh_keys

    assert ssh_client.ssh(tenant.key, tenant.sandbox_id, "true").returncode == 0

    def used() -> bool:
        key = run_db(
            tenant.database_url, lambda c: ssh_keys.get_key(c, tenant.org_id, tenant.key_id)
        )
        return key.last_used_at is not None

    deadline = time.monotonic() + 5
    while not used():
        assert time.monotonic() < deadline
        time.sleep(0.1)
