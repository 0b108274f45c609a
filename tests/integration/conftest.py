"""Fixtures with real parts, shared by every area: a throwaway PostgreSQL (or $DATABASE_URL), a
real OpenSSH sshd as the sandbox, the gateway as real subprocesses, the real OpenSSH client, and
organizations seeded with ``gateway.lab.seed``. Area-only fixtures are in each area's conftest.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, Upstream, create_tenant, unique
from gateway.lab.user_keys import make_key
from gateway.ssh import hostkeys
from tests.integration.support import GatewayFactory, SshClient


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rtgw-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def state_dir(workdir: Path) -> Path:
    """The session gateway's state dir; its upstream key is the one the sandbox sshd trusts."""
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


@pytest.fixture
def gateway_factory(
    database_url: str, state_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayFactory]:
    """``gateway_factory(env, **options) -> GatewayProcess``; all stopped after the test."""
    with GatewayFactory(database_url, state_dir, tmp_path_factory.mktemp("gateways")) as factory:
        yield factory


@pytest.fixture(scope="module")
def module_gateway_factory(
    database_url: str, state_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayFactory]:
    """The same, for module-scoped fixtures: all stopped after the module."""
    with GatewayFactory(database_url, state_dir, tmp_path_factory.mktemp("gateways")) as factory:
        yield factory


@pytest.fixture(scope="session")
def gateway(
    database_url: str, state_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The session's gateway, on the shared state dir."""
    with GatewayFactory(database_url, state_dir, tmp_path_factory.mktemp("gateways")) as factory:
        yield factory(state_dir=state_dir)


@pytest.fixture(scope="session")
def ssh_client(gateway: GatewayProcess, workdir: Path) -> SshClient:
    known = workdir / "known_hosts"
    known.write_text(gateway.known_hosts_line())
    return SshClient(port=gateway.ssh_port, known_hosts=known, workdir=workdir)


@pytest.fixture
def make_tenant(
    database_url: str, sandbox_sshd: SandboxSshd, tmp_path: Path
) -> Callable[[], Tenant]:
    """A new org with a sandbox on the session sshd and a fresh key registered as "laptop"."""

    def make() -> Tenant:
        key = make_key(tmp_path, unique("id"))
        return asyncio.run(
            create_tenant(database_url, Upstream.of(sandbox_sshd), key=key, key_name="laptop")
        )

    return make


@pytest.fixture
def tenant(make_tenant: Callable[[], Tenant]) -> Tenant:
    return make_tenant()
