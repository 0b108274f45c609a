"""Seed a keystore for a lab: an organization whose default project has a sandbox pointing at an
sshd, with public keys registered. The one copy used by the demo, the tests and the bench.

    async with keystore_db.connect(dsn) as conn:
        await migrate(conn)
    tenant = await create_tenant(dsn, Upstream.of(sshd), key=make_key(tmp, "me"))
    tenant.revoke(tenant.key_id)            # synchronous helpers, for scripts and tests

The async functions are for code running an event loop (the demo); :class:`Tenant`'s methods
run their own (``asyncio.run``), so they are for synchronous code only (tests, the bench).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.lab.user_keys import UserKey
from keystore import db as keystore_db
from keystore import keys as keyparse
from keystore import orgs, sandboxes, ssh_keys
from keystore.errors import InvalidPublicKey
from keystore.migrate import migrate
from keystore.models import SshKey

if TYPE_CHECKING:
    from gateway.lab.sandbox_sshd import SandboxSshd

__all__ = ["Tenant", "Upstream", "create_tenant", "migrate_database", "run_db", "unique"]

T = TypeVar("T")


def unique(prefix: str) -> str:
    """``prefix-<10 hex digits>``: a fresh slug, sandbox id or file name."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run_db(url: str, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(conn)`` on a fresh connection, from synchronous code."""

    async def go() -> T:
        async with keystore_db.connect(url) as conn:
            return await fn(conn)

    return asyncio.run(go())


async def migrate_database(url: str) -> list[str]:
    """Apply pending migrations; the names of those applied."""
    async with keystore_db.connect(url) as conn:
        return await migrate(conn)


@dataclass(frozen=True)
class Upstream:
    """Where a sandbox's SSH endpoint is: what ``sandbox add`` records."""

    host: str
    port: int
    user: str
    host_keys: tuple[str, ...]

    @classmethod
    def of(cls, sshd: SandboxSshd) -> Upstream:
        """The endpoint of a running :class:`~gateway.lab.sandbox_sshd.SandboxSshd`."""
        return cls(sshd.host, sshd.port, sshd.login_user, (sshd.host_key_line,))


async def _add_sandbox(
    conn: Any, org_id: uuid.UUID, project_id: uuid.UUID, upstream: Upstream, sandbox_id: str
) -> None:
    await sandboxes.add_sandbox(
        conn,
        sandbox_id=sandbox_id,
        org_id=org_id,
        project_id=project_id,
        upstream_host=upstream.host,
        upstream_port=upstream.port,
        login_user=upstream.user,
        host_keys=list(upstream.host_keys),
        host_ca=not upstream.host_keys,  # no pin: trusted through the gateway's host CA only
    )


@dataclass
class Tenant:
    """One organization with a sandbox and the keys registered when it was made.

    :param key: the private key made for this tenant, if any (registered first: ``keys[0]``).
    :param keys: the registered keys, in the order given.
    :param skipped: why a public key line was not registered (``skip_invalid=True`` only).
    """

    database_url: str
    slug: str
    org_id: uuid.UUID
    project_id: uuid.UUID
    sandbox_id: str
    key: UserKey | None = None
    keys: list[SshKey] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def key_id(self) -> uuid.UUID:
        """The id of the first registered key."""
        return self.keys[0].id

    def register(self, public_line: str, name: str = "extra") -> uuid.UUID:
        """Register one more public key for the org's default project; its id."""
        parsed = keyparse.parse_public_key(public_line)

        async def add(conn: Any) -> SshKey:
            return await ssh_keys.add_key(
                conn, org_id=self.org_id, project_id=self.project_id, key=parsed, name=name
            )

        return run_db(self.database_url, add).id

    def revoke(self, key_id: uuid.UUID | str) -> None:
        run_db(self.database_url, lambda c: ssh_keys.revoke_key(c, self.org_id, str(key_id)))

    def set_status(self, status: str, sandbox_id: str | None = None) -> None:
        """Mark the tenant's sandbox (or ``sandbox_id``) ``running`` or ``stopped``."""
        sid = sandbox_id or self.sandbox_id
        run_db(self.database_url, lambda c: sandboxes.set_status(c, self.org_id, sid, status))

    def add_sandbox(self, upstream: Upstream, sandbox_id: str | None = None) -> str:
        """Another sandbox of the same org, pointing at ``upstream``; its id."""
        sid = sandbox_id or unique("sandbox")
        run_db(
            self.database_url,
            lambda c: _add_sandbox(c, self.org_id, self.project_id, upstream, sid),
        )
        return sid


async def create_tenant(
    database_url: str,
    upstream: Upstream,
    *,
    slug: str | None = None,
    org_name: str | None = None,
    sandbox_id: str | None = None,
    key: UserKey | None = None,
    key_lines: Sequence[str] = (),
    key_name: str | None = None,
    skip_invalid: bool = False,
) -> Tenant:
    """Create an org (``slug``, default ``org-<random>``) with sandbox ``sandbox_id`` (default
    ``sandbox-<random>``) pointing at ``upstream``, and register ``key`` then ``key_lines``.

    Keys are named ``key_name``, else by their comment. An unusable line raises
    ``InvalidPublicKey``, or with ``skip_invalid`` is left out and explained in ``skipped``.
    The schema must be migrated already (:func:`migrate_database`).
    """
    lines = ([key.public_line] if key is not None else []) + list(key_lines)
    parsed: list[keyparse.ParsedKey] = []
    skipped: list[str] = []
    for line in lines:  # all checked before anything is written
        try:
            parsed.append(keyparse.parse_public_key(line))
        except InvalidPublicKey as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
    async with keystore_db.connect(database_url) as conn:
        org = await orgs.create_org(conn, slug or unique("org"), org_name)
        project = await orgs.get_project(conn, org.id, None)
        tenant = Tenant(
            database_url=database_url,
            slug=org.slug,
            org_id=org.id,
            project_id=project.id,
            sandbox_id=sandbox_id or unique("sandbox"),
            key=key,
            skipped=skipped,
        )
        await _add_sandbox(conn, org.id, project.id, upstream, tenant.sandbox_id)
        for one in parsed:
            name = key_name or one.comment or "lab key"
            tenant.keys.append(
                await ssh_keys.add_key(
                    conn, org_id=org.id, project_id=project.id, key=one, name=name
                )
            )
    return tenant
