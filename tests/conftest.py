"""Fixtures with real parts: a throwaway PostgreSQL (or $DATABASE_URL), a real OpenSSH sshd as
the sandbox, the gateway as a real subprocess, and the real OpenSSH clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.lab.postgres import ThrowawayCluster
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.ssh import hostkeys
from keystore import db as keystore_db
from keystore import keys as keyparse
from keystore import orgs, sandboxes, ssh_keys
from keystore.migrate import migrate
from tests.support import GatewayProcess, SshClient, UserKey, make_key, unique

T = TypeVar("T")


def run_db(url: str, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(conn)`` on a fresh connection, from synchronous test code."""

    async def go() -> T:
        async with keystore_db.connect(url) as conn:
            return await fn(conn)

    return asyncio.run(go())


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    cluster = None
    if not url:
        cluster = ThrowawayCluster()
        cluster.start()
        url = cluster.dsn
    run_db(url, migrate)
    try:
        yield url
    finally:
        if cluster is not None:
            cluster.stop()


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rtgw-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def state_dir(workdir: Path) -> Path:
    path = workdir / "state"
    hostkeys.load_upstream_key(path)
    return path


@pytest.fixture(scope="session")
def sandbox_sshd(state_dir: Path) -> Iterator[SandboxSshd]:
    line = hostkeys.public_line(hostkeys.load_upstream_key(state_dir))
    sshd = SandboxSshd(authorized_keys=[line])
    sshd.start()
    yield sshd
    sshd.stop()


@pytest.fixture(scope="session")
def gateway(database_url: str, state_dir: Path) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(database_url=database_url, state_dir=state_dir).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def ssh_client(gateway: GatewayProcess, workdir: Path) -> SshClient:
    known = workdir / "known_hosts"
    known.write_text(gateway.known_hosts_line())
    return SshClient(port=gateway.ssh_port, known_hosts=known, workdir=workdir)


@dataclass
class Tenant:
    """One organization with one running sandbox and one registered key."""

    database_url: str
    slug: str
    org_id: Any
    sandbox_id: str
    key: UserKey
    key_id: Any

    def register(self, key: UserKey, name: str = "extra") -> Any:
        parsed = keyparse.parse_public_key(key.public_line)

        async def add(conn: Any) -> Any:
            project = await orgs.get_project(conn, self.org_id, None)
            row = await ssh_keys.add_key(
                conn, org_id=self.org_id, project_id=project.id, key=parsed, name=name
            )
            return row.id

        return run_db(self.database_url, add)

    def revoke(self, key_id: Any) -> None:
        run_db(self.database_url, lambda c: ssh_keys.revoke_key(c, self.org_id, str(key_id)))

    def set_status(self, status: str) -> None:
        run_db(
            self.database_url,
            lambda c: sandboxes.set_status(c, self.org_id, self.sandbox_id, status),
        )

    def add_sandbox(self, *, host: str, port: int, user: str, host_keys: list[str]) -> str:
        sandbox_id = unique("sandbox")

        async def add(conn: Any) -> None:
            project = await orgs.get_project(conn, self.org_id, None)
            await sandboxes.add_sandbox(
                conn,
                sandbox_id=sandbox_id,
                org_id=self.org_id,
                project_id=project.id,
                upstream_host=host,
                upstream_port=port,
                login_user=user,
                host_keys=host_keys,
            )

        run_db(self.database_url, add)
        return sandbox_id


@pytest.fixture
def make_tenant(
    database_url: str, sandbox_sshd: SandboxSshd, tmp_path: Path
) -> Callable[[], Tenant]:
    def make() -> Tenant:
        slug = unique("org")
        key = make_key(tmp_path, unique("id"))
        parsed = keyparse.parse_public_key(key.public_line)

        async def setup(conn: Any) -> Tenant:
            org = await orgs.create_org(conn, slug)
            project = await orgs.get_project(conn, org.id, None)
            sandbox_id = unique("sandbox")
            await sandboxes.add_sandbox(
                conn,
                sandbox_id=sandbox_id,
                org_id=org.id,
                project_id=project.id,
                upstream_host=sandbox_sshd.host,
                upstream_port=sandbox_sshd.port,
                login_user=sandbox_sshd.login_user,
                host_keys=[sandbox_sshd.host_key_line],
            )
            row = await ssh_keys.add_key(
                conn, org_id=org.id, project_id=project.id, key=parsed, name="laptop"
            )
            return Tenant(database_url, slug, org.id, sandbox_id, key, row.id)

        return run_db(database_url, setup)

    return make


@pytest.fixture
def tenant(make_tenant: Callable[[], Tenant]) -> Tenant:
    return make_tenant()
