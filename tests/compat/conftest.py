"""Real clients, each run twice: straight against the sandbox's sshd and through the gateway.

``end`` is parametrized ``direct`` / ``gateway``; a test runs its flow against ``end`` and
records the outcome; ``same_as_direct`` asserts the gateway's equals the direct one's. Results
go to tests/compat/results.json, which ``python -m tests.compat.table`` renders for the README.
Clients are installed by scripts/bootstrap (never skipped). Marked ``integration`` by folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.lab.process import GatewayProcess
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant
from gateway.lab.user_keys import UserKey
from gateway.ssh import hostkeys

# The integration fixtures (PostgreSQL, sandbox sshd, gateway, tenants), shared with this folder.
from tests.integration.conftest import *  # noqa: F403

RESULTS = Path(__file__).with_name("results.json")
_outcomes: dict[str, dict[str, object]] = {}


@dataclass(frozen=True)
class End:
    """One way to reach the sandbox: host, port, login and the key to use."""

    name: str  # direct | gateway
    port: int
    login: str
    key: UserKey
    workdir: Path  # a directory the sandbox's login user can write (same machine)

    @property
    def dest(self) -> str:
        return f"{self.login}@127.0.0.1"

    def ssh_opts(self) -> list[str]:
        return [
            "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-i", str(self.key.path),
        ]  # fmt: skip


@pytest.fixture(params=["direct", "gateway"])
def end(
    request: pytest.FixtureRequest,
    sandbox_sshd: SandboxSshd,
    gateway: GatewayProcess,
    tenant: Tenant,
    state_dir: Path,
) -> Iterator[End]:
    assert tenant.key is not None
    upstream = hostkeys.public_line(hostkeys.load_upstream_key(state_dir))
    sandbox_sshd.set_authorized_keys([upstream, tenant.key.pub.read_text().strip()])
    work = Path(tempfile.mkdtemp(prefix="rtgw-compat-"))
    os.chmod(work, 0o777)
    if request.param == "direct":
        yield End("direct", sandbox_sshd.port, sandbox_sshd.login_user, tenant.key, work)
    else:
        yield End("gateway", gateway.ssh_port, tenant.sandbox_id, tenant.key, work)


@pytest.fixture
def record(request: pytest.FixtureRequest, end: End) -> Callable[[object], None]:
    """Record this flow's outcome for ``end``; on the gateway, compare with direct's."""
    flow = request.node.originalname.removeprefix("test_")

    def check(outcome: object) -> None:
        entry = _outcomes.setdefault(flow, {"doc": (request.node.obj.__doc__ or "").strip()})
        entry[end.name] = outcome
        if end.name == "gateway" and "direct" in entry:
            entry["same"] = entry["direct"] == outcome
            assert outcome == entry["direct"], f"{flow}: gateway {outcome!r} != direct"

    return check


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _outcomes:
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        old.update({k: {"doc": v["doc"], "same": v.get("same")} for k, v in _outcomes.items()})
        RESULTS.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
