"""Real clients, each run twice: straight against the sandbox's sshd and through the gateway.

``end`` is parametrized ``direct`` / ``gateway``; a test runs its flow against ``end`` and
records the outcome; on the gateway ``record`` asserts it equals the direct one's (or, for a
documented bound, that the gateway's differing outcome is a visible refusal). Results go to
tests/compat/results.json, which ``python -m tests.compat.table`` renders for the README.
Clients are installed by scripts/bootstrap (never skipped). Marked ``integration`` by folder.

The fixtures below are built from the same parts as tests/integration/conftest.py (gateway.lab
and tests/integration/support.py); no conftest is imported.
"""

from __future__ import annotations

import asyncio
import json
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
from tests.compat.support import End, Record
from tests.integration.support import GatewayFactory

RESULTS = Path(__file__).with_name("results.json")
_outcomes: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rtgw-compat-state-"))
    hostkeys.load_upstream_key(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def sandbox_sshd(state_dir: Path) -> Iterator[SandboxSshd]:
    line = hostkeys.public_line(hostkeys.load_upstream_key(state_dir))
    sshd = SandboxSshd(authorized_keys=[line])
    sshd.start()
    yield sshd
    sshd.stop()


@pytest.fixture(scope="session")
def gateway(
    database_url: str, state_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with GatewayFactory(database_url, state_dir, tmp_path_factory.mktemp("gateways")) as factory:
        yield factory(state_dir=state_dir)


@pytest.fixture
def tenant(database_url: str, sandbox_sshd: SandboxSshd, tmp_path: Path) -> Tenant:
    key = make_key(tmp_path, unique("id"))
    return asyncio.run(
        create_tenant(database_url, Upstream.of(sandbox_sshd), key=key, key_name="laptop")
    )


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
    os.chmod(work, 0o777)  # the sandbox's login user writes here
    if request.param == "direct":
        known = sandbox_sshd.known_hosts_line + "\n"
        yield End("direct", sandbox_sshd.port, sandbox_sshd.login_user, tenant.key, work, known)
    else:
        known = gateway.known_hosts_line()
        yield End("gateway", gateway.ssh_port, tenant.sandbox_id, tenant.key, work, known)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def record(request: pytest.FixtureRequest, end: End) -> Record:
    """Record this flow's outcome for ``end``; on the gateway, compare with direct's.

    A flow where the gateway may differ on purpose (a documented bound) passes ``accepted``,
    a check of the gateway's outcome (a visible refusal), and ``differs_as``, the words the
    README table shows for it; any other difference fails the test.
    """
    flow = request.node.originalname.removeprefix("test_")

    def check(
        outcome: object,
        *,
        differs_as: str | None = None,
        accepted: Callable[[object], bool] | None = None,
    ) -> None:
        entry = _outcomes.setdefault(flow, {"doc": (request.node.obj.__doc__ or "").strip()})
        entry[end.name] = outcome
        if end.name == "gateway" and "direct" in entry:
            if outcome == entry["direct"]:
                entry["same"] = True
                return
            entry["same"] = False
            assert accepted is not None and accepted(outcome), (
                f"{flow}: gateway {outcome!r} != direct {entry['direct']!r}"
            )
            entry["same"] = differs_as or "differs as documented"

    return check


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _outcomes:
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        old.update({k: {"doc": v["doc"], "same": v.get("same")} for k, v in _outcomes.items()})
        RESULTS.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        if dump := os.environ.get("RTGW_COMPAT_DUMP"):  # every outcome, to read when debugging
            Path(dump).write_text("".join(f"{k}: {v!r}\n" for k, v in _outcomes.items()))
