"""Where a sandbox's own sshd is, whom to log in as, and which host keys it may present."""

from __future__ import annotations

from dataclasses import dataclass

from keystore.models import Sandbox


@dataclass(frozen=True, slots=True)
class Target:
    """One sandbox endpoint; the upstream pool keys its connections by it (never across orgs:
    a sandbox belongs to one organization)."""

    sandbox_id: str
    host: str
    port: int
    user: str
    host_keys: tuple[str, ...]

    @classmethod
    def of(cls, sandbox: Sandbox) -> Target:
        return cls(
            sandbox_id=sandbox.id,
            host=sandbox.upstream_host,
            port=sandbox.upstream_port,
            user=sandbox.login_user,
            host_keys=sandbox.host_keys,
        )
