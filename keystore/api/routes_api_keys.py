"""``/v1/api-keys``: create (secret shown once), list, revoke and rotate an org's API keys.

A key may only hand out what it holds: creating a key with a scope the caller's key does not
cover, or rotating (and so obtaining a new secret for) such a key, is refused with 403.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from keystore import api_keys, tokens
from keystore.api.auth import covers
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
from keystore.api_keys import ApiKey, CreatedApiKey


def api_key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": str(key.id),
        "name": key.name,
        "environment": key.environment,
        "prefix": key.prefix,
        "scopes": list(key.scopes),
        "created_at": iso(key.created_at),
        "expires_at": iso(key.expires_at),
        "last_used_at": iso(key.last_used_at),
        "created_by": str(key.created_by) if key.created_by else None,
    }


def _with_secret(created: CreatedApiKey) -> dict[str, Any]:
    return {**api_key_json(created.key), "secret": created.secret}


def _check_covered(caller: ApiKey, scopes: tuple[str, ...], doing: str) -> None:
    missing = [s for s in scopes if not covers(caller.scopes, s)]
    if missing:
        raise ApiError(
            403,
            "insufficient_scope",
            f"This API key cannot {doing} a key with the scope {missing[0]!r}: a key may only "
            f"grant scopes it holds itself (it has: {', '.join(caller.scopes)}).",
        )


async def create_api_key(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    given = fields(
        body,
        required={"name": str, "scopes": list},
        optional={"expires_in": str, "environment": str},
    )
    caller = principal(request)
    name = api_keys.check_name(given["name"])
    scopes = tokens.validate_scopes(given["scopes"])
    environment = given.get("environment", "live")
    if environment not in tokens.ENVIRONMENTS:
        raise ApiError(400, "invalid_environment", "environment must be 'live' or 'test'.")
    expires_in = tokens.parse_duration(given["expires_in"]) if "expires_in" in given else None
    _check_covered(caller, scopes, "create")
    created = await api_keys.create_key(
        db(request),
        org_id=caller.org_id,
        name=name,
        scopes=scopes,
        environment=environment,
        expires_in=expires_in,
        created_by=caller.id,
    )
    audit(
        request,
        "api.api_key.create",
        target=str(created.key.id),
        details={"name": created.key.name, "scopes": list(scopes), "environment": environment},
    )
    return json_response(_with_secret(created), status=201)


async def list_api_keys(request: web.Request) -> web.StreamResponse:
    limit, after = page_params(request)
    rows = await api_keys.list_keys(
        db(request), principal(request).org_id, after=after, limit=limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return json_response(
        {
            "data": [api_key_json(k) for k in page],
            "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
        }
    )


async def delete_api_key(request: web.Request) -> web.StreamResponse:
    key_id = path_uuid(request, "API key")
    key = await api_keys.revoke_key(db(request), principal(request).org_id, key_id)
    audit(request, "api.api_key.revoke", target=str(key.id), details={"name": key.name})
    return web.Response(status=204)


async def rotate_api_key(request: web.Request) -> web.StreamResponse:
    key_id = path_uuid(request, "API key")
    body = await read_json(request, required=False)
    given = fields(body, optional={"grace_period": str, "expires_in": str})
    grace = tokens.parse_duration(given["grace_period"]) if "grace_period" in given else None
    expires_in = tokens.parse_duration(given["expires_in"]) if "expires_in" in given else None
    caller = principal(request)
    target = await api_keys.get_key(db(request), caller.org_id, key_id)
    _check_covered(caller, target.scopes, "rotate")
    created, old = await api_keys.rotate_key(
        db(request),
        caller.org_id,
        key_id,
        grace=grace,
        expires_in=expires_in,
        created_by=caller.id,
    )
    audit(
        request,
        "api.api_key.rotate",
        target=str(old.id),
        details={
            "new_key_id": str(created.key.id),
            "grace_period": given.get("grace_period"),
            "old_expires_at": iso(old.expires_at),
        },
    )
    return json_response(
        {
            **_with_secret(created),
            "previous": {
                "id": str(old.id),
                "revoked_at": iso(old.revoked_at),
                "expires_at": iso(old.expires_at),
            },
        },
        status=201,
    )


ROUTES = (
    ApiRoute("POST", "/v1/api-keys", create_api_key, "api-key:write"),
    ApiRoute("GET", "/v1/api-keys", list_api_keys, "api-key:read"),
    ApiRoute("DELETE", "/v1/api-keys/{id}", delete_api_key, "api-key:write"),
    ApiRoute("POST", "/v1/api-keys/{id}/rotate", rotate_api_key, "api-key:write"),
)
