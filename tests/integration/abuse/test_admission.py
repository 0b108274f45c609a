"""Issue 9, findings 1, 5, 6 and 7: no one source and no one client can take the door away.

Attacking and legitimate traffic come from different loopback addresses (127.0.0.x): the
gateway listens on 127.0.0.1 and a client socket bound to 127.0.0.5 is a different source.
127.0.0.1 itself is exempt from penalties in test gateways (gateway/lab/process.py).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.public_key import SSHLocalKeyPair
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.lab.attacks import FailingLogins, IdleHolder
from gateway.lab.process import GatewayProcess
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, run_db
from gateway.lab.user_keys import UserKey, make_key
from tests.integration.support import GatewayFactory, client_for


def _ssh_from(
    gw: GatewayProcess, workdir: Path, source: str, key: UserKey, login: str, *cmd: str
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    client = client_for(gw, workdir)
    t0 = time.monotonic()
    result = client.ssh(key, login, *cmd, options=["-b", source], timeout=30)
    return result, time.monotonic() - t0


def test_a_clean_source_gets_in_while_others_hold_idle_sockets_and_fail_logins(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    """Finding 1: 150 idle sockets from one address and 20 failing logins a second from
    another; logins from a third address still succeed in under 2 s each."""
    gw = gateway_factory()
    with (
        IdleHolder(gw.ssh_port, "127.0.0.2", 150) as idle,
        FailingLogins(gw.ssh_port, "127.0.0.3", tenant.sandbox_id, 20) as failing,
    ):
        time.sleep(2.0)  # let the attack reach full strength
        times = []
        for _ in range(5):
            result, took = _ssh_from(
                gw, tmp_path, "127.0.0.4", tenant.key, tenant.sandbox_id, "echo", "in"
            )
            assert result.returncode == 0, result.stderr.decode()
            assert result.stdout == b"in\n"
            times.append(took)
            time.sleep(0.5)
    assert idle.opened >= 64 and failing.attempts >= 40  # the attack really ran
    assert max(times) < 2.0, times
    metrics = _metrics(gw)
    assert _sample(metrics, 'rtgw_connections_total{result="too_many_unauthenticated_from_source"}')


def test_fifty_simultaneous_valid_logins_from_one_address_all_succeed(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    """CI runners behind one NAT, parallel rsync, an editor opening several connections."""
    gw = gateway_factory()
    client = client_for(gw, tmp_path)
    cmd = [
        "ssh", *client.base(tenant.key), "-p", str(gw.ssh_port), "-b", "127.0.0.5",
        f"{tenant.sandbox_id}@127.0.0.1", "echo", "ok",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(50)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    failed = [
        (p.returncode, out, err[-300:])
        for p, (out, err) in zip(procs, outputs, strict=True)
        if (p.returncode, out) != (0, b"ok\n")
    ]
    assert failed == [], f"{len(failed)} of 50 failed; gateway log tail: {gw.log_tail()[-2000:]}"


def _metrics(gw: GatewayProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _sample(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _audit_rows(database_url: str, source_ip: str) -> list[dict[str, Any]]:
    rows = run_db(
        database_url,
        lambda c: c.fetch(
            "SELECT action, result, reason, details FROM audit_events"
            " WHERE source_ip = $1 AND action = 'ssh.auth' ORDER BY id",
            source_ip,
        ),
    )
    return [dict(r, details=json.loads(r["details"])) for r in rows]


def _wait_rows(database_url: str, source_ip: str, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        rows = _audit_rows(database_url, source_ip)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


class _BadSignature(SSHLocalKeyPair):
    """A registered key whose signatures are corrupted: every signed request fails."""

    def sign(self, data: bytes) -> bytes:
        sig = bytearray(super().sign(data))
        sig[-1] ^= 0xFF
        return bytes(sig)


async def _attempts_until_disconnect(
    port: int, source: str, login: str, keys: list[Any], switch_names: list[str] | None = None
) -> tuple[int, str]:
    """Connect once and offer ``keys`` (switching login name each time if asked); the number
    of auth attempts the gateway answered, and how the connection ended."""
    offered = [0]

    class Client(asyncssh.SSHClient):
        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            self._conn = conn

        def public_key_auth_requested(self) -> Any:
            if offered[0] >= len(keys):
                return None
            if switch_names:
                # The protocol allows a new login name per request (RFC 4252 5); OpenSSH's
                # client never does it, an attacker does.
                self._conn._username = switch_names[offered[0] % len(switch_names)]  # type: ignore[attr-defined]
            key = keys[offered[0]]
            offered[0] += 1
            return key

    try:
        conn, _ = await asyncio.wait_for(
            asyncssh.create_connection(
                Client,
                "127.0.0.1",
                port,
                local_addr=(source, 0),
                username=login,
                client_keys=None,
                known_hosts=None,
                agent_path=None,
                config=None,
                preferred_auth="publickey",
            ),
            20,
        )
        conn.close()
        return offered[0], "authenticated"
    except asyncssh.DisconnectError as exc:
        return offered[0], exc.reason
    except asyncssh.Error as exc:
        return offered[0], str(exc)


def test_bad_signatures_with_a_registered_key_count_toward_max_auth_tries(
    gateway_factory: GatewayFactory, tenant: Tenant, database_url: str
) -> None:
    """Finding 5: 200 bad signatures went by without a disconnect or an audit row."""
    gw = gateway_factory()
    good = asyncssh.read_private_key(str(tenant.key.path))
    bad = _BadSignature(good, good.convert_to_public(), None, None)
    offered, ended = asyncio.run(
        _attempts_until_disconnect(gw.ssh_port, "127.0.0.6", tenant.sandbox_id, [bad] * 200)
    )
    assert "too many" in ended, ended
    assert offered <= 7, offered  # the client may ask for one more key before it reads why
    rows = _wait_rows(database_url, "127.0.0.6", 1)
    assert len(rows) == 1, rows  # one row for the connection, with its counts
    assert rows[0]["result"] == "refused"
    assert rows[0]["details"]["failed_attempts"] == 6  # ssh.max_auth_tries


def test_switching_login_names_is_capped_and_each_name_looked_up_once(
    gateway_factory: GatewayFactory, tenant: Tenant, database_url: str
) -> None:
    """Finding 5: alternating login names made one database query each, without limit."""
    gw = gateway_factory({"RTGW_SSH_MAX_AUTH_TRIES": "50"})
    keys = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(40)]
    names = [tenant.sandbox_id, "sandbox-nope-1", "sandbox-nope-2", "sandbox-nope-3"]
    offered, ended = asyncio.run(
        _attempts_until_disconnect(gw.ssh_port, "127.0.0.7", tenant.sandbox_id, keys, names)
    )
    assert "too many login names" in ended, ended
    assert offered <= 4, offered
    lookups = [e for e in gw.events("auth_lookup")]
    assert len(lookups) <= 3, lookups  # admission.max_login_names, each looked up once
    rows = _wait_rows(database_url, "127.0.0.7", 1)
    assert (len(rows) == 1 and rows[0]["reason"] == "too_many_login_names") or any(
        r["details"]["refusals"].get("too_many_login_names") for r in rows
    ), rows


def test_a_source_that_keeps_failing_is_refused_before_key_exchange(
    gateway_factory: GatewayFactory, tenant: Tenant, tmp_path: Path
) -> None:
    """Penalties follow failures; a clean source is not affected."""
    gw = gateway_factory({"RTGW_ADMISSION_PENALTY_MIN_SECONDS": "6"})
    stranger = make_key(tmp_path, "stranger")
    for _ in range(3):  # 3 failed connections x 5 s authfail > 6 s
        result, _ = _ssh_from(gw, tmp_path, "127.0.0.8", stranger, tenant.sandbox_id, "true")
        assert result.returncode == 255
    result, _ = _ssh_from(gw, tmp_path, "127.0.0.8", tenant.key, tenant.sandbox_id, "true")
    assert result.returncode == 255  # even the right key: the source is penalized
    assert b"Connection" in result.stderr  # closed before the SSH banner
    result, _ = _ssh_from(gw, tmp_path, "127.0.0.9", tenant.key, tenant.sandbox_id, "echo", "ok")
    assert result.returncode == 0 and result.stdout == b"ok\n", result.stderr
    assert _sample(_metrics(gw), 'rtgw_connections_total{result="source_penalized"}') >= 1


def test_an_unsigned_query_for_a_registered_key_does_no_work_upstream(
    gateway_factory: GatewayFactory,
    make_tenant: Callable[[], Tenant],
    state_dir: Path,
    tmp_path: Path,
) -> None:
    """Finding 6: answering the unsigned query warmed the pool: the gateway logged into the
    sandbox before anyone proved they hold the private key."""
    from gateway.lab.seed import Upstream
    from gateway.ssh import hostkeys

    line = hostkeys.public_line(hostkeys.load_upstream_key(state_dir))
    with SandboxSshd(authorized_keys=[line]) as sshd:
        tenant = make_tenant()
        sandbox = tenant.add_sandbox(Upstream.of(sshd))
        gw = gateway_factory()
        pub_only = tmp_path / "pub-only"
        pub_only.mkdir()
        (pub_only / "id").write_bytes(tenant.key.pub.read_bytes())  # ssh reads id as public
        result, _ = _ssh_from(gw, tmp_path, "127.0.0.1", UserKey(pub_only / "id"), sandbox, "true")
        assert result.returncode == 255  # it could not sign
        time.sleep(1.0)
        log = Path(sshd.log_path).read_text(errors="replace")
        assert "Accepted publickey" not in log, log[-2000:]
        # With the signature, the same key gets in (and only then is the sandbox logged into).
        result, _ = _ssh_from(gw, tmp_path, "127.0.0.1", tenant.key, sandbox, "echo", "ok")
        assert result.returncode == 0 and result.stdout == b"ok\n", result.stderr
        assert "Accepted publickey" in Path(sshd.log_path).read_text(errors="replace")


def _hostile_rsa_line(tmp_path: Path) -> UserKey:
    """A working RSA key pair with a ~3000-bit public exponent (verify costs ~1000x more)."""
    import secrets
    from math import gcd

    base = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    nums = base.private_numbers()
    p, q = nums.p, nums.q
    phi = (p - 1) * (q - 1)
    while True:
        e = secrets.randbits(3000) | 1
        if gcd(e, phi) == 1:
            break
    d = pow(e, -1, phi)
    private = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    ).private_key()
    path = tmp_path / "hostile"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    pub = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_name("hostile.pub").write_bytes(pub + b" hostile\n")
    return UserKey(path)


def test_a_hostile_rsa_key_registered_before_the_rule_cannot_log_in(
    gateway_factory: GatewayFactory, tenant: Tenant, database_url: str, tmp_path: Path
) -> None:
    """Finding 7: a key with a huge public exponent was accepted, at 5.7 ms per verify."""
    key = _hostile_rsa_line(tmp_path)
    blob = key.public_line.split()

    async def insert(conn: Any) -> None:  # as if registered before registration refused it
        import base64
        import hashlib

        fp = "SHA256:" + base64.b64encode(
            hashlib.sha256(base64.b64decode(blob[1])).digest()
        ).decode().rstrip("=")
        project = await conn.fetchval(
            "SELECT id FROM projects WHERE org_id = $1 AND is_default", tenant.org_id
        )
        await conn.execute(
            "INSERT INTO ssh_keys (org_id, project_id, name, algorithm, bits, fingerprint,"
            " public_key) VALUES ($1, $2, 'hostile', 'ssh-rsa', 4096, $3, $4)",
            tenant.org_id,
            project,
            fp,
            f"{blob[0]} {blob[1]}",
        )

    run_db(database_url, insert)
    gw = gateway_factory()
    result, _ = _ssh_from(gw, tmp_path, "127.0.0.1", key, tenant.sandbox_id, "true")
    assert result.returncode == 255, result.stdout
    assert b"Permission denied" in result.stderr
    assert any(e.get("reason") == "rsa_bad_exponent" for e in gw.events("auth_refused")), (
        gw.log_tail()
    )
