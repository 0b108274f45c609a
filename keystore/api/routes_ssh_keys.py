"""``/v1/ssh-keys``: register, list, read, rename or move, and revoke an org's SSH keys.

Every query is confined to the caller's organization; an id of another org's key answers 404
exactly like an id that never existed. Each key records who registered it (``created_by``). A
member whose role allows ``ssh-key:write:own`` only (developer, member) may rename, move or
revoke only the keys they registered: another's key answers 403 ``not_key_owner``.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from keystore import keys as keyparse
from keystore import members, orgs, ssh_keys
from keystore.api.common import (
    ApiRoute,
    Principal,
    audit,
    db,
    encode_cursor,
    fields,
    iso,
    page_params,
    path_uuid,
    principal,
    read_json,
)
from keystore.api.errors import ApiError, json_response
from keystore.errors import Conflict, InvalidPublicKey, NotFound
from keystore.models import Project, SshKey


def ssh_key_json(key: SshKey) -> dict[str, Any]:
    return {
        "id": str(key.id),
        "name": key.name,
        "type": key.algorithm,
        "bits": key.bits,
        "fingerprint": key.fingerprint,
        "public_key": key.public_key,
        "comment": key.comment,
        "project": key.project_slug,
        "created_at": iso(key.created_at),
        "last_used_at": iso(key.last_used_at),
        "created_by": key.created_by,
        "created_by_type": key.created_by_type,
    }


async def _own_key(request: web.Request, caller: Principal, key_id: uuid.UUID) -> str | None:
    """For a member who may change only their own keys: their user id, after checking the key
    is theirs (404 if there is no such key, 403 if it is someone else's). Else None."""
    if not caller.own_only("ssh-key:write"):
        return None
    key = await ssh_keys.get_key(db(request), caller.org_id, key_id)
    if not caller.owns(key.created_by, key.created_by_type):
        raise ApiError(
            403,
            "not_key_owner",
            "Your role allows changing only the SSH keys you registered yourself; ask an owner "
            "or admin to change this one.",
        )
    return caller.actor


async def _project(request: web.Request, org_id: uuid.UUID, slug: str | None) -> Project:
    """The org's project ``slug`` (default project for None); 422 if the org has none such."""
    try:
        return await orgs.get_project(db(request), org_id, slug)
    except NotFound:
        raise ApiError(
            422,
            "unknown_project",
            f"There is no project {slug!r} in this organization.",
        ) from None


async def create_ssh_key(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    given = fields(body, required={"name": str, "public_key": str}, optional={"project": str})
    caller = principal(request)
    try:
        parsed = keyparse.parse_public_key(given["public_key"])
    except InvalidPublicKey as exc:
        # The message never contains the pasted text; the audit keeps only the reason code.
        audit(request, "api.ssh_key.create", target=None, result="refused", reason=exc.code)
        raise ApiError(400, exc.code, str(exc)) from None
    name = ssh_keys.check_name(given["name"])
    project = await _project(request, caller.org_id, given.get("project"))
    try:
        # A member's registration is serialised with their removal (keystore/members.py).
        async with members.acting(
            db(request), caller.org_id, caller.creator, caller.issued_at
        ) as conn:
            key = await ssh_keys.add_key(
                conn,
                org_id=caller.org_id,
                project_id=project.id,
                key=parsed,
                name=name,
                created_by=caller.creator,
            )
    except Conflict as exc:
        audit(
            request,
            "api.ssh_key.create",
            target=exc.existing_id,
            result="refused",
            reason="key_already_registered",
            details={"fingerprint": parsed.fingerprint},
        )
        extra = {"existing_id": exc.existing_id} if exc.existing_id else {}
        raise ApiError(409, "key_already_registered", str(exc), extra=extra) from None
    audit(
        request,
        "api.ssh_key.create",
        target=str(key.id),
        details={
            "fingerprint": key.fingerprint,
            "name": key.name,
            "project": key.project_slug,
            "created_by": key.created_by,
            "created_by_type": key.created_by_type,
        },
    )
    return json_response(
        ssh_key_json(key), status=201, headers={"Location": f"/v1/ssh-keys/{key.id}"}
    )


async def list_ssh_keys(request: web.Request) -> web.StreamResponse:
    limit, after = page_params(request, extra=frozenset({"project"}))
    caller = principal(request)
    project_id = None
    if "project" in request.query:
        project_id = (await _project(request, caller.org_id, request.query["project"])).id
    rows = await ssh_keys.list_keys(
        db(request), caller.org_id, project_id=project_id, after=after, limit=limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return json_response(
        {
            "data": [ssh_key_json(k) for k in page],
            "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
        }
    )


async def get_ssh_key(request: web.Request) -> web.StreamResponse:
    key_id = path_uuid(request, "SSH key")
    key = await ssh_keys.get_key(db(request), principal(request).org_id, key_id)
    return json_response(ssh_key_json(key))


async def update_ssh_key(request: web.Request) -> web.StreamResponse:
    key_id = path_uuid(request, "SSH key")
    body = await read_json(request)
    given = fields(body, optional={"name": str, "project": str})
    if not given:
        raise ApiError(
            400, "nothing_to_update", "Give at least one of the fields 'name' and 'project'."
        )
    caller = principal(request)
    name = ssh_keys.check_name(given["name"]) if "name" in given else None
    # Existence first: a stranger's key id must answer 404 whatever the project says.
    await ssh_keys.get_key(db(request), caller.org_id, key_id)
    member = await _own_key(request, caller, key_id)
    project_id = None
    if "project" in given:
        project_id = (await _project(request, caller.org_id, given["project"])).id
    key = await ssh_keys.update_key(
        db(request), caller.org_id, key_id, name=name, project_id=project_id, member=member
    )
    audit(
        request,
        "api.ssh_key.update",
        target=str(key.id),
        details={"changed": sorted(given), "name": key.name, "project": key.project_slug},
    )
    return json_response(ssh_key_json(key))


async def delete_ssh_key(request: web.Request) -> web.StreamResponse:
    key_id = path_uuid(request, "SSH key")
    caller = principal(request)
    member = await _own_key(request, caller, key_id)
    key = await ssh_keys.revoke_key(db(request), caller.org_id, str(key_id), member=member)
    audit(
        request,
        "api.ssh_key.revoke",
        target=str(key.id),
        details={
            "fingerprint": key.fingerprint,
            "name": key.name,
            "created_by": key.created_by,
            "created_by_type": key.created_by_type,
        },
    )
    return web.Response(status=204)


ROUTES = (
    ApiRoute("POST", "/v1/ssh-keys", create_ssh_key, "ssh-key:write"),
    ApiRoute("GET", "/v1/ssh-keys", list_ssh_keys, "ssh-key:read"),
    ApiRoute("GET", "/v1/ssh-keys/{id}", get_ssh_key, "ssh-key:read"),
    ApiRoute("PATCH", "/v1/ssh-keys/{id}", update_ssh_key, "ssh-key:write"),
    ApiRoute("DELETE", "/v1/ssh-keys/{id}", delete_ssh_key, "ssh-key:write"),
)
