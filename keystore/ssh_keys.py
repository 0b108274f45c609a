"""SSH public keys registered by an organization. Every statement filters on org_id."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from keystore.db import Executor, acquire, unavailable_on_failure
from keystore.errors import Conflict, InvalidInput, NotFound
from keystore.keys import ParsedKey
from keystore.models import Creator, SshKey
from keystore.printable import name_or_none

_COLUMNS = (
    "k.id, k.org_id, k.project_id, p.slug AS project_slug, k.name, k.algorithm, k.bits, "
    "k.fingerprint, k.public_key, k.comment, k.created_at, k.last_used_at, k.revoked_at, "
    "k.expires_at, k.created_by, k.created_by_type"
)
_FROM = "FROM ssh_keys k JOIN projects p ON p.id = k.project_id AND p.org_id = k.org_id"


def _key(row: asyncpg.Record) -> SshKey:
    return SshKey(**{name: row[name] for name in SshKey.__slots__})


def check_name(name: str) -> str:
    checked = name_or_none(name)
    if checked is None:
        raise InvalidInput("key name must be 1-200 printable characters", code="invalid_name")
    return checked


async def add_key(
    db: Executor,
    *,
    org_id: uuid.UUID,
    project_id: uuid.UUID,
    key: ParsedKey,
    name: str,
    expires_at: dt.datetime | None = None,
    created_by: Creator | None = None,
) -> SshKey:
    """Register ``key`` for the org; ``Conflict`` names the key already holding the fingerprint.

    ``created_by``: who registered it (a member, an API key, the CLI), shown with the key; a
    member's keys are revoked when WorkOS says the member left the organization.
    """
    name = check_name(name)
    with unavailable_on_failure("registering an SSH key"):
        try:
            # A savepoint when ``db`` is a connection in a transaction (a member's write, see
            # keystore.members.acting), so the lookup below still works after a conflict.
            async with acquire(db) as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""
                    WITH k AS (
                        INSERT INTO ssh_keys (org_id, project_id, name, algorithm, bits,
                                              fingerprint, public_key, comment, expires_at,
                                              created_by, created_by_type)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                        RETURNING *
                    )
                    SELECT {_COLUMNS} FROM k JOIN projects p
                        ON p.id = k.project_id AND p.org_id = k.org_id
                    """,  # noqa: S608 - constant column list
                    org_id,
                    project_id,
                    name,
                    key.algorithm,
                    key.bits,
                    key.fingerprint,
                    key.public_key,
                    key.comment,
                    expires_at,
                    created_by.id if created_by else None,
                    created_by.type if created_by else None,
                )
        except asyncpg.UniqueViolationError as exc:
            existing = await db.fetchrow(
                "SELECT id, name FROM ssh_keys WHERE org_id = $1 AND fingerprint = $2 "
                "AND revoked_at IS NULL",
                org_id,
                key.fingerprint,
            )
            if existing is None:  # revoked meanwhile: a retry would succeed
                raise Conflict("this key was registered concurrently; retry") from exc
            raise Conflict(
                f"this key ({key.fingerprint}) is already registered for the organization "
                f"as {existing['name']!r} (id {existing['id']})",
                existing_id=str(existing["id"]),
            ) from exc
    return _key(row)


async def list_keys(
    db: Executor,
    org_id: uuid.UUID,
    *,
    project_id: uuid.UUID | None = None,
    include_revoked: bool = False,
    after: tuple[dt.datetime, uuid.UUID] | None = None,
    limit: int = 100,
) -> list[SshKey]:
    """Keys ordered by (created_at, id); ``after`` is the keyset cursor of the previous page."""
    after_time, after_id = after if after else (None, None)
    with unavailable_on_failure("listing SSH keys"):
        rows = await db.fetch(
            f"""
            SELECT {_COLUMNS} {_FROM}
            WHERE k.org_id = $1
              AND ($2::uuid IS NULL OR k.project_id = $2)
              AND ($3 OR k.revoked_at IS NULL)
              AND ($4::timestamptz IS NULL OR (k.created_at, k.id) > ($4, $5::uuid))
            ORDER BY k.created_at, k.id
            LIMIT $6
            """,
            org_id,
            project_id,
            include_revoked,
            after_time,
            after_id,
            limit,
        )
    return [_key(r) for r in rows]


async def get_key(db: Executor, org_id: uuid.UUID, key_id: uuid.UUID) -> SshKey:
    """An active (not revoked) key of this org; NotFound for anything else, other orgs included."""
    with unavailable_on_failure("reading an SSH key"):
        row = await db.fetchrow(
            f"SELECT {_COLUMNS} {_FROM} WHERE k.org_id = $1 AND k.id = $2 AND k.revoked_at IS NULL",
            org_id,
            key_id,
        )
    if row is None:
        raise NotFound("no such SSH key in this organization")
    return _key(row)


async def update_key(
    db: Executor,
    org_id: uuid.UUID,
    key_id: uuid.UUID,
    *,
    name: str | None = None,
    project_id: uuid.UUID | None = None,
    member: str | None = None,
) -> SshKey:
    """Rename and/or move a key; with ``member``, only a key that member registered."""
    if name is not None:
        name = check_name(name)
    with unavailable_on_failure("updating an SSH key"):
        result = await db.execute(
            "UPDATE ssh_keys SET name = coalesce($3, name), project_id = coalesce($4, project_id) "
            "WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL "
            "AND ($5::text IS NULL OR (created_by_type = 'member' AND created_by = $5))",
            org_id,
            key_id,
            name,
            project_id,
            member,
        )
    if result == "UPDATE 0":
        raise NotFound("no such SSH key in this organization")
    return await get_key(db, org_id, key_id)


async def revoke_key(
    db: Executor, org_id: uuid.UUID, id_or_fingerprint: str, *, member: str | None = None
) -> SshKey:
    """Revoke by id or by ``SHA256:`` fingerprint; effective for every login after this returns.

    With ``member``, only a key that member registered is revoked (NotFound otherwise).
    """
    key_id: uuid.UUID | None = None
    fingerprint: str | None = None
    if id_or_fingerprint.startswith("SHA256:"):
        fingerprint = id_or_fingerprint
    else:
        try:
            key_id = uuid.UUID(id_or_fingerprint)
        except ValueError as exc:
            raise InvalidInput(
                "give the key's id (a UUID) or its fingerprint (SHA256:...)", code="invalid_key_ref"
            ) from exc
    with unavailable_on_failure("revoking an SSH key"):
        row = await db.fetchrow(
            f"""
            WITH k AS (
                UPDATE ssh_keys SET revoked_at = now()
                WHERE org_id = $1 AND revoked_at IS NULL
                  AND (id = $2::uuid OR fingerprint = $3::text)
                  AND ($4::text IS NULL OR (created_by_type = 'member' AND created_by = $4))
                RETURNING *
            )
            SELECT {_COLUMNS} FROM k JOIN projects p ON p.id = k.project_id AND p.org_id = k.org_id
            """,  # noqa: S608 - constant column list
            org_id,
            key_id,
            fingerprint,
            member,
        )
    if row is None:
        raise NotFound("no active SSH key with that id or fingerprint in this organization")
    return _key(row)


async def revoke_member_keys(db: Executor, org_id: uuid.UUID, user_id: str) -> list[SshKey]:
    """Revoke every active key the member ``user_id`` registered in the org; the keys revoked.

    Each revocation notifies the gateways (migration 0002), which end the keys' live sessions.
    """
    with unavailable_on_failure("revoking a member's SSH keys"):
        rows = await db.fetch(
            f"""
            WITH k AS (
                UPDATE ssh_keys SET revoked_at = now()
                WHERE org_id = $1 AND created_by_type = 'member' AND created_by = $2
                  AND revoked_at IS NULL
                RETURNING *
            )
            SELECT {_COLUMNS} FROM k JOIN projects p ON p.id = k.project_id AND p.org_id = k.org_id
            ORDER BY k.created_at, k.id
            """,  # noqa: S608 - constant column list
            org_id,
            user_id,
        )
    return [_key(r) for r in rows]


async def touch_last_used(db: Executor, org_id: uuid.UUID, key_id: uuid.UUID) -> None:
    with unavailable_on_failure("recording key use"):
        await db.execute(
            "UPDATE ssh_keys SET last_used_at = now() WHERE org_id = $1 AND id = $2",
            org_id,
            key_id,
        )
