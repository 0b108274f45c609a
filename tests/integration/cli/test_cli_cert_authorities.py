"""The operator registers an organization's SSH certificate authority with the admin CLI and
revokes certificates it signed: real processes, real PostgreSQL, keys made with ssh-keygen."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from gateway.lab.seed import unique
from gateway.lab.user_keys import make_key
from tests.integration.support import REPO


def cli(
    database_url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, RTGW_DATABASE_URL=database_url),
        cwd=REPO,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def fingerprint(pub: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[1]


def new_org(database_url: str) -> str:
    slug = unique("org")
    assert cli(database_url, "org", "create", slug).returncode == 0
    return slug


def test_operator_registers_a_ca_revokes_certificates_it_signed_and_then_the_ca(
    database_url: str, tmp_path: Path
) -> None:
    org = new_org(database_url)
    ca = make_key(tmp_path, "ca", comment="ci-signer")
    added = cli(
        database_url,
        "ssh-ca",
        "add",
        "--org",
        org,
        "--name",
        "CI signer",
        "--principal",
        "deploy",
        "--principal",
        "team-backend",
        str(ca.pub),
    )
    assert added.returncode == 0, added.stderr
    ca_id = added.stdout.strip()
    uuid.UUID(ca_id)
    assert fingerprint(ca.pub) in added.stderr and "deploy, team-backend" in added.stderr

    listed = cli(database_url, "ssh-ca", "list", "--org", org).stdout
    assert f"{ca_id}\t{fingerprint(ca.pub)}\tssh-ed25519\t256\tCI signer\tactive" in listed
    assert "principals deploy,team-backend\tcreated by cli:cli" in listed

    again = cli(
        database_url, "ssh-ca", "add", "--org", org, "--name", "again", "-", stdin=ca.public_line
    )
    assert again.returncode == 1
    assert "already a certificate authority" in again.stderr and "CI signer" in again.stderr

    by_key_id = cli(
        database_url,
        "ssh-ca",
        "revoke-cert",
        "--org",
        org,
        ca_id,
        "--key-id",
        "alice",
        "--reason",
        "laptop stolen",
    )
    assert by_key_id.returncode == 0, by_key_id.stderr
    by_serial = cli(database_url, "ssh-ca", "revoke-cert", "--org", org, ca_id, "--serial", "42")
    assert by_serial.returncode == 0, by_serial.stderr
    revocations = cli(database_url, "ssh-ca", "revocations", "--org", org, ca_id)
    assert revocations.returncode == 0, revocations.stderr
    lines = revocations.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{by_key_id.stdout.strip()}\tkey-id alice\t")
    assert lines[0].endswith("created by cli:cli\tlaptop stolen")
    assert lines[1].startswith(f"{by_serial.stdout.strip()}\tserial 42\t")

    twice = cli(database_url, "ssh-ca", "revoke-cert", "--org", org, ca_id, "--key-id", "alice")
    assert twice.returncode == 1 and "already revoked" in twice.stderr

    revoked = cli(database_url, "ssh-ca", "revoke", "--org", org, ca_id)
    assert revoked.returncode == 0, revoked.stderr
    assert fingerprint(ca.pub) in revoked.stdout
    assert cli(database_url, "ssh-ca", "list", "--org", org).stdout == ""
    assert "\trevoked\t" in cli(database_url, "ssh-ca", "list", "--org", org, "--all").stdout
    assert cli(database_url, "ssh-ca", "revoke", "--org", org, ca_id).returncode == 1

    # Registered again (from stdin): a new id, and the certificates revoked before stay revoked.
    readded = cli(
        database_url, "ssh-ca", "add", "--org", org, "--name", "CI", "-", stdin=ca.public_line
    )
    assert readded.returncode == 0, readded.stderr
    assert readded.stdout.strip() != ca_id
    kept = cli(database_url, "ssh-ca", "revocations", "--org", org, readded.stdout.strip()).stdout
    assert "key-id alice" in kept and "serial 42" in kept


def test_another_orgs_ca_is_not_found_from_the_cli(database_url: str, tmp_path: Path) -> None:
    mine, theirs = new_org(database_url), new_org(database_url)
    ca = make_key(tmp_path, "ca")
    ca_id = cli(database_url, "ssh-ca", "add", "--org", theirs, "--name", "theirs", str(ca.pub))
    assert ca_id.returncode == 0, ca_id.stderr
    their_id = ca_id.stdout.strip()
    for args in (
        ["revoke", "--org", mine, their_id],
        ["revoke-cert", "--org", mine, their_id, "--serial", "1"],
        ["revocations", "--org", mine, their_id],
    ):
        r = cli(database_url, "ssh-ca", *args)
        assert r.returncode == 1, args
        assert "no such SSH certificate authority in this organization" in r.stderr
    assert cli(database_url, "ssh-ca", "list", "--org", mine).stdout == ""
    assert "\tactive\t" in cli(database_url, "ssh-ca", "list", "--org", theirs).stdout
    assert cli(database_url, "ssh-ca", "revocations", "--org", theirs, their_id).stdout == ""


def test_what_cannot_be_a_ca_is_refused_with_one_clear_line(
    database_url: str, tmp_path: Path
) -> None:
    org = new_org(database_url)
    ca = make_key(tmp_path, "ca")
    user = make_key(tmp_path, "user")
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-s",
            str(ca.path),
            "-I",
            "alice",
            "-n",
            "sandbox-abc",
            "-V",
            "+1h",
            str(user.pub),
        ],
        check=True,
        capture_output=True,
    )
    cert = tmp_path / "user-cert.pub"
    refused = {
        "certificate": cli(database_url, "ssh-ca", "add", "--org", org, "--name", "x", str(cert)),
        "private key": cli(
            database_url, "ssh-ca", "add", "--org", org, "--name", "x", str(ca.path)
        ),
        "sandbox id": cli(
            database_url,
            "ssh-ca",
            "add",
            "--org",
            org,
            "--name",
            "x",
            "--principal",
            "sandbox-abc",
            str(ca.pub),
        ),
        "comma": cli(
            database_url,
            "ssh-ca",
            "add",
            "--org",
            org,
            "--name",
            "x",
            "--principal",
            "a,b",
            str(ca.pub),
        ),
        "missing file": cli(
            database_url, "ssh-ca", "add", "--org", org, "--name", "x", str(tmp_path / "nope")
        ),
        "bad id": cli(database_url, "ssh-ca", "revoke", "--org", org, "not-an-id"),
        "serial": cli(
            database_url, "ssh-ca", "revoke-cert", "--org", org, str(uuid.uuid4()), "--serial", "-1"
        ),
    }
    for what, r in refused.items():
        assert r.returncode == 1, (what, r.stderr)
        assert r.stderr.startswith("runtools-gateway: ") and r.stderr.count("\n") == 1, (
            what,
            r.stderr,
        )
    assert "certificate authority" in refused["certificate"].stderr
    assert "PRIVATE key" in refused["private key"].stderr
    secret = [ln for ln in ca.path.read_text().splitlines() if "-----" not in ln]
    assert not any(line in refused["private key"].stderr for line in secret)
    # Both or neither of --key-id and --serial: a usage error.
    both = cli(
        database_url,
        "ssh-ca",
        "revoke-cert",
        "--org",
        org,
        str(uuid.uuid4()),
        "--key-id",
        "a",
        "--serial",
        "1",
    )
    neither = cli(database_url, "ssh-ca", "revoke-cert", "--org", org, str(uuid.uuid4()))
    assert both.returncode == 2 and neither.returncode == 2
    assert cli(database_url, "ssh-ca", "list", "--org", org, "--all").stdout == ""
