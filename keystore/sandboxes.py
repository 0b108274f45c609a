"""Sandboxes: where a login name leads, and the key set that may open it."""

from __future__ import annotations

import json
import re
import uuid

import asyncpg

from keystore.db import Executor, unavailable_on_failure
from keystore.errors import Conflict, InvalidInput, NotFound
from keystore.models import AuthorizedKey, Sandbox, SandboxAccess, TrustedCA

SANDBOX_ID = re.compile(r"^sandbox-[a-z0-9-]{1,63}$")
LOGIN_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
STATUSES = ("running", "stopped")

_COLUMNS = (
    "s.id, s.org_id, o.slug AS org_slug, s.project_id, s.status, s.upstream_host, "
    "s.upstream_port, s.login_user, s.host_keys, s.created_at"
)


def _sandbox(row: asyncpg.Record) -> Sandbox:
    return Sandbox(
        id=row["id"],
        org_id=row["org_id"],
        org_slug=row["org_slug"],
        project_id=row["project_id"],
        status=row["status"],
        upstream_host=row["upstream_host"],
        upstream_port=row["upstream_port"],
        login_user=row["login_user"],
        host_keys=tuple(row["host_keys"]),
        created_at=row["created_at"],
    )


def check_sandbox_id(sandbox_id: str) -> str:
    if not SANDBOX_ID.fullmatch(sandbox_id):
        raise InvalidInput(
            f"invalid sandbox id {sandbox_id[:80]!r}: expected 'sandbox-' followed by 1-63 of "
            "a-z, 0-9 and '-'",
            code="invalid_sandbox_id",
        )
    return sandbox_id


async def add_sandbox(
    db: Executor,
    *,
    sandbox_id: str,
    org_id: uuid.UUID,
    project_id: uuid.UUID,
    upstream_host: str,
    upstream_port: int,
    login_user: str,
    host_keys: list[str],
    status: str = "running",
    host_ca: bool = False,
) -> None:
    """Register a sandbox's SSH endpoint. Its host key is pinned (``host_keys``), or with
    ``host_ca`` and no pins it is trusted only through the gateway's host CA
    (upstream.host_ca_keys_file; migration 0006)."""
    check_sandbox_id(sandbox_id)
    if not 1 <= upstream_port <= 65535:
        raise InvalidInput(f"port {upstream_port} is out of range 1-65535", code="invalid_port")
    if not LOGIN_USER.fullmatch(login_user):
        raise InvalidInput(f"invalid login user {login_user[:40]!r}", code="invalid_user")
    if status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", code="invalid_status")
    if not host_keys and not host_ca:
        raise InvalidInput(
            "at least one pinned host key is required (or trust the sandbox through the "
            "gateway's host CA: --host-ca)",
            code="no_host_key",
        )
    with unavailable_on_failure("adding a sandbox"):
        try:
            await db.execute(
                "INSERT INTO sandboxes (id, org_id, project_id, status, upstream_host, "
                "upstream_port, login_user, host_keys) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                sandbox_id,
                org_id,
                project_id,
                status,
                upstream_host,
                upstream_port,
                login_user,
                host_keys,
            )
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"sandbox {sandbox_id!r} already exists") from exc


async def set_status(db: Executor, org_id: uuid.UUID, sandbox_id: str, status: str) -> None:
    if status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", code="invalid_status")
    with unavailable_on_failure("updating a sandbox"):
        result = await db.execute(
            "UPDATE sandboxes SET status = $3, updated_at = now() WHERE id = $1 AND org_id = $2",
            sandbox_id,
            org_id,
            status,
        )
    if result == "UPDATE 0":
        raise NotFound(f"no sandbox {sandbox_id!r} in this organization")


async def list_sandboxes(db: Executor, org_id: uuid.UUID) -> list[Sandbox]:
    with unavailable_on_failure("listing sandboxes"):
        rows = await db.fetch(
            f"SELECT {_COLUMNS} FROM sandboxes s JOIN organizations o ON o.id = s.org_id "  # noqa: S608
            "WHERE s.org_id = $1 ORDER BY s.id",
            org_id,
        )
    return [_sandbox(r) for r in rows]


async def find_org_of_sandbox(db: Executor, sandbox_id: str) -> uuid.UUID:
    """Admin CLI only: which org owns a sandbox (the CLI operator is trusted platform-wide)."""
    with unavailable_on_failure("reading a sandbox"):
        org_id = await db.fetchval("SELECT org_id FROM sandboxes WHERE id = $1", sandbox_id)
    if org_id is None:
        raise NotFound(f"no sandbox {sandbox_id!r}")
    return uuid.UUID(str(org_id))


async def access_for(db: Executor, sandbox_id: str) -> SandboxAccess | None:
    """The sandbox, every key and every certificate authority of *its own* organization that
    may open it (with the certificates each CA revoked), in one query.

    The join is on the sandbox's org_id: a key or CA of another organization can never appear.
    A disabled organization's sandbox comes with no key and no CA, so every login to it is refused.
    None when the sandbox does not exist.
    """
    with unavailable_on_failure("loading keys for a login"):
        row = await db.fetchrow(
            f"""
            SELECT {_COLUMNS},
                   coalesce(array_agg(k.id ORDER BY k.created_at)
                            FILTER (WHERE k.id IS NOT NULL), '{{}}') AS key_ids,
                   coalesce(array_agg(k.fingerprint ORDER BY k.created_at)
                            FILTER (WHERE k.id IS NOT NULL), '{{}}') AS key_fps,
                   coalesce(array_agg(k.public_key ORDER BY k.created_at)
                            FILTER (WHERE k.id IS NOT NULL), '{{}}') AS key_lines,
                   coalesce(array_agg(k.expires_at ORDER BY k.created_at)
                            FILTER (WHERE k.id IS NOT NULL), '{{}}') AS key_expiries,
                   (SELECT coalesce(jsonb_agg(jsonb_build_object(
                               'id', c.id,
                               'fingerprint', c.fingerprint,
                               'public_key', c.public_key,
                               'principals', c.principals,
                               'revoked_key_ids',
                               (SELECT coalesce(jsonb_agg(r.cert_key_id), '[]'::jsonb)
                                FROM ssh_cert_revocations r
                                WHERE r.org_id = c.org_id AND r.ca_id = c.id
                                  AND r.cert_key_id IS NOT NULL),
                               'revoked_serials',
                               (SELECT coalesce(jsonb_agg(r.serial::text), '[]'::jsonb)
                                FROM ssh_cert_revocations r
                                WHERE r.org_id = c.org_id AND r.ca_id = c.id
                                  AND r.serial IS NOT NULL))
                           ORDER BY c.created_at), '[]'::jsonb)
                    FROM ssh_cert_authorities c
                    WHERE c.org_id = s.org_id
                      AND c.revoked_at IS NULL
                      AND o.disabled_at IS NULL) AS cas
            FROM sandboxes s
            JOIN organizations o ON o.id = s.org_id
            LEFT JOIN ssh_keys k
                   ON k.org_id = s.org_id
                  AND o.disabled_at IS NULL
                  AND k.revoked_at IS NULL
                  AND (k.expires_at IS NULL OR k.expires_at > now())
            WHERE s.id = $1
            GROUP BY s.id, o.slug, o.disabled_at
            """,  # noqa: S608 - only constant column lists are interpolated
            sandbox_id,
        )
    if row is None:
        return None
    keys = tuple(
        AuthorizedKey(id=kid, fingerprint=fp, public_key=line, expires_at=expires)
        for kid, fp, line, expires in zip(
            row["key_ids"], row["key_fps"], row["key_lines"], row["key_expiries"], strict=True
        )
    )
    cas = tuple(
        TrustedCA(
            id=uuid.UUID(ca["id"]),
            fingerprint=ca["fingerprint"],
            public_key=ca["public_key"],
            principals=tuple(ca["principals"]),
            revoked_key_ids=frozenset(ca["revoked_key_ids"]),
            revoked_serials=frozenset(int(serial) for serial in ca["revoked_serials"]),
        )
        for ca in json.loads(row["cas"])
    )
    return SandboxAccess(sandbox=_sandbox(row), keys=keys, cas=cas)
