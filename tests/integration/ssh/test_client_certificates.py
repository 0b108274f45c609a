"""Client certificates as a developer meets them: an organization registers its SSH CA, a user
signs their key with ``ssh-keygen -s`` and logs in with the real ``ssh`` client, which offers
``<key>-cert.pub`` by itself. Accepted when the org's CA signed it, it is valid now and names
the sandbox (or a principal the org gave the CA), and it is not revoked; refused with the usual
registration hint otherwise; a live session ends when its certificate or CA is revoked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.seed import Tenant, unique
from gateway.lab.user_keys import UserKey, make_key
from keystore import db as keystore_db
from keystore.keys import parse_public_key
from tests.integration.revocation.support import (
    REVOCATION_DEADLINE,
    LiveSession,
    access_ended_line,
    cli,
    ended_within,
    sql,
    wait_until,
)
from tests.integration.support import SshClient

REFUSED_HINT = b"none of the keys you offered is registered"


class CA:
    """An organization's SSH certificate authority: a key pair made with ssh-keygen."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.key = make_key(directory, unique(name))

    def sign(
        self,
        user: UserKey,
        *,
        principals: Sequence[str] | None,
        key_id: str = "alice@example",
        serial: int = 1,
        validity: str = "-5m:+1h",
        options: Sequence[str] = (),
    ) -> Path:
        """``ssh-keygen -s``: writes ``<user>-cert.pub``, which ssh offers before the key."""
        cmd = ["ssh-keygen", "-q", "-s", str(self.key.path), "-I", key_id, "-z", str(serial)]
        cmd += ["-V", validity]
        for option in options:
            cmd += ["-O", option]
        if principals is not None:
            cmd += ["-n", ",".join(principals)]
        subprocess.run([*cmd, str(user.pub)], check=True, capture_output=True)
        return user.path.with_name(user.path.name + "-cert.pub")

    def register(self, tenant: Tenant, principals: Sequence[str] = ()) -> uuid.UUID:
        """The org registers this CA (straight into the table the key API writes)."""
        parsed = parse_public_key(self.key.public_line)

        async def add() -> uuid.UUID:
            async with keystore_db.connect(tenant.database_url) as conn:
                value = await conn.fetchval(
                    "INSERT INTO ssh_cert_authorities (org_id, name, algorithm, bits, "
                    "fingerprint, public_key, principals) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                    "RETURNING id",
                    tenant.org_id,
                    "team CA",
                    parsed.algorithm,
                    parsed.bits,
                    parsed.fingerprint,
                    parsed.public_key,
                    list(principals),
                )
                return uuid.UUID(str(value))

        return asyncio.run(add())


@pytest.fixture
def user_key(tmp_path: Path) -> UserKey:
    """A key nobody registered: only its certificate can open anything."""
    return make_key(tmp_path, unique("certuser"))


def _login(client: SshClient, key: UserKey, login: str) -> subprocess.CompletedProcess[bytes]:
    """Not BatchMode: the registration hint comes with the keyboard-interactive attempt a
    client makes once all its keys and certificates were refused."""
    cmd = ["ssh", *client.base(key, batch=False), "-p", str(client.port)]
    return subprocess.run(
        [*cmd, f"{login}@127.0.0.1", "echo in-$(id -un)"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def _revoke(database_url: str, org_id: uuid.UUID, ca_id: uuid.UUID, **which: Any) -> None:
    column, value = next(iter(which.items()))
    sql(
        database_url,
        f"INSERT INTO ssh_cert_revocations (org_id, ca_id, {column}) VALUES ($1, $2, $3)",  # noqa: S608
        org_id,
        ca_id,
        value,
    )


def _audit_certificate(database_url: str, sandbox_id: str, key_id: str) -> Any:
    rows = sql(
        database_url,
        "SELECT details FROM audit_events WHERE action = 'ssh.auth' AND result = 'ok' "
        "AND target = $1 AND details->'certificate'->>'key_id' = $2",
        sandbox_id,
        key_id,
    )
    return rows[0] if rows else None


def test_a_certificate_from_the_orgs_ca_naming_the_sandbox_logs_in(
    ssh_client: SshClient, tenant: Tenant, user_key: UserKey, tmp_path: Path
) -> None:
    ca = CA(tmp_path)
    ca_id = ca.register(tenant)
    ca.sign(user_key, principals=[tenant.sandbox_id], key_id="alice@example", serial=41)
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"in-")
    row = wait_until(
        "the audit row naming the certificate",
        lambda: _audit_certificate(tenant.database_url, tenant.sandbox_id, "alice@example"),
        timeout=5,
    )
    details = row["details"]
    details = details if isinstance(details, dict) else json.loads(details)
    assert details["certificate"]["ca_id"] == str(ca_id)
    assert details["certificate"]["serial"] == "41"


def test_without_its_certificate_the_same_key_is_refused(
    ssh_client: SshClient, tenant: Tenant, user_key: UserKey, tmp_path: Path
) -> None:
    CA(tmp_path).register(tenant)  # a CA is registered, but this key has no certificate
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 255
    assert REFUSED_HINT in result.stderr


@pytest.mark.parametrize(
    ("story", "principals", "validity"),
    [
        ("expired", ["{sandbox}"], "20200101:20200102"),
        ("not yet valid", ["{sandbox}"], "+1d:+2d"),
        ("wrong principal", ["sandbox-somewhere-else", "root"], "-5m:+1h"),
        ("no principal", None, "-5m:+1h"),
    ],
)
def test_a_certificate_outside_its_terms_is_refused_with_the_usual_message(
    ssh_client: SshClient,
    tenant: Tenant,
    user_key: UserKey,
    tmp_path: Path,
    story: str,
    principals: list[str] | None,
    validity: str,
) -> None:
    ca = CA(tmp_path)
    ca.register(tenant)
    names = (
        None if principals is None else [p.format(sandbox=tenant.sandbox_id) for p in principals]
    )
    ca.sign(user_key, principals=names, validity=validity)
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 255, story
    assert REFUSED_HINT in result.stderr, story


def test_a_certificate_from_an_unknown_ca_is_refused(
    ssh_client: SshClient, tenant: Tenant, user_key: UserKey, tmp_path: Path
) -> None:
    CA(tmp_path, "registered").register(tenant)
    CA(tmp_path, "stranger").sign(user_key, principals=[tenant.sandbox_id])
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 255
    assert REFUSED_HINT in result.stderr


@pytest.mark.parametrize("by", ["cert_key_id", "serial"])
def test_a_revoked_certificate_is_refused(
    ssh_client: SshClient, tenant: Tenant, user_key: UserKey, tmp_path: Path, by: str
) -> None:
    ca = CA(tmp_path)
    ca_id = ca.register(tenant)
    ca.sign(user_key, principals=[tenant.sandbox_id], key_id="mallory@example", serial=666)
    _revoke(
        tenant.database_url,
        tenant.org_id,
        ca_id,
        **{by: "mallory@example" if by == "cert_key_id" else 666},
    )
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 255
    assert REFUSED_HINT in result.stderr
    # Another certificate of the same CA still opens the sandbox.
    ca.sign(user_key, principals=[tenant.sandbox_id], key_id="alice@example", serial=667)
    assert _login(ssh_client, user_key, tenant.sandbox_id).returncode == 0


def test_a_revoked_ca_opens_nothing(
    ssh_client: SshClient, tenant: Tenant, user_key: UserKey, tmp_path: Path
) -> None:
    ca = CA(tmp_path)
    ca_id = ca.register(tenant)
    ca.sign(user_key, principals=[tenant.sandbox_id])
    sql(
        tenant.database_url,
        "UPDATE ssh_cert_authorities SET revoked_at = now() WHERE id = $1",
        ca_id,
    )
    assert _login(ssh_client, user_key, tenant.sandbox_id).returncode == 255


def test_a_principal_the_org_gave_its_ca_opens_its_sandboxes(
    ssh_client: SshClient, tenant: Tenant, user_key: UserKey, tmp_path: Path
) -> None:
    ca = CA(tmp_path)
    ca.register(tenant, principals=["team-infra"])
    ca.sign(user_key, principals=["team-infra"])
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 0, result.stderr.decode()


def test_a_certificate_from_another_orgs_ca_is_refused(
    ssh_client: SshClient,
    make_tenant: Any,
    user_key: UserKey,
    tmp_path: Path,
) -> None:
    """Org A's CA, even with a principal that would open every sandbox of A, never opens a
    sandbox of org B, whatever the certificate names."""
    org_a, org_b = make_tenant(), make_tenant()
    ca = CA(tmp_path)
    ca.register(org_a, principals=["everyone"])
    ca.sign(user_key, principals=[org_b.sandbox_id, "everyone", org_a.sandbox_id])
    assert _login(ssh_client, user_key, org_a.sandbox_id).returncode == 0
    result = _login(ssh_client, user_key, org_b.sandbox_id)
    assert result.returncode == 255
    assert REFUSED_HINT in result.stderr


@pytest.mark.parametrize("what", ["certificate", "ca"])
def test_revoking_a_certificate_or_its_ca_ends_the_live_session(
    ssh_client: SshClient,
    gateway: GatewayProcess,
    tenant: Tenant,
    user_key: UserKey,
    tmp_path: Path,
    what: str,
) -> None:
    ca = CA(tmp_path)
    ca_id = ca.register(tenant)
    ca.sign(user_key, principals=[tenant.sandbox_id], key_id="bob@example", serial=9)
    with LiveSession(ssh_client, user_key, tenant.sandbox_id) as session:
        session.wait_started()
        since = time.time()
        if what == "certificate":
            _revoke(tenant.database_url, tenant.org_id, ca_id, serial=9)
        else:
            sql(
                tenant.database_url,
                "UPDATE ssh_cert_authorities SET revoked_at = now() WHERE id = $1",
                ca_id,
            )
        lag = ended_within(session, since, REVOCATION_DEADLINE)
        line = access_ended_line(session)
    assert lag < REVOCATION_DEADLINE
    assert "was revoked" in line, line


def test_a_session_let_in_by_a_ca_principal_ends_when_the_ca_no_longer_has_it(
    ssh_client: SshClient,
    gateway: GatewayProcess,
    tenant: Tenant,
    user_key: UserKey,
    tmp_path: Path,
) -> None:
    """The admin narrows the CA: its "contractors" principal goes. A session that came in by
    it ends within seconds; one whose certificate names the sandbox itself goes on."""
    ca = CA(tmp_path)
    ca_id = ca.register(tenant, principals=["contractors", "staff"])
    ca.sign(user_key, principals=["contractors"], key_id="dana@example", serial=31)
    staff_key = make_key(tmp_path, unique("staff"))
    ca.sign(staff_key, principals=[tenant.sandbox_id], key_id="erin@example", serial=32)
    with (
        LiveSession(ssh_client, user_key, tenant.sandbox_id) as contractor,
        LiveSession(ssh_client, staff_key, tenant.sandbox_id) as staff,
    ):
        contractor.wait_started()
        staff.wait_started()
        since = time.time()
        sql(
            tenant.database_url,
            "UPDATE ssh_cert_authorities SET principals = '{staff}' WHERE id = $1",
            ca_id,
        )
        lag = ended_within(contractor, since, REVOCATION_DEADLINE)
        line = access_ended_line(contractor)
        assert staff.running, staff.err()
    assert lag < REVOCATION_DEADLINE
    assert "no longer grants its principal" in line, line
    # And the narrowed CA lets no new "contractors" login in.
    assert _login(ssh_client, user_key, tenant.sandbox_id).returncode == 255


def test_a_certificates_force_command_and_source_address_are_obeyed(
    ssh_client: SshClient, tenant: Tenant, user_key: UserKey, tmp_path: Path
) -> None:
    """As sshd does: the CA's force-command replaces what the user asked to run, and a
    certificate bound to other source addresses opens nothing from here."""
    ca = CA(tmp_path)
    ca.register(tenant)
    ca.sign(user_key, principals=[tenant.sandbox_id], options=["force-command=echo forced"])
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.strip() == b"forced"
    ca.sign(user_key, principals=[tenant.sandbox_id], options=["source-address=192.0.2.0/24"])
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 255
    ca.sign(user_key, principals=[tenant.sandbox_id], options=["source-address=127.0.0.1/32"])
    assert _login(ssh_client, user_key, tenant.sandbox_id).returncode == 0


def test_an_operator_registers_the_ca_and_revokes_a_certificate_with_the_cli(
    ssh_client: SshClient, tenant: Tenant, user_key: UserKey, tmp_path: Path
) -> None:
    """The whole story with the admin CLI: ssh-ca add, log in, ssh-ca revoke-cert, refused."""
    ca = CA(tmp_path)
    added = cli(
        tenant.database_url,
        "ssh-ca",
        "add",
        "--org",
        tenant.slug,
        "--name",
        "ops CA",
        str(ca.key.pub),
    )
    assert added.returncode == 0, added.stderr
    ca_id = added.stdout.strip()
    ca.sign(user_key, principals=[tenant.sandbox_id], key_id="carol@example", serial=77)
    assert _login(ssh_client, user_key, tenant.sandbox_id).returncode == 0
    revoked = cli(
        tenant.database_url,
        "ssh-ca",
        "revoke-cert",
        "--org",
        tenant.slug,
        ca_id,
        "--serial",
        "77",
    )
    assert revoked.returncode == 0, revoked.stderr
    result = _login(ssh_client, user_key, tenant.sandbox_id)
    assert result.returncode == 255
    assert REFUSED_HINT in result.stderr
