"""SSH-area fixtures: the session sandbox as an upstream to point extra sandboxes at."""

from __future__ import annotations

import pytest

from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Upstream


@pytest.fixture(scope="session")
def sandbox_upstream(sandbox_sshd: SandboxSshd) -> Upstream:
    """Where the session sandbox sshd listens, as a sandbox row records it; tests point extra
    sandboxes at variants of it (``dataclasses.replace``: a wrong host key, a dead port)."""
    return Upstream.of(sandbox_sshd)
