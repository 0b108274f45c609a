"""PROXY protocol v1/v2 on the SSH listener, through the real OpenSSH client (ProxyCommand)."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.lab.seed import Tenant, run_db
from tests.integration.daemon.support import NotifiedGateway
from tests.integration.support import client_for

# ProxyCommand: connect from SOURCE_IP, send a PROXY header claiming CLAIMED:PORT, then relay.
RELAY = """
import os, socket, sys, threading
from gateway.ssh import proxy_protocol as pp
version, source_ip, port, claimed, claimed_port = sys.argv[1:6]
s = socket.socket()
s.bind((source_ip, 0))
s.connect(("127.0.0.1", int(port)))
if version == "v1":
    s.sendall(pp.build_v1((claimed, int(claimed_port)), ("127.0.0.1", int(port))))
elif version == "v2":
    s.sendall(pp.build_v2((claimed, int(claimed_port)), ("127.0.0.1", int(port))))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


@pytest.fixture(scope="module")
def proxied(module_start_gateway: Callable[..., NotifiedGateway]) -> Iterator[NotifiedGateway]:
    gw = module_start_gateway(
        {
            "RTGW_SSH_PROXY_PROTOCOL": "optional",
            "RTGW_SSH_PROXY_TRUSTED_CIDRS": "127.0.0.1/32",
            "RTGW_SSH_PROXY_HEADER_TIMEOUT_SECONDS": "2",
        }
    )
    yield gw
    assert gw.stop() == 0


def _ssh_via(
    gw: NotifiedGateway, tmp: Path, tenant: Tenant, version: str, source: str, claimed: str
) -> tuple[int, bytes, bytes]:
    client = client_for(gw, tmp)
    relay = [sys.executable, str(_relay_file(tmp)), version, source, str(gw.ssh_port), claimed]
    command = " ".join([*relay, "40404"])
    r = client.ssh(
        tenant.key,
        tenant.sandbox_id,
        "echo via-proxy",
        options=["-o", f"ProxyCommand={command}", "-o", f"HostKeyAlias=[127.0.0.1]:{gw.ssh_port}"],
    )
    return r.returncode, r.stdout, r.stderr


def _relay_file(tmp: Path) -> Path:
    path = tmp / "relay.py"
    if not path.exists():
        path.write_text(RELAY)
    return path


def _auth_rows(database_url: str, tenant: Tenant) -> list[dict[str, object]]:
    rows = run_db(
        database_url,
        lambda c: c.fetch(
            "SELECT result, host(source_ip) AS ip, details FROM audit_events "
            "WHERE org_id = $1 AND action = 'ssh.auth' ORDER BY id",
            tenant.org_id,
        ),
    )
    return [dict(r) for r in rows]


def _wait_rows(database_url: str, tenant: Tenant, n: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while len(rows := _auth_rows(database_url, tenant)) < n:
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    return rows


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_trusted_balancer_header_names_the_real_client(
    proxied: NotifiedGateway, database_url: str, tmp_path: Path, tenant: Tenant, version: str
) -> None:
    claimed = "203.0.113.77" if version == "v1" else "2001:db8::77"
    code, out, err = _ssh_via(proxied, tmp_path, tenant, version, "127.0.0.1", claimed)
    assert (code, out) == (0, b"via-proxy\n"), err
    (row,) = _wait_rows(database_url, tenant, 1)
    assert row["result"] == "ok" and row["ip"] == claimed
    assert json.loads(str(row["details"]))["source_port"] == 40404
    logged = proxied.wait_event("auth_ok", lambda e: e.get("peer") == claimed)
    assert logged["peer"] == claimed


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_from_an_untrusted_source_is_refused(
    proxied: NotifiedGateway, database_url: str, tmp_path: Path, tenant: Tenant, version: str
) -> None:
    code, out, _err = _ssh_via(proxied, tmp_path, tenant, version, "127.0.0.2", "198.51.100.1")
    assert code == 255 and out == b""
    proxied.wait_event("proxy_refused", lambda e: e.get("reason") == "proxy_header_untrusted")
    assert _auth_rows(database_url, tenant) == []


def test_optional_mode_serves_plain_clients_with_their_own_address(
    proxied: NotifiedGateway, database_url: str, tmp_path: Path, tenant: Tenant
) -> None:
    code, out, err = _ssh_via(proxied, tmp_path, tenant, "none", "127.0.0.2", "-")
    assert (code, out) == (0, b"via-proxy\n"), err
    (row,) = _wait_rows(database_url, tenant, 1)
    assert row["ip"] == "127.0.0.2"


def test_a_plain_socket_peer_sees_the_banner(proxied: NotifiedGateway) -> None:
    with socket.create_connection(("127.0.0.1", proxied.ssh_port), 5) as s:
        s.sendall(b"SSH-2.0-probe\r\n")
        s.settimeout(5)
        assert s.recv(64).startswith(b"SSH-2.0-")
