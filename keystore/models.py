"""Frozen rows returned by keystore queries. Nothing here holds a secret."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Org:
    id: uuid.UUID
    slug: str
    name: str
    created_at: dt.datetime
    workos_org_id: str | None = None
    """The WorkOS organization whose members' session tokens act for this one."""
    disabled_at: dt.datetime | None = None
    """Set when the organization was disabled (its WorkOS organization was deleted)."""


CREATOR_TYPES = ("member", "api_key", "cli")


@dataclass(frozen=True, slots=True)
class Creator:
    """Who registered a key: a member (``id`` is the WorkOS user id), an API key (its id) or
    the admin CLI (``id`` is ``cli``)."""

    type: str
    id: str

    def __post_init__(self) -> None:
        if self.type not in CREATOR_TYPES:
            raise ValueError(f"creator type must be one of {CREATOR_TYPES}")
        if not 1 <= len(self.id) <= 200:
            raise ValueError("creator id must be 1-200 characters")


CLI = Creator("cli", "cli")


@dataclass(frozen=True, slots=True)
class Project:
    id: uuid.UUID
    org_id: uuid.UUID
    slug: str
    name: str
    is_default: bool


@dataclass(frozen=True, slots=True)
class Sandbox:
    id: str
    org_id: uuid.UUID
    org_slug: str
    project_id: uuid.UUID
    status: str
    upstream_host: str
    upstream_port: int
    login_user: str
    host_keys: tuple[str, ...]
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class SshKey:
    id: uuid.UUID
    org_id: uuid.UUID
    project_id: uuid.UUID
    project_slug: str
    name: str
    algorithm: str
    bits: int
    fingerprint: str
    public_key: str
    comment: str | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    expires_at: dt.datetime | None
    created_by: str | None = None
    """The member's user id, the API key's id or ``cli``; None for keys older than that."""
    created_by_type: str | None = None
    """``member``, ``api_key`` or ``cli`` (None with ``created_by``)."""


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    """A key that may open the sandboxes of its org right now (not revoked, not expired).

    ``expires_at`` (None: never) is when that stops: a live session of the key must end then.
    """

    id: uuid.UUID
    fingerprint: str
    public_key: str
    expires_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class TrustedCA:
    """A certificate authority that may sign certificates opening the sandboxes of its org now
    (registered, not revoked), with what the login decision needs: its extra principals and
    the key ids and serials it revoked."""

    id: uuid.UUID
    fingerprint: str
    public_key: str
    principals: tuple[str, ...] = ()
    revoked_key_ids: frozenset[str] = frozenset()
    revoked_serials: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class SandboxAccess:
    """Everything the SSH gateway needs to decide a login, fetched in one query."""

    sandbox: Sandbox
    keys: tuple[AuthorizedKey, ...]
    cas: tuple[TrustedCA, ...] = ()

    def key_for(self, fingerprint: str, public_key: str) -> AuthorizedKey | None:
        for key in self.keys:
            if key.fingerprint == fingerprint and key.public_key == public_key:
                return key
        return None

    def ca_for(self, fingerprint: str, public_key: str) -> TrustedCA | None:
        for ca in self.cas:
            if ca.fingerprint == fingerprint and ca.public_key == public_key:
                return ca
        return None


@dataclass(frozen=True, slots=True)
class CertAuthority:
    """A registered SSH user certificate authority of an organization (API and CLI view)."""

    id: uuid.UUID
    org_id: uuid.UUID
    name: str
    algorithm: str
    bits: int
    fingerprint: str
    public_key: str
    comment: str | None
    principals: tuple[str, ...]
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    created_by: str | None = None
    created_by_type: str | None = None


@dataclass(frozen=True, slots=True)
class CertRevocation:
    """One certificate a CA revoked, named by its key id or by its serial (exactly one)."""

    id: uuid.UUID
    org_id: uuid.UUID
    ca_id: uuid.UUID
    cert_key_id: str | None
    serial: int | None
    reason: str | None
    created_at: dt.datetime
    created_by: str | None = None
    created_by_type: str | None = None
