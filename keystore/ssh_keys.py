"""SSH public keys registered by an organization. Every statement filters on org_id."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from keystore.db import Executor, unavailable_on_failure
from keystore.errors import Conflict, InvalidInput, NotFound
from keystore.keys import ParsedKey
from keystore.models import SshKey

_COLUMNS = (
    "k.id, k.org_id, k.project_id, p.slug AS project_slug, k.name, k.algorithm, k.bits, "
    "k.fingerprint, k.public_key, k.comment, k.created_at, k.last_used_at, k.revoked_at, "
    "k.expires_at"
)
_FROM = "FROM ssh_keys k JOIN projects p ON p.id = k.project_id AND p.org_id = k.org_id"


def _key(row: asyncpg.Record) -> SshKey:
    return SshKey(**{name: row[name] for name in SshKey.__slots__})


def check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 200 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidInput("key name must be 1-200 printable characters", code="invalid_name")
    return name


async def add_key(
    db: Executor,
    *,
    org_id: uuid.UUID,
    project_id: uuid.UUID,
    key: ParsedKey,
    name: str,
    expires_at: dt.datetime | None = None,
) -> SshKey:
    """Register ``key`` for the org; ``Conflict`` names the key already holding the fingerprint."""
    name = check_name(name)
    with unavailable_on_failure("registering an SSH key"):
        try:
            row = await db.fetchrow(
                f"""
                WITH k AS (
                    INSERT INTO ssh_keys (org_id, project_id, name, algorithm, bits,
                                          fingerprint, public_key, comment, expires_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
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
) -> SshKey:
    if name is not None:
        name = check_name(name)
    with unavailable_on_failure("updating an SSH key"):
        result = await db.execute(
            "UPDATE ssh_keys SET name = coalesce($3, name), project_id = coalesce($4, project_id) "
            "WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL",
            org_id,
            key_id,
            name,
            project_id,
        )
    if result == "UPDATE 0":
        raise NotFound("no such SSH key in this organization")
    return await get_key(db, org_id, key_id)


async def revoke_key(db: Executor, org_id: uuid.UUID, id_or_fingerprint: str) -> SshKey:
    """Revoke by id or by ``SHA256:`` fingerprint; effective for every login after this returns."""
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
                RETURNING *
            )
            SELECT {_COLUMNS} FROM k JOIN projects p ON p.id = k.project_id AND p.org_id = k.org_id
            """,  # noqa: S608 - constant column list
            org_id,
            key_id,
            fingerprint,
        )
    if row is None:
        raise NotFound("no active SSH key with that id or fingerprint in this organization")
    return _key(row)


async def touch_last_used(db: Executor, org_id: uuid.UUID, key_id: uuid.UUID) -> None:
    with unavailable_on_failure("recording key use"):
        await db.execute(
            "UPDATE ssh_keys SET last_used_at = now() WHERE org_id = $1 AND id = $2",
            org_id,
            key_id,
        )
