"""Re-checking live access: which open sessions would no longer be allowed to start.

A gateway holds, for each live SSH connection, a *grant*: the sandbox it opened, that sandbox's
organization as it was at login, and the key that authenticated (plus, optionally, the upstream
target it was connected to). ``check_grants`` re-evaluates any number of grants against the
database in one round trip; ``invalid_grants`` keeps the ones that must end, with the reason.

Scoping: a key (or CA) counts only inside the organization the grant names, and that
organization must still own the sandbox. A key or CA of another organization never validates a
grant, even when its id is given.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from keystore.db import Executor, unavailable_on_failure

# Why a grant is no longer valid, most fundamental first (the first that applies is reported).
ORG_DELETED = "org_deleted"
ORG_DISABLED = "org_disabled"  # e.g. its WorkOS organization was deleted
SANDBOX_DELETED = "sandbox_deleted"
SANDBOX_MOVED = "sandbox_moved"  # now owned by another organization
SANDBOX_STOPPED = "sandbox_stopped"  # status is not 'running'
KEY_DELETED = "key_deleted"  # no such key in the grant's organization any more
KEY_REVOKED = "key_revoked"
KEY_EXPIRED = "key_expired"
TARGET_CHANGED = "sandbox_target_changed"  # upstream host/port or login user differ
CA_DELETED = "ca_deleted"  # certificate logins: no such CA in the grant's organization any more
CA_REVOKED = "ca_revoked"
CERTIFICATE_REVOKED = "certificate_revoked"  # the CA revoked the certificate's key id or serial
# The certificate was let in by a CA principal (not the sandbox id) the CA no longer has.
CERTIFICATE_PRINCIPAL_REMOVED = "certificate_principal_removed"
REASONS = (
    ORG_DELETED,
    ORG_DISABLED,
    SANDBOX_DELETED,
    SANDBOX_MOVED,
    SANDBOX_STOPPED,
    KEY_DELETED,
    KEY_REVOKED,
    KEY_EXPIRED,
    CA_DELETED,
    CA_REVOKED,
    CERTIFICATE_REVOKED,
    CERTIFICATE_PRINCIPAL_REMOVED,
    TARGET_CHANGED,
)

KEY = "key"
CERTIFICATE = "certificate"


@dataclass(frozen=True, slots=True)
class Grant:
    """What one live connection was allowed at login.

    The upstream fields are optional: when given, a grant whose sandbox now points elsewhere
    (another host, port or login user) is reported as ``sandbox_target_changed``.

    For a login with a certificate (``credential`` ``certificate``), ``key_id`` is the id of
    the CA that signed it, and ``cert_key_id`` / ``cert_serial`` name the certificate, so that
    revoking either ends the connection. ``cert_principals``: the CA's extra principals the
    certificate was let in by, when it does not name the sandbox itself (None: it does); the
    grant ends once the CA has none of them any more.
    """

    sandbox_id: str
    org_id: uuid.UUID
    key_id: uuid.UUID
    upstream_host: str | None = None
    upstream_port: int | None = None
    login_user: str | None = None
    credential: str = KEY
    cert_key_id: str | None = None
    cert_serial: int | None = None
    cert_principals: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class GrantCheck:
    """The current verdict on a grant: ``reason`` None means still valid.

    ``key_expires_at`` is the key's current expiry (None: never, or the key is gone), so a caller
    can (re)schedule the end of a session whose key's ``expires_at`` was changed.
    """

    grant: Grant
    reason: str | None
    key_expires_at: dt.datetime | None

    @property
    def valid(self) -> bool:
        return self.reason is None


# One row per input grant (WITH ORDINALITY keeps the input order), LEFT JOINs so that a missing
# row is a reason rather than a dropped grant. The key is joined on the grant's org_id and the
# sandbox must still belong to that same org, so a key is only ever counted for the
# organization of the sandbox.
_CHECK_SQL = """
SELECT g.n,
       CASE
           WHEN o.id IS NULL THEN 'org_deleted'
           WHEN o.disabled_at IS NOT NULL THEN 'org_disabled'
           WHEN s.id IS NULL THEN 'sandbox_deleted'
           WHEN s.org_id <> g.org_id THEN 'sandbox_moved'
           WHEN s.status <> 'running' THEN 'sandbox_stopped'
           WHEN g.credential = 'key' AND k.id IS NULL THEN 'key_deleted'
           WHEN g.credential = 'key' AND k.revoked_at IS NOT NULL THEN 'key_revoked'
           WHEN g.credential = 'key' AND k.expires_at IS NOT NULL AND k.expires_at <= now()
               THEN 'key_expired'
           WHEN g.credential = 'certificate' AND c.id IS NULL THEN 'ca_deleted'
           WHEN g.credential = 'certificate' AND c.revoked_at IS NOT NULL THEN 'ca_revoked'
           WHEN g.credential = 'certificate' AND EXISTS (
                    SELECT 1 FROM ssh_cert_revocations r
                    WHERE r.org_id = g.org_id AND r.ca_id = g.key_id
                      AND (r.cert_key_id = g.cert_key_id OR r.serial = g.cert_serial))
               THEN 'certificate_revoked'
           WHEN g.credential = 'certificate' AND g.cert_principals IS NOT NULL
                AND NOT (ARRAY(SELECT jsonb_array_elements_text(g.cert_principals::jsonb))
                         && c.principals)
               THEN 'certificate_principal_removed'
           WHEN (g.upstream_host IS NOT NULL AND g.upstream_host <> s.upstream_host)
             OR (g.upstream_port IS NOT NULL AND g.upstream_port <> s.upstream_port)
             OR (g.login_user IS NOT NULL AND g.login_user <> s.login_user)
               THEN 'sandbox_target_changed'
       END AS reason,
       k.expires_at
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::integer[], $6::text[],
            $7::text[], $8::text[], $9::numeric[], $10::text[])
         WITH ORDINALITY AS g(sandbox_id, org_id, key_id, upstream_host, upstream_port,
                              login_user, credential, cert_key_id, cert_serial, cert_principals,
                              n)
LEFT JOIN organizations o ON o.id = g.org_id
LEFT JOIN sandboxes s ON s.id = g.sandbox_id
LEFT JOIN ssh_keys k ON g.credential = 'key' AND k.id = g.key_id AND k.org_id = g.org_id
LEFT JOIN ssh_cert_authorities c
       ON g.credential = 'certificate' AND c.id = g.key_id AND c.org_id = g.org_id
ORDER BY g.n
"""


async def check_grants(db: Executor, grants: Iterable[Grant]) -> list[GrantCheck]:
    """The verdict on every grant, in input order, in one query (none for an empty input)."""
    batch: Sequence[Grant] = list(grants)
    if not batch:
        return []
    with unavailable_on_failure("re-checking live access"):
        rows = await db.fetch(
            _CHECK_SQL,
            [g.sandbox_id for g in batch],
            [g.org_id for g in batch],
            [g.key_id for g in batch],
            [g.upstream_host for g in batch],
            [g.upstream_port for g in batch],
            [g.login_user for g in batch],
            [g.credential for g in batch],
            [g.cert_key_id for g in batch],
            [g.cert_serial for g in batch],
            # Each grant's principals as one JSON array (unnest cannot take ragged arrays).
            [None if g.cert_principals is None else json.dumps(g.cert_principals) for g in batch],
        )
    return [
        GrantCheck(batch[row["n"] - 1], reason=row["reason"], key_expires_at=row["expires_at"])
        for row in rows
    ]


async def invalid_grants(db: Executor, grants: Iterable[Grant]) -> list[GrantCheck]:
    """The grants that are no longer valid, each with its ``reason``, in input order."""
    return [check for check in await check_grants(db, grants) if not check.valid]
