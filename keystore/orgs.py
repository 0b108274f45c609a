"""Organizations and their projects."""

from __future__ import annotations

import re
import uuid

import asyncpg

from keystore.db import Executor, acquire, unavailable_on_failure
from keystore.errors import Conflict, InvalidInput, NotFound
from keystore.models import Org, Project

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
WORKOS_ORG_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")
DEFAULT_PROJECT = "default"
_ORG_COLUMNS = "id, slug, name, created_at, workos_org_id, disabled_at"


def check_slug(slug: str, what: str = "organization slug") -> str:
    if not SLUG.fullmatch(slug):
        raise InvalidInput(
            f"invalid {what} {slug[:80]!r}: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit",
            code="invalid_slug",
        )
    return slug


def check_workos_org_id(value: str) -> str:
    if not WORKOS_ORG_ID.fullmatch(value):
        raise InvalidInput(
            f"invalid WorkOS organization id {value[:80]!r}: expected its id as WorkOS shows "
            "it, e.g. org_01HXYZ... (letters, digits, '_' and '-')",
            code="invalid_workos_org_id",
        )
    return value


def org_from_row(row: asyncpg.Record) -> Org:
    """An Org from a row with the columns of ``_ORG_COLUMNS``."""
    return Org(
        id=row["id"],
        slug=row["slug"],
        name=row["name"],
        created_at=row["created_at"],
        workos_org_id=row["workos_org_id"],
        disabled_at=row["disabled_at"],
    )


def _project(row: asyncpg.Record) -> Project:
    return Project(
        id=row["id"],
        org_id=row["org_id"],
        slug=row["slug"],
        name=row["name"],
        is_default=row["is_default"],
    )


async def create_org(
    db: Executor, slug: str, name: str | None = None, *, workos_org_id: str | None = None
) -> Org:
    """Create an organization and its default project in one transaction.

    ``workos_org_id``: the WorkOS organization whose members' session tokens act for it.
    """
    check_slug(slug)
    if workos_org_id is not None:
        check_workos_org_id(workos_org_id)
    name = (name or slug).strip()
    if not 1 <= len(name) <= 200:
        raise InvalidInput("organization name must be 1-200 characters", code="invalid_name")
    with unavailable_on_failure("creating an organization"):
        async with acquire(db) as conn:
            async with conn.transaction():
                try:
                    row = await conn.fetchrow(
                        "INSERT INTO organizations (slug, name, workos_org_id) "  # noqa: S608
                        f"VALUES ($1, $2, $3) RETURNING {_ORG_COLUMNS}",
                        slug,
                        name,
                        workos_org_id,
                    )
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name and "workos" in exc.constraint_name:
                        raise Conflict(
                            f"another organization is already mapped to {workos_org_id!r}"
                        ) from exc
                    raise Conflict(f"organization {slug!r} already exists") from exc
                await conn.execute(
                    "INSERT INTO projects (org_id, slug, name, is_default) "
                    "VALUES ($1, $2, 'Default project', true)",
                    row["id"],
                    DEFAULT_PROJECT,
                )
    return org_from_row(row)


async def get_org(db: Executor, slug: str) -> Org:
    check_slug(slug)
    with unavailable_on_failure("reading an organization"):
        row = await db.fetchrow(
            f"SELECT {_ORG_COLUMNS} FROM organizations WHERE slug = $1",  # noqa: S608
            slug,
        )
    if row is None:
        raise NotFound(f"no organization {slug!r}; create it with `runtools-gateway org create`")
    return org_from_row(row)


async def get_org_by_id(db: Executor, org_id: uuid.UUID) -> Org:
    with unavailable_on_failure("reading an organization"):
        row = await db.fetchrow(
            f"SELECT {_ORG_COLUMNS} FROM organizations WHERE id = $1",  # noqa: S608
            org_id,
        )
    if row is None:
        raise NotFound("organization not found")
    return org_from_row(row)


async def set_workos_org_id(db: Executor, slug: str, workos_org_id: str | None) -> Org:
    """Map the organization ``slug`` to a WorkOS organization (None: unmap it)."""
    check_slug(slug)
    if workos_org_id is not None:
        check_workos_org_id(workos_org_id)
    with unavailable_on_failure("updating an organization"):
        try:
            row = await db.fetchrow(
                f"UPDATE organizations SET workos_org_id = $2 WHERE slug = $1 "  # noqa: S608
                f"RETURNING {_ORG_COLUMNS}",
                slug,
                workos_org_id,
            )
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"another organization is already mapped to {workos_org_id!r}") from exc
    if row is None:
        raise NotFound(f"no organization {slug!r}; create it with `runtools-gateway org create`")
    return org_from_row(row)


async def find_by_workos_org_id(db: Executor, workos_org_id: str) -> Org | None:
    """The organization mapped to a WorkOS organization, disabled or not; None if none is."""
    if not WORKOS_ORG_ID.fullmatch(workos_org_id):
        return None
    with unavailable_on_failure("reading an organization"):
        row = await db.fetchrow(
            f"SELECT {_ORG_COLUMNS} FROM organizations WHERE workos_org_id = $1",  # noqa: S608
            workos_org_id,
        )
    return org_from_row(row) if row is not None else None


async def disable_org(db: Executor, org_id: uuid.UUID) -> bool:
    """Disable an organization: its keys are refused from now on and its live sessions end
    (the database notifies every gateway). False if it was disabled already."""
    with unavailable_on_failure("disabling an organization"):
        result = await db.execute(
            "UPDATE organizations SET disabled_at = now() WHERE id = $1 AND disabled_at IS NULL",
            org_id,
        )
    return bool(result != "UPDATE 0")


async def get_project(db: Executor, org_id: uuid.UUID, slug: str | None) -> Project:
    """The org's project named ``slug``, or its default project when ``slug`` is None."""
    with unavailable_on_failure("reading a project"):
        if slug is None:
            row = await db.fetchrow(
                "SELECT id, org_id, slug, name, is_default FROM projects "
                "WHERE org_id = $1 AND is_default",
                org_id,
            )
        else:
            check_slug(slug, "project")
            row = await db.fetchrow(
                "SELECT id, org_id, slug, name, is_default FROM projects "
                "WHERE org_id = $1 AND slug = $2",
                org_id,
                slug,
            )
    if row is None:
        raise NotFound(f"no project {slug!r} in this organization")
    return _project(row)


async def create_project(db: Executor, org_id: uuid.UUID, slug: str, name: str) -> Project:
    check_slug(slug, "project")
    with unavailable_on_failure("creating a project"):
        try:
            row = await db.fetchrow(
                "INSERT INTO projects (org_id, slug, name) VALUES ($1, $2, $3) "
                "RETURNING id, org_id, slug, name, is_default",
                org_id,
                slug,
                name,
            )
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"project {slug!r} already exists") from exc
    return _project(row)
