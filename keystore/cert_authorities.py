"""SSH user certificate authorities registered by an organization, and the certificates they
revoked (migration 0004). Every statement filters on org_id.

A CA is registered by its plain public key, checked exactly like an SSH key
(:func:`keystore.keys.parse_public_key`: allowed types only, RSA 2048-8192 bits with exponent
65537, no DSA, never a private key, never a certificate) and stored canonically (``TYPE
BASE64``, the comment apart, the ``SHA256:`` fingerprint). A user certificate it signed opens
a sandbox of the organization when it names the sandbox id, or one of the CA's extra
``principals``, among its principals (the login side decides that: gateway/ssh/auth.py
``decide_certificate``, from keystore/sandboxes.py ``access_for``).

A CA is an organization-wide credential: whoever holds its private key can sign certificates
for every sandbox of the organization.

Revoking a certificate names it by its key id (``ssh-keygen -I``) or its serial
(``ssh-keygen -z``), exactly one of them, for one CA. Revoking the same key id or serial of a
CA twice raises :class:`Conflict` naming the existing revocation (nothing is written): the
certificate is revoked already, and a caller that retries can treat the 409 as success.

A CA that was revoked may be registered again (a new row, a new id); the certificates revoked
under every earlier registration of the same key in the organization are copied to it, in the
same transaction, so re-registering a CA never brings back a certificate revoked before.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import unicodedata
import uuid
from collections.abc import Iterable

import asyncpg

from keystore import keys as keyparse
from keystore.db import Executor, acquire, unavailable_on_failure
from keystore.errors import Conflict, InvalidInput, InvalidPublicKey, NotFound
from keystore.keys import ParsedKey
from keystore.models import CertAuthority, CertRevocation, Creator
from keystore.printable import name_or_none, printable
from keystore.sandboxes import SANDBOX_ID

__all__ = [
    "MAX_KEY_ID_CHARS",
    "MAX_PRINCIPALS",
    "MAX_PRINCIPAL_CHARS",
    "MAX_REASON_CHARS",
    "MAX_SERIAL",
    "add_ca",
    "check_key_id",
    "check_name",
    "check_principals",
    "check_reason",
    "check_revocation_target",
    "check_serial",
    "delete_revocation",
    "get_ca",
    "list_cas",
    "list_revocations",
    "parse_ca_key",
    "revoke_ca",
    "revoke_certificate",
    "set_principals",
    "update_ca",
]

MAX_PRINCIPALS = 32
MAX_PRINCIPAL_CHARS = 255
MAX_KEY_ID_CHARS = 1024
MAX_SERIAL = 2**64 - 1
MAX_REASON_CHARS = 500

# Printable ASCII without space and comma: OpenSSH joins principals with commas
# (ssh-keygen -n a,b, AuthorizedPrincipalsCommand output, cert-authority principals="a,b").
_PRINCIPAL = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
# Characters that could hide or spoof text when shown (as in keystore.printable).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})

_CA_COLUMNS = (
    "id, org_id, name, algorithm, bits, fingerprint, public_key, comment, principals, "
    "created_at, revoked_at, created_by, created_by_type"
)
_REVOCATION_COLUMNS = (
    "id, org_id, ca_id, cert_key_id, serial, reason, created_at, created_by, created_by_type"
)
_CA_NOT_FOUND = "no such SSH certificate authority in this organization"


def _ca(row: asyncpg.Record) -> CertAuthority:
    values = {name: row[name] for name in CertAuthority.__slots__}
    values["principals"] = tuple(row["principals"])
    return CertAuthority(**values)


def _revocation(row: asyncpg.Record) -> CertRevocation:
    values = {name: row[name] for name in CertRevocation.__slots__}
    serial = row["serial"]
    values["serial"] = int(serial) if isinstance(serial, decimal.Decimal) else serial
    return CertRevocation(**values)


def _unsafe(text: str) -> bool:
    return any(unicodedata.category(ch) in _UNSAFE_CATEGORIES for ch in text)


# --- pure checks -------------------------------------------------------------------------------


def parse_ca_key(text: str) -> ParsedKey:
    """The CA's public key, checked like an SSH key; :class:`InvalidPublicKey` (with the codes
    of :mod:`keystore.keys`) otherwise. A certificate is refused: a CA is a plain key."""
    try:
        return keyparse.parse_public_key(text)
    except InvalidPublicKey as exc:
        if exc.code != "certificate_not_supported":
            raise
        raise InvalidPublicKey(
            "This is an OpenSSH certificate, not a certificate authority's key. Register the "
            "CA by its plain public key: the .pub file ssh-keygen wrote next to the CA's "
            "private key (e.g. ca.pub after ssh-keygen -t ed25519 -f ca), not a certificate "
            "it signed (a *-cert.pub file).",
            "certificate_not_supported",
        ) from None


def check_name(name: str) -> str:
    """The CA's name, stripped: 1-200 characters, no control characters."""
    if not isinstance(name, str):
        raise InvalidInput("the CA's name must be text", code="invalid_name")
    checked = name_or_none(name)
    if checked is None:
        raise InvalidInput(
            "the CA's name must be 1-200 printable characters, e.g. 'ci signer'",
            code="invalid_name",
        )
    return checked


def check_principals(principals: Iterable[str]) -> tuple[str, ...]:
    """0-32 extra principals, each 1-255 characters of printable ASCII without space or comma,
    none a sandbox id; duplicates dropped, order kept.

    A sandbox id is refused as an extra principal: an extra principal lets a certificate
    naming it into *every* sandbox of the organization, so a certificate signed for one
    sandbox (``ssh-keygen -n sandbox-abc``) would open them all.
    """
    if isinstance(principals, str | bytes):
        raise InvalidInput(
            'principals must be a list of names, e.g. ["deploy", "team-backend"]',
            code="invalid_principal",
        )
    given = list(principals)
    if len(given) > MAX_PRINCIPALS:
        raise InvalidInput(
            f"{len(given)} principals were given; a CA may have at most {MAX_PRINCIPALS}",
            code="too_many_principals",
        )
    seen: dict[str, None] = {}
    for principal in given:
        if not isinstance(principal, str):
            raise InvalidInput("each principal must be a string", code="invalid_principal")
        if not (len(principal) <= MAX_PRINCIPAL_CHARS and _PRINCIPAL.fullmatch(principal)):
            raise InvalidInput(
                f"invalid principal {printable(principal, 80)!r}: a principal is 1-"
                f"{MAX_PRINCIPAL_CHARS} characters of printable ASCII without spaces or commas "
                "(e.g. deploy or team-backend)",
                code="invalid_principal",
            )
        if SANDBOX_ID.fullmatch(principal):
            raise InvalidInput(
                f"{principal!r} is a sandbox id: a certificate naming a sandbox id among its "
                "principals opens that sandbox already; as a CA principal it would open every "
                "sandbox of the organization. Leave it out, or use a group name instead.",
                code="principal_is_sandbox_id",
            )
        seen[principal] = None
    return tuple(seen)


def check_key_id(key_id: str) -> str:
    """A certificate key id to revoke (``ssh-keygen -I``), as it is: 1-1024 characters, no
    control or invisible formatting characters. Compared exactly (no trimming)."""
    if not isinstance(key_id, str):
        raise InvalidInput("key_id must be a string", code="invalid_key_id")
    if not 1 <= len(key_id) <= MAX_KEY_ID_CHARS or _unsafe(key_id):
        raise InvalidInput(
            f"key_id must be the certificate's key id (ssh-keygen -I), 1-{MAX_KEY_ID_CHARS} "
            "printable characters; show a certificate's with: ssh-keygen -Lf id_ed25519-cert.pub",
            code="invalid_key_id",
        )
    return key_id


def check_serial(serial: int) -> int:
    """A certificate serial to revoke (``ssh-keygen -z``): a whole number 0..2**64-1."""
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial <= MAX_SERIAL:
        raise InvalidInput(
            f"serial must be the certificate's serial (ssh-keygen -z), a whole number from 0 to "
            f"{MAX_SERIAL}; show a certificate's with: ssh-keygen -Lf id_ed25519-cert.pub",
            code="invalid_serial",
        )
    return serial


def check_revocation_target(
    cert_key_id: str | None, serial: int | None
) -> tuple[str | None, int | None]:
    """Exactly one of a key id and a serial, each checked."""
    if (cert_key_id is None) == (serial is None):
        which = "both were" if cert_key_id is not None else "neither was"
        raise InvalidInput(
            f"name the certificate to revoke by exactly one of key_id (ssh-keygen -I) and "
            f"serial (ssh-keygen -z); {which} given",
            code="key_id_or_serial",
        )
    if cert_key_id is not None:
        return check_key_id(cert_key_id), None
    assert serial is not None
    return None, check_serial(serial)


def check_reason(reason: str | None) -> str | None:
    """An optional note on why a certificate was revoked: stripped, at most 500 characters, no
    control characters; empty means none."""
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise InvalidInput("reason must be a string", code="invalid_reason")
    reason = reason.strip()
    if len(reason) > MAX_REASON_CHARS or _unsafe(reason):
        raise InvalidInput(
            f"reason must be at most {MAX_REASON_CHARS} printable characters",
            code="invalid_reason",
        )
    return reason or None


# --- certificate authorities -------------------------------------------------------------------


async def add_ca(
    db: Executor,
    org_id: uuid.UUID,
    *,
    public_key_line: str,
    name: str,
    principals: Iterable[str] = (),
    creator: Creator,
) -> CertAuthority:
    """Register the CA whose public key is ``public_key_line`` for the org.

    Everything is checked before anything is written (:class:`InvalidInput`, with the
    ``keystore.keys`` codes for the key). :class:`Conflict` (naming it, ``existing_id``) when
    the key is already an active CA of the org. The certificates revoked under earlier,
    revoked registrations of the same key are copied to the new CA in the same transaction.
    """
    key = parse_ca_key(public_key_line)
    name = check_name(name)
    extra = check_principals(principals)
    with unavailable_on_failure("registering an SSH certificate authority"):
        try:
            # A savepoint when ``db`` is a connection in a transaction (a member's write), so
            # the lookup below still works after a conflict.
            async with acquire(db) as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""
                    INSERT INTO ssh_cert_authorities (org_id, name, algorithm, bits, fingerprint,
                                                      public_key, comment, principals,
                                                      created_by, created_by_type)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                    RETURNING {_CA_COLUMNS}
                    """,  # noqa: S608 - constant column list
                    org_id,
                    name,
                    key.algorithm,
                    key.bits,
                    key.fingerprint,
                    key.public_key,
                    key.comment,
                    list(extra),
                    creator.id,
                    creator.type,
                )
                await conn.execute(
                    """
                    INSERT INTO ssh_cert_revocations (org_id, ca_id, cert_key_id, serial, reason,
                                                      created_at, created_by, created_by_type)
                    SELECT r.org_id, $2::uuid, r.cert_key_id, r.serial, r.reason, r.created_at,
                           r.created_by, r.created_by_type
                    FROM ssh_cert_revocations r
                    JOIN ssh_cert_authorities a ON a.org_id = r.org_id AND a.id = r.ca_id
                    WHERE r.org_id = $1 AND a.fingerprint = $3::text AND a.id <> $2::uuid
                      AND a.revoked_at IS NOT NULL
                    ORDER BY r.created_at, r.id
                    ON CONFLICT DO NOTHING
                    """,
                    org_id,
                    row["id"],
                    key.fingerprint,
                )
        except asyncpg.UniqueViolationError as exc:
            existing = await db.fetchrow(
                "SELECT id, name FROM ssh_cert_authorities WHERE org_id = $1 AND fingerprint = $2 "
                "AND revoked_at IS NULL",
                org_id,
                key.fingerprint,
            )
            if existing is None:  # revoked meanwhile: a retry would succeed
                raise Conflict("this CA was registered concurrently; retry") from exc
            raise Conflict(
                f"this key ({key.fingerprint}) is already a certificate authority of the "
                f"organization, {existing['name']!r} (id {existing['id']}); to change its "
                "principals or name, update that one",
                existing_id=str(existing["id"]),
            ) from exc
    return _ca(row)


async def list_cas(
    db: Executor,
    org_id: uuid.UUID,
    include_revoked: bool = False,
    *,
    after: tuple[dt.datetime, uuid.UUID] | None = None,
    limit: int = 100,
) -> list[CertAuthority]:
    """The org's CAs ordered by (created_at, id); ``after`` is the keyset cursor of the
    previous page."""
    after_time, after_id = after if after else (None, None)
    with unavailable_on_failure("listing SSH certificate authorities"):
        rows = await db.fetch(
            f"""
            SELECT {_CA_COLUMNS} FROM ssh_cert_authorities
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
    return [_ca(r) for r in rows]


async def get_ca(db: Executor, org_id: uuid.UUID, ca_id: uuid.UUID) -> CertAuthority:
    """An active (not revoked) CA of this org; NotFound for anything else, other orgs' too."""
    with unavailable_on_failure("reading an SSH certificate authority"):
        row = await db.fetchrow(
            f"SELECT {_CA_COLUMNS} FROM ssh_cert_authorities "  # noqa: S608 - constant columns
            "WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL",
            org_id,
            ca_id,
        )
    if row is None:
        raise NotFound(_CA_NOT_FOUND)
    return _ca(row)


async def update_ca(
    db: Executor,
    org_id: uuid.UUID,
    ca_id: uuid.UUID,
    *,
    name: str | None = None,
    principals: Iterable[str] | None = None,
) -> CertAuthority:
    """Rename an active CA and/or replace its extra principals (``()`` removes them all)."""
    if name is not None:
        name = check_name(name)
    extra = None if principals is None else list(check_principals(principals))
    with unavailable_on_failure("updating an SSH certificate authority"):
        row = await db.fetchrow(
            f"""
            UPDATE ssh_cert_authorities
            SET name = coalesce($3, name), principals = coalesce($4::text[], principals)
            WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL
            RETURNING {_CA_COLUMNS}
            """,  # noqa: S608 - constant column list
            org_id,
            ca_id,
            name,
            extra,
        )
    if row is None:
        raise NotFound(_CA_NOT_FOUND)
    return _ca(row)


async def set_principals(
    db: Executor, org_id: uuid.UUID, ca_id: uuid.UUID, principals: Iterable[str]
) -> CertAuthority:
    """Replace an active CA's extra principals."""
    return await update_ca(db, org_id, ca_id, principals=principals)


async def revoke_ca(db: Executor, org_id: uuid.UUID, ca_id: uuid.UUID) -> CertAuthority:
    """Revoke an active CA: no certificate it signed opens anything after this returns (the
    change notifies the gateways, which end the sessions it opened). NotFound otherwise."""
    with unavailable_on_failure("revoking an SSH certificate authority"):
        row = await db.fetchrow(
            f"""
            UPDATE ssh_cert_authorities SET revoked_at = now()
            WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL
            RETURNING {_CA_COLUMNS}
            """,  # noqa: S608 - constant column list
            org_id,
            ca_id,
        )
    if row is None:
        raise NotFound(_CA_NOT_FOUND)
    return _ca(row)


# --- revoked certificates ----------------------------------------------------------------------


async def revoke_certificate(
    db: Executor,
    org_id: uuid.UUID,
    ca_id: uuid.UUID,
    *,
    cert_key_id: str | None = None,
    serial: int | None = None,
    reason: str | None = None,
    creator: Creator,
) -> CertRevocation:
    """Revoke the certificates of the org's active CA ``ca_id`` that carry the key id
    ``cert_key_id`` or the serial ``serial`` (exactly one).

    NotFound when ``ca_id`` is no active CA of this org. :class:`Conflict` (``existing_id``:
    the revocation) when that key id or serial is revoked for the CA already; nothing is
    written then.
    """
    cert_key_id, serial = check_revocation_target(cert_key_id, serial)
    reason = check_reason(reason)
    with unavailable_on_failure("revoking a certificate"):
        try:
            async with acquire(db) as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""
                    INSERT INTO ssh_cert_revocations (org_id, ca_id, cert_key_id, serial, reason,
                                                      created_by, created_by_type)
                    SELECT a.org_id, a.id, $3::text, $4::numeric, $5::text, $6::text, $7::text
                    FROM ssh_cert_authorities a
                    WHERE a.org_id = $1 AND a.id = $2 AND a.revoked_at IS NULL
                    RETURNING {_REVOCATION_COLUMNS}
                    """,  # noqa: S608 - constant column list
                    org_id,
                    ca_id,
                    cert_key_id,
                    None if serial is None else decimal.Decimal(serial),
                    reason,
                    creator.id,
                    creator.type,
                )
        except asyncpg.UniqueViolationError as exc:
            existing = await db.fetchval(
                "SELECT id FROM ssh_cert_revocations WHERE org_id = $1 AND ca_id = $2 "
                "AND (cert_key_id = $3::text OR serial = $4::numeric)",
                org_id,
                ca_id,
                cert_key_id,
                None if serial is None else decimal.Decimal(serial),
            )
            what = f"key id {cert_key_id!r}" if cert_key_id is not None else f"serial {serial}"
            if existing is None:  # un-revoked meanwhile: a retry would succeed
                raise Conflict(f"{what} was revoked concurrently; retry") from exc
            raise Conflict(
                f"certificates with {what} are already revoked for this CA (revocation "
                f"{existing}); nothing to do",
                existing_id=str(existing),
            ) from exc
    if row is None:
        raise NotFound(_CA_NOT_FOUND)
    return _revocation(row)


async def list_revocations(
    db: Executor,
    org_id: uuid.UUID,
    ca_id: uuid.UUID,
    *,
    after: tuple[dt.datetime, uuid.UUID] | None = None,
    limit: int = 100,
) -> list[CertRevocation]:
    """The certificates the org's active CA ``ca_id`` revoked, by (created_at, id); NotFound
    when it is no active CA of this org."""
    await get_ca(db, org_id, ca_id)
    after_time, after_id = after if after else (None, None)
    with unavailable_on_failure("listing revoked certificates"):
        rows = await db.fetch(
            f"""
            SELECT {_REVOCATION_COLUMNS} FROM ssh_cert_revocations
            WHERE org_id = $1 AND ca_id = $2
              AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4::uuid))
            ORDER BY created_at, id
            LIMIT $5
            """,  # noqa: S608 - constant column list
            org_id,
            ca_id,
            after_time,
            after_id,
            limit,
        )
    return [_revocation(r) for r in rows]


async def delete_revocation(
    db: Executor, org_id: uuid.UUID, ca_id: uuid.UUID, revocation_id: uuid.UUID
) -> CertRevocation:
    """Un-revoke: certificates of the org's active CA ``ca_id`` with that key id or serial open
    sandboxes again (if valid otherwise). NotFound unless the revocation is the CA's."""
    with unavailable_on_failure("deleting a certificate revocation"):
        row = await db.fetchrow(
            f"""
            DELETE FROM ssh_cert_revocations r
            USING ssh_cert_authorities a
            WHERE r.org_id = $1 AND r.ca_id = $2 AND r.id = $3
              AND a.org_id = r.org_id AND a.id = r.ca_id AND a.revoked_at IS NULL
            RETURNING {", ".join("r." + c for c in _REVOCATION_COLUMNS.split(", "))}
            """,  # noqa: S608 - constant column list
            org_id,
            ca_id,
            revocation_id,
        )
    if row is None:
        raise NotFound("no such certificate revocation for this certificate authority")
    return _revocation(row)
