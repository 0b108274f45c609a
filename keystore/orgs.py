"""Organizations and their projects."""

from __future__ import annotations

import re
import uuid

import asyncpg

from keystore.db import Executor, acquire, unavailable_on_failure
from keystore.errors import Conflict, InvalidInput, NotFound
from keystore.models import Org, Project

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_PROJECT = "default"


def check_slug(slug: str, what: str = "organization slug") -> str:
    if not SLUG.fullmatch(slug):
        raise InvalidInput(
            f"invalid {what} {slug[:80]!r}: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit",
            code="invalid_slug",
        )
    return slug


def _org(row: asyncpg.Record) -> Org:
    return Org(id=row["id"], slug=row["slug"], name=row["name"], created_at=row["created_at"])


def _project(row: asyncpg.Record) -> Project:
    return Project(
        id=row["id"],
        org_id=row["org_id"],
        slug=row["slug"],
        name=row["name"],
        is_default=row["is_default"],
    )


async def create_org(db: Executor, slug: str, name: str | None = None) -> Org:
    """Create an organization and its default project in one transaction."""
    check_slug(slug)
    name = (name or slug).strip()
    if not 1 <= len(name) <= 200:
        raise InvalidInput("organization name must be 1-200 characters", code="invalid_name")
    with unavailable_on_failure("creating an organization"):
        async with acquire(db) as conn:
            async with conn.transaction():
                try:
                    row = await conn.fetchrow(
                        "INSERT INTO organizations (slug, name) VALUES ($1, $2) "
                        "RETURNING id, slug, name, created_at",
                        slug,
                        name,
                    )
                except asyncpg.UniqueViolationError as exc:
                    raise Conflict(f"organization {slug!r} already exists") from exc
                await conn.execute(
                    "INSERT INTO projects (org_id, slug, name, is_default) "
                    "VALUES ($1, $2, 'Default project', true)",
                    row["id"],
                    DEFAULT_PROJECT,
                )
    return _org(row)


async def get_org(db: Executor, slug: str) -> Org:
    check_slug(slug)
    with unavailable_on_failure("reading an organization"):
        row = await db.fetchrow(
            "SELECT id, slug, name, created_at FROM organizations WHERE slug = $1", slug
        )
    if row is None:
        raise NotFound(f"no organization {slug!r}; create it with `runtools-gateway org create`")
    return _org(row)


async def get_org_by_id(db: Executor, org_id: uuid.UUID) -> Org:
    with unavailable_on_failure("reading an organization"):
        row = await db.fetchrow(
            "SELECT id, slug, name, created_at FROM organizations WHERE id = $1", org_id
        )
    if row is None:
        raise NotFound("organization not found")
    return _org(row)


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
