"""Issue 13 items 7 and 8: client strings cannot forge log lines or audit-tail lines, no log
line carries a credential, the ops endpoints are on their own loopback listener, and the
database URL can come from a file or a systemd credential."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant, run_db
from tests.integration.support import REPO, GatewayFactory, SshClient

EVIL = "evil\x1b[2J\norg=acme ssh.auth ok"
SECRET = "S3cr3tS3cr3tS3cr3tS3cr3tS3cr3tAB"  # 32 chars: an API key's secret part
TOKEN = "rt_live_" + "L00kupL00kup" + SECRET


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(data)
        s.settimeout(5)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _audit_rows(database_url: str, tenant: Tenant, action: str) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while True:
        rows = run_db(
            database_url,
            lambda c: c.fetch(
                "SELECT action, details FROM audit_events WHERE org_id = $1 AND action = $2",
                tenant.org_id,
                action,
            ),
        )
        if rows or time.monotonic() > deadline:
            return [dict(r) for r in rows]
        time.sleep(0.1)


def test_escape_injection_through_a_subsystem_name(
    gateway: GatewayProcess, ssh_client: SshClient, tenant: Tenant, database_url: str
) -> None:
    ssh_client.ssh(tenant.key, tenant.sandbox_id, EVIL, options=["-s"], timeout=30)
    assert _audit_rows(database_url, tenant, "ssh.session.start")
    time.sleep(0.5)  # the session end row
    env = dict(os.environ, RTGW_DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "gateway", "audit", "tail", "--org", tenant.slug, "-n", "50"]
    r = subprocess.run(cmd, capture_output=True, env=env, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "\x1b" not in out and "\r" not in out
    lines = out.splitlines()
    assert lines, out
    # One event per line, each starting with its timestamp: nothing forged.
    assert all(line[:4].isdigit() and "T" in line.split()[0] for line in lines), out
    assert not any(line.startswith("org=") for line in lines)
    assert any("evil\\x1b[2J\\norg=acme ssh.auth ok" in line for line in lines), out

    # The rows themselves hold the escaped name.
    rows = _audit_rows(database_url, tenant, "ssh.session.start")
    assert "\x1b" not in json.dumps(rows[0]["details"], ensure_ascii=False)

    # The gateway's JSON log: no raw ESC byte, and no value with ESC or a newline in it.
    raw = gateway.log_path.read_bytes()
    assert b"\x1b" not in raw
    mentioning = [e for e in gateway.events() if "evil" in json.dumps(e)]
    assert mentioning
    for event in mentioning:
        for value in event.values():
            if isinstance(value, str):
                assert "\x1b" not in value and "\n" not in value, event


def test_no_log_line_carries_an_authorization_header(gateway: GatewayProcess) -> None:
    before = gateway.log_path.stat().st_size
    # An over-long header line: aiohttp refuses it and logs its parser's error at ERROR.
    long = (
        b"GET /v1/ssh-keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"X" * 9000
        + b"\r\n\r\n"
    )
    assert b" 400 " in _raw_request(gateway.api_port, long)[:20]
    # A malformed one (a control character in the value).
    bad = (
        b"GET /v1/ssh-keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\x01\r\n\r\n"
    )
    assert b" 400 " in _raw_request(gateway.api_port, bad)[:20]
    # A well-formed request with a bad key.
    ok = (
        b"GET /v1/ssh-keys HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    )
    assert b" 401 " in _raw_request(gateway.api_port, ok)[:20]

    def logged() -> bytes:
        with gateway.log_path.open("rb") as f:
            f.seek(before)
            return f.read()

    deadline = time.monotonic() + 5
    while b"aiohttp.server" not in logged() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = logged()
    assert b"aiohttp.server" in text, text[-2000:]  # the parse errors were logged...
    assert SECRET.encode() not in text  # ...without the secret
    assert SECRET.encode() not in gateway.log_path.read_bytes()


def test_ops_endpoints_are_on_their_own_listener(gateway: GatewayProcess) -> None:
    assert gateway.metrics_port not in (0, gateway.api_port)
    assert _get(gateway.metrics_port, "/metrics") == 200
    assert _get(gateway.metrics_port, "/readyz") == 200
    assert _get(gateway.metrics_port, "/healthz") == 200
    for path in ("/metrics", "/readyz", "/healthz"):
        assert _get(gateway.api_port, path) == 404, path


class _UrlNotInEnv(GatewayProcess):
    """A gateway whose environment has no RTGW_DATABASE_URL."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("RTGW_DATABASE_URL", None)
        return env


def test_database_url_from_a_file(
    gateway_factory: GatewayFactory, database_url: str, tmp_path: Path
) -> None:
    url_file = tmp_path / "database-url"
    url_file.write_text(database_url + "\n")
    url_file.chmod(0o600)
    gw = gateway_factory({"RTGW_DATABASE_URL_FILE": str(url_file)}, cls=_UrlNotInEnv)
    assert _get(gw.metrics_port, "/readyz") == 200


def test_database_url_from_a_systemd_credential(
    gateway_factory: GatewayFactory, database_url: str, tmp_path: Path
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "database-url").write_text(database_url + "\n")
    gw = gateway_factory({"CREDENTIALS_DIRECTORY": str(creds)}, cls=_UrlNotInEnv)
    assert _get(gw.metrics_port, "/readyz") == 200
