"""``/v1/ssh-keys``: register, list, read, rename or move, and revoke an org's SSH keys.

Every query is confined to the calling API key's organization; an id of another org's key
answers 404 exactly like an id that never existed.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from keystore import keys as keyparse
from keystore import orgs, ssh_keys
from keystore.api.common import (
    ApiRoute,
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
    }


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
        key = await ssh_keys.add_key(
            db(request), org_id=caller.org_id, project_id=project.id, key=parsed, name=name
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
        details={"fingerprint": key.fingerprint, "name": key.name, "project": key.project_slug},
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
    project_id = None
    if "project" in given:
        project_id = (await _project(request, caller.org_id, given["project"])).id
    key = await ssh_keys.update_key(
        db(request), caller.org_id, key_id, name=name, project_id=project_id
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
    key = await ssh_keys.revoke_key(db(request), principal(request).org_id, str(key_id))
    audit(
        request,
        "api.ssh_key.revoke",
        target=str(key.id),
        details={"fingerprint": key.fingerprint, "name": key.name},
    )
    return web.Response(status=204)


ROUTES = (
    ApiRoute("POST", "/v1/ssh-keys", create_ssh_key, "ssh-key:write"),
    ApiRoute("GET", "/v1/ssh-keys", list_ssh_keys, "ssh-key:read"),
    ApiRoute("GET", "/v1/ssh-keys/{id}", get_ssh_key, "ssh-key:read"),
    ApiRoute("PATCH", "/v1/ssh-keys/{id}", update_ssh_key, "ssh-key:write"),
    ApiRoute("DELETE", "/v1/ssh-keys/{id}", delete_ssh_key, "ssh-key:write"),
)
