"""The admin CLI as an operator uses it: real processes, real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.lab.seed import unique
from gateway.lab.user_keys import make_key
from keystore import db as keystore_db
from keystore.migrate import load_migrations, migrate
from tests.integration.support import REPO


def cli(
    database_url: str, *args: str, state_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RTGW_DATABASE_URL=database_url)
    if state_dir is not None:
        env["RTGW_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def test_operator_sets_up_an_org_a_sandbox_and_a_key(database_url: str, tmp_path: Path) -> None:
    org = unique("org")
    assert cli(database_url, "org", "create", org, "--name", "Acme").returncode == 0
    host_key = make_key(tmp_path, "hostkey").public_line
    sid = unique("sandbox")
    r = cli(
        database_url,
        "sandbox",
        "add",
        sid,
        "--org",
        org,
        "--host",
        "10.0.0.7",
        "--port",
        "22",
        "--user",
        "dev",
        "--host-key",
        host_key,
    )
    assert r.returncode == 0, r.stderr
    listed = cli(database_url, "sandbox", "list", "--org", org)
    assert f"{sid}\trunning\tdev@10.0.0.7:22" in listed.stdout

    user = make_key(tmp_path, "user")
    added = cli(database_url, "ssh-key", "add", "--org", org, str(user.pub), "--name", "laptop")
    assert added.returncode == 0, added.stderr
    expected = subprocess.run(
        ["ssh-keygen", "-lf", str(user.pub)], capture_output=True, text=True
    ).stdout.split()[1]
    assert added.stdout.strip() == expected
    keys = cli(database_url, "ssh-key", "list", "--org", org)
    assert expected in keys.stdout and "laptop" in keys.stdout and "active" in keys.stdout

    again = cli(database_url, "ssh-key", "add", "--org", org, str(user.pub))
    assert again.returncode == 1
    assert "already registered" in again.stderr and "laptop" in again.stderr

    assert cli(database_url, "sandbox", "set-status", sid, "stopped").returncode == 0
    assert f"{sid}\tstopped" in cli(database_url, "sandbox", "list", "--org", org).stdout

    revoked = cli(database_url, "ssh-key", "revoke", "--org", org, expected)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in cli(database_url, "ssh-key", "list", "--org", org, "--all").stdout
    assert cli(database_url, "ssh-key", "revoke", "--org", org, expected).returncode == 1


def test_revoking_another_orgs_key_is_not_found(database_url: str, tmp_path: Path) -> None:
    mine, theirs = unique("org"), unique("org")
    for org in (mine, theirs):
        assert cli(database_url, "org", "create", org).returncode == 0
    key = make_key(tmp_path, "k")
    fp = cli(database_url, "ssh-key", "add", "--org", theirs, str(key.pub)).stdout.strip()
    r = cli(database_url, "ssh-key", "revoke", "--org", mine, fp)
    assert r.returncode == 1
    assert "no active SSH key" in r.stderr
    assert "active" in cli(database_url, "ssh-key", "list", "--org", theirs).stdout


def test_a_private_key_given_by_mistake_is_refused_without_echo(
    database_url: str, tmp_path: Path
) -> None:
    org = unique("org")
    cli(database_url, "org", "create", org)
    key = make_key(tmp_path, "k")
    r = cli(database_url, "ssh-key", "add", "--org", org, str(key.path))
    assert r.returncode == 1
    assert "PRIVATE key" in r.stderr or "private key" in r.stderr
    secret_lines = [ln for ln in key.path.read_text().splitlines() if "-----" not in ln]
    assert not any(line in r.stderr + r.stdout for line in secret_lines)
    assert cli(database_url, "ssh-key", "list", "--org", org).stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["org", "create", "Bad Slug"],
        [
            "sandbox",
            "add",
            "not-a-sandbox",
            "--org",
            "x",
            "--host",
            "h",
            "--port",
            "22",
            "--user",
            "u",
            "--host-key",
            "ssh-ed25519 AAAA",
        ],
        ["sandbox", "set-status", "sandbox-does-not-exist-here", "stopped"],
        ["ssh-key", "list", "--org", "no-such-org-anywhere"],
        ["ssh-key", "revoke", "--org", "no-such-org-anywhere", "not-a-uuid"],
        ["ssh-key", "add", "--org", "x", "/nonexistent/key.pub"],
    ],
)
def test_bad_input_exits_1_with_one_clear_line(database_url: str, args: list[str]) -> None:
    r = cli(database_url, *args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("runtools-gateway: ")
    assert "Traceback" not in r.stderr


def test_unreachable_database_is_a_clear_error() -> None:
    r = cli("postgresql://nobody@127.0.0.1:1/none", "org", "list-nothing")
    assert r.returncode == 2  # usage error: unknown subcommand
    r = cli("postgresql://nobody@127.0.0.1:1/none", "migrate")
    assert r.returncode == 1
    assert "database unavailable" in r.stderr
    assert "Traceback" not in r.stderr


def test_upstream_key_prints_the_line_sandboxes_must_trust(
    tmp_path: Path, database_url: str
) -> None:
    r = cli(database_url, "upstream-key", state_dir=tmp_path / "state")
    assert r.returncode == 0
    assert r.stdout.startswith("ssh-ed25519 ")
    assert (tmp_path / "state" / "upstream_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert cli(database_url, "upstream-key", state_dir=tmp_path / "state").stdout == r.stdout


def test_two_migrators_at_once_apply_each_migration_once(empty_database: str) -> None:
    async def go() -> list[int]:
        async def one() -> list[str]:
            async with keystore_db.connect(empty_database) as conn:
                return await migrate(conn)

        a, b = await asyncio.gather(one(), one())
        assert sorted(a + b) == [m.name for m in load_migrations()]
        async with keystore_db.connect(empty_database) as conn:
            again = await migrate(conn)
            assert again == []
            return [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]

    versions = asyncio.run(go())
    assert versions == [m.version for m in load_migrations()]


def test_a_sandbox_needs_a_pin_unless_it_is_trusted_through_the_host_ca(
    database_url: str,
) -> None:
    org = unique("org")
    assert cli(database_url, "org", "create", org).returncode == 0
    endpoint = ["--org", org, "--host", "10.0.0.8", "--port", "22", "--user", "dev"]
    unpinned = unique("sandbox")
    refused = cli(database_url, "sandbox", "add", unpinned, *endpoint)
    assert refused.returncode == 1
    assert "at least one pinned host key is required" in refused.stderr
    assert "--host-ca" in refused.stderr
    assert unpinned not in cli(database_url, "sandbox", "list", "--org", org).stdout
    added = cli(database_url, "sandbox", "add", unpinned, *endpoint, "--host-ca")
    assert added.returncode == 0, added.stderr
    assert unpinned in cli(database_url, "sandbox", "list", "--org", org).stdout
