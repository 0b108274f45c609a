"""API keys of an organization: stored as sha256 of the secret, never the secret itself.

Every statement filters on ``org_id`` except :func:`authenticate`, which is how a request finds
its organization in the first place: it looks the row up by the key's public ``lookup`` part and
compares the stored hash with :func:`keystore.tokens.verify` (constant time).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from keystore import tokens
from keystore.db import Executor, acquire, unavailable_on_failure
from keystore.errors import InvalidInput, InvalidToken, KeystoreError, NotFound
from keystore.models import Creator
from keystore.printable import name_or_none

__all__ = [
    "MAX_GRACE",
    "ApiKey",
    "AuthenticationFailed",
    "CreatedApiKey",
    "authenticate",
    "check_name",
    "create_key",
    "get_key",
    "list_keys",
    "revoke_key",
    "rotate_key",
    "touch_last_used",
]

MAX_GRACE = dt.timedelta(days=30)
"""The longest grace period a rotation may leave the old key working."""

# last_used_at is a hint, not an audit trail: write it at most once per key and minute.
TOUCH_INTERVAL = dt.timedelta(seconds=60)

_COLUMNS = (
    "id, org_id, name, environment, lookup, scopes, created_at, expires_at, last_used_at, "
    "revoked_at, created_by, created_by_type, created_by_member"
)

# A well-formed hash to compare against when the lookup finds nothing, so that an unknown key
# costs the same comparison as a known one.
_DUMMY_HASH = tokens.hash_token("rt_live_" + "0" * (tokens.LOOKUP_LEN + tokens.SECRET_LEN))


class AuthenticationFailed(KeystoreError):
    """The presented API key cannot be used. ``reason`` says why; ``str()`` is for a person.

    Reasons: ``malformed``, ``unknown``, ``expired``, ``revoked``, ``org_disabled`` (its
    organization was disabled). All but the first two are only ever reported after the secret
    was verified, so they tell nothing to a guesser.
    """

    code = "invalid_api_key"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ApiKey:
    """Metadata of an API key. Holds no secret and no hash."""

    id: uuid.UUID
    org_id: uuid.UUID
    name: str
    environment: str
    lookup: str
    scopes: tuple[str, ...]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    created_by: uuid.UUID | None
    """The API key that created this one (None for a member, the CLI, or older keys)."""
    created_by_type: str | None = None
    """``member``, ``api_key``, ``cli``, or None for keys older than that."""
    created_by_member: str | None = None
    """The member's WorkOS user id when a member created it."""

    @property
    def prefix(self) -> str:
        """The non-secret start of the key (``rt_live_`` + lookup), to tell keys apart."""
        return f"rt_{self.environment}_{self.lookup}"

    @property
    def creator(self) -> Creator | None:
        """Who created the key, when known."""
        if self.created_by_type == "member" and self.created_by_member:
            return Creator("member", self.created_by_member)
        if self.created_by_type == "cli":
            return Creator("cli", "cli")
        if self.created_by is not None:
            return Creator("api_key", str(self.created_by))
        return None


@dataclass(frozen=True, slots=True)
class CreatedApiKey:
    key: ApiKey
    secret: str
    """The full API key. Shown once to the person who created it; never stored or logged."""


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        org_id=row["org_id"],
        name=row["name"],
        environment=row["environment"],
        lookup=row["lookup"],
        scopes=tuple(row["scopes"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
        created_by=row["created_by"],
        created_by_type=row["created_by_type"],
        created_by_member=row["created_by_member"],
    )


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidInput("API key name must be a string", code="invalid_name")
    checked = name_or_none(name)
    if checked is None:
        raise InvalidInput("API key name must be 1-200 printable characters", code="invalid_name")
    return checked


async def _insert(
    conn: Executor,
    *,
    org_id: uuid.UUID,
    name: str,
    scopes: tuple[str, ...],
    environment: str,
    expires_in: dt.timedelta | None,
    created_by: Creator | None,
    not_after: dt.datetime | None,
) -> CreatedApiKey:
    issued = tokens.issue(environment)
    creator_key: uuid.UUID | None = None
    if created_by is not None and created_by.type == "api_key":
        creator_key = uuid.UUID(created_by.id)
    # LEAST ignores NULLs: no lifetime and no cap -> never expires; either alone -> that one.
    row = await conn.fetchrow(
        f"""
        INSERT INTO api_keys (org_id, name, environment, lookup, token_hash, scopes,
                              expires_at, created_by, created_by_type, created_by_member)
        VALUES ($1, $2, $3, $4, $5, $6, LEAST(now() + $7::interval, $9::timestamptz),
                $8, $10, $11)
        RETURNING {_COLUMNS}
        """,  # noqa: S608 - constant column list
        org_id,
        name,
        issued.environment,
        issued.lookup,
        issued.token_hash,
        list(scopes),
        expires_in,
        creator_key,
        not_after,
        created_by.type if created_by else None,
        created_by.id if created_by and created_by.type == "member" else None,
    )
    return CreatedApiKey(key=_key(row), secret=issued.token)


async def create_key(
    db: Executor,
    *,
    org_id: uuid.UUID,
    name: str,
    scopes: Sequence[str],
    environment: str = "live",
    expires_in: dt.timedelta | None = None,
    created_by: Creator | None = None,
    not_after: dt.datetime | None = None,
) -> CreatedApiKey:
    """Issue a new key for the org. The secret is in the result and nowhere else.

    ``not_after`` caps its expiry (a key created by a key that expires cannot outlive it).
    """
    name = check_name(name)
    checked = tokens.validate_scopes(list(scopes))
    if expires_in is not None and expires_in <= dt.timedelta(0):
        raise InvalidInput("expiry must be in the future", code="invalid_duration")
    with unavailable_on_failure("creating an API key"):
        try:
            return await _insert(
                db,
                org_id=org_id,
                name=name,
                scopes=checked,
                environment=environment,
                expires_in=expires_in,
                created_by=created_by,
                not_after=not_after,
            )
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFound("organization not found") from exc


async def authenticate(db: Executor, token: str) -> ApiKey:
    """The usable key whose secret is ``token``, or :class:`AuthenticationFailed`.

    The one query here that does not filter on org_id: the token is what names the org.
    """
    try:
        parsed = tokens.parse(token)
    except InvalidToken as exc:
        raise AuthenticationFailed("malformed", str(exc)) from None
    with unavailable_on_failure("checking an API key"):
        row = await db.fetchrow(
            f"SELECT {_COLUMNS}, token_hash, "  # noqa: S608 - constant column list
            "(expires_at IS NOT NULL AND expires_at <= now()) AS expired, "
            "(SELECT o.disabled_at IS NOT NULL FROM organizations o "
            " WHERE o.id = api_keys.org_id) AS org_disabled "
            "FROM api_keys WHERE lookup = $1",
            parsed.lookup,
        )
    stored = bytes(row["token_hash"]) if row is not None else _DUMMY_HASH
    matches = tokens.verify(parsed.token_hash, stored)
    if row is None or not matches or row["environment"] != parsed.environment:
        raise AuthenticationFailed("unknown", "This API key is not valid.")
    if row["revoked_at"] is not None:
        raise AuthenticationFailed("revoked", "This API key has been revoked.")
    if row["expired"]:
        raise AuthenticationFailed("expired", "This API key has expired.")
    if row["org_disabled"]:
        raise AuthenticationFailed("org_disabled", "This API key's organization has been disabled.")
    return _key(row)


async def touch_last_used(db: Executor, org_id: uuid.UUID, key_id: uuid.UUID) -> None:
    """Record a use; a no-op write-wise when it was recorded less than a minute ago."""
    with unavailable_on_failure("recording API key use"):
        await db.execute(
            "UPDATE api_keys SET last_used_at = now() "
            "WHERE org_id = $1 AND id = $2 "
            "AND (last_used_at IS NULL OR last_used_at < now() - $3::interval)",
            org_id,
            key_id,
            TOUCH_INTERVAL,
        )


async def get_key(db: Executor, org_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    """A key of this org that is not revoked; NotFound for anything else, other orgs included."""
    with unavailable_on_failure("reading an API key"):
        row = await db.fetchrow(
            f"SELECT {_COLUMNS} FROM api_keys "  # noqa: S608 - constant column list
            "WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL",
            org_id,
            key_id,
        )
    if row is None:
        raise NotFound("no such API key in this organization")
    return _key(row)


async def list_keys(
    db: Executor,
    org_id: uuid.UUID,
    *,
    include_revoked: bool = False,
    after: tuple[dt.datetime, uuid.UUID] | None = None,
    limit: int = 100,
) -> list[ApiKey]:
    """Keys ordered by (created_at, id); ``after`` is the keyset cursor of the previous page."""
    after_time, after_id = after if after else (None, None)
    with unavailable_on_failure("listing API keys"):
        rows = await db.fetch(
            f"""
            SELECT {_COLUMNS} FROM api_keys
            WHERE org_id = $1
              AND ($2 OR revoked_at IS NULL)
              AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4::uuid))
            ORDER BY created_at, id
            LIMIT $5
            """,  # noqa: S608 - constant column list
            org_id,
            include_revoked,
            after_time,
            after_id,
            limit,
        )
    return [_key(r) for r in rows]


async def revoke_key(db: Executor, org_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    """Revoke at once: the next request with this key is refused."""
    with unavailable_on_failure("revoking an API key"):
        row = await db.fetchrow(
            f"UPDATE api_keys SET revoked_at = now() "  # noqa: S608 - constant column list
            f"WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL RETURNING {_COLUMNS}",
            org_id,
            key_id,
        )
    if row is None:
        raise NotFound("no such API key in this organization")
    return _key(row)


async def rotate_key(
    db: Executor,
    org_id: uuid.UUID,
    key_id: uuid.UUID,
    *,
    grace: dt.timedelta | None = None,
    expires_in: dt.timedelta | None = None,
    created_by: Creator | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[CreatedApiKey, ApiKey]:
    """Issue a successor with the same name, scopes and environment; retire the old key.

    Without ``grace`` the old key is revoked at once. With it, the old key keeps working until
    now + grace (never longer than it would have anyway) and is then refused as expired.
    The successor expires after ``expires_in``, or else after the old key's own lifetime
    (created_at to expires_at) if it had one, or never, and never after ``not_after``.
    Returns (successor, old key as updated).
    """
    if grace is not None and not dt.timedelta(0) < grace <= MAX_GRACE:
        raise InvalidInput(
            f"the grace period must be positive and at most {MAX_GRACE.days} days",
            code="invalid_grace_period",
        )
    with unavailable_on_failure("rotating an API key"):
        async with acquire(db) as conn, conn.transaction():
            old = await conn.fetchrow(
                f"SELECT {_COLUMNS}, "  # noqa: S608 - constant column list
                "(expires_at IS NOT NULL AND expires_at <= now()) AS expired "
                "FROM api_keys WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL FOR UPDATE",
                org_id,
                key_id,
            )
            if old is None or old["expired"]:
                raise NotFound("no such API key in this organization")
            if expires_in is None and old["expires_at"] is not None:
                expires_in = old["expires_at"] - old["created_at"]
            new = await _insert(
                conn,
                org_id=org_id,
                name=old["name"],
                scopes=tuple(old["scopes"]),
                environment=old["environment"],
                expires_in=expires_in,
                created_by=created_by,
                not_after=not_after,
            )
            if grace is None:
                updated = await conn.fetchrow(
                    f"UPDATE api_keys SET revoked_at = now() "  # noqa: S608
                    f"WHERE org_id = $1 AND id = $2 RETURNING {_COLUMNS}",
                    org_id,
                    key_id,
                )
            else:
                updated = await conn.fetchrow(
                    "UPDATE api_keys SET expires_at = "  # noqa: S608
                    "LEAST(coalesce(expires_at, 'infinity'::timestamptz), now() + $3::interval) "
                    f"WHERE org_id = $1 AND id = $2 RETURNING {_COLUMNS}",
                    org_id,
                    key_id,
                    grace,
                )
    return new, _key(updated)
