"""Members of an organization, signed in through WorkOS: who they are to us, their removal, and
the guard under which their writes run.

A member is named by the WorkOS user id (the session token's ``sub``) within an organization
(the token's ``org_id``, mapped by ``organizations.workos_org_id``). When WorkOS says a member
left the organization (``organization_membership.deleted``), :func:`remove_member` records the
removal and revokes every SSH key the member registered there, in one transaction; the database
then notifies every gateway, which ends those keys' live sessions.

A session token issued before the removal still verifies until it expires. So that it cannot
register a new key meanwhile, :func:`acting` runs each write of a member under an advisory
lock on (organization, member), the same lock :func:`remove_member` takes, and refuses it when
the member was removed after the token was issued. Either the write commits first and the
removal revokes what it wrote, or the removal commits first and the write is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from keystore import orgs, ssh_keys
from keystore.db import Executor, acquire, unavailable_on_failure
from keystore.errors import MemberRemoved
from keystore.models import Creator, Org, SshKey

__all__ = [
    "MemberRemoved",
    "MemberView",
    "acting",
    "remove_member",
    "resolve",
]

# One lock per (organization, member), in the advisory-lock space of 64-bit keys.
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text || '/' || $2::text, 13))"


@dataclass(frozen=True, slots=True)
class MemberView:
    """An organization as one member's session token finds it."""

    org: Org
    removed_at: dt.datetime | None
    """When the member was last removed from the organization (None: never)."""

    def removed_since(self, issued_at: dt.datetime | None) -> bool:
        """True when a token issued at ``issued_at`` predates the member's removal."""
        if self.removed_at is None:
            return False
        return issued_at is None or issued_at <= self.removed_at


async def resolve(db: Executor, workos_org_id: str, user_id: str) -> MemberView | None:
    """The organization mapped to ``workos_org_id`` and the member's removal, in one query;
    None when no organization is mapped to it."""
    if not orgs.WORKOS_ORG_ID.fullmatch(workos_org_id):
        return None
    with unavailable_on_failure("reading a member's organization"):
        row = await db.fetchrow(
            """
            SELECT o.id, o.slug, o.name, o.created_at, o.workos_org_id, o.disabled_at,
                   r.removed_at
            FROM organizations o
            LEFT JOIN workos_member_removals r ON r.org_id = o.id AND r.user_id = $2
            WHERE o.workos_org_id = $1
            """,
            workos_org_id,
            user_id,
        )
    if row is None:
        return None
    return MemberView(org=orgs.org_from_row(row), removed_at=row["removed_at"])


@contextlib.asynccontextmanager
async def acting(
    db: Executor,
    org_id: uuid.UUID,
    creator: Creator | None,
    issued_at: dt.datetime | None = None,
) -> AsyncIterator[Executor]:
    """Where to run a write made by ``creator``; for a member, a connection in a transaction
    holding the member's lock, after checking that the member was not removed since
    ``issued_at`` (their token's ``iat``): :class:`MemberRemoved` otherwise. Anyone else gets
    ``db`` itself."""
    if creator is None or creator.type != "member":
        yield db
        return
    with unavailable_on_failure("checking a member"):
        async with acquire(db) as conn, conn.transaction():
            await conn.execute(_LOCK_SQL, org_id, creator.id)
            removed_at = await conn.fetchval(
                "SELECT removed_at FROM workos_member_removals WHERE org_id = $1 AND user_id = $2",
                org_id,
                creator.id,
            )
            if removed_at is not None and (issued_at is None or issued_at <= removed_at):
                raise MemberRemoved("you are no longer a member of this organization")
            yield conn


async def remove_member(db: Executor, org_id: uuid.UUID, user_id: str) -> list[SshKey]:
    """Record that ``user_id`` left the organization and revoke every SSH key they registered
    there; the keys revoked. Idempotent: a second call revokes nothing new."""
    with unavailable_on_failure("removing a member"):
        async with acquire(db) as conn, conn.transaction():
            await conn.execute(_LOCK_SQL, org_id, user_id)
            await conn.execute(
                """
                INSERT INTO workos_member_removals (org_id, user_id) VALUES ($1, $2)
                ON CONFLICT (org_id, user_id) DO UPDATE SET removed_at = now()
                """,
                org_id,
                user_id,
            )
            return await ssh_keys.revoke_member_keys(conn, org_id, user_id)
