"""``/v1/api-keys``: create (secret shown once), list, revoke and rotate an org's API keys.

No caller gains through a key what it does not hold itself (403 with a code):

* a key may only create keys whose scopes its own cover, and only revoke or rotate such keys
  (``insufficient_scope``): an ``api-key:*`` key can neither mint nor revoke the org's ``*`` key;
* a key created or rotated by an API key that expires cannot outlive it: without
  ``expires_in`` it expires with its creator, and an ``expires_in`` that would end later is
  refused (``expires_after_caller``);
* an ``rt_test_`` key creates and rotates only ``rt_test_`` keys (``test_key_cannot_make_live``).

Members (WorkOS sessions) are held to the same scope rule with their role's permissions; their
session's expiry does not bound the keys they create.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from keystore import api_keys, members, tokens
from keystore.api.auth import covers
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
from keystore.api_keys import ApiKey, CreatedApiKey

# The database's clock and ours may differ slightly: a requested lifetime may end this much
# after the caller's expiry before it is refused (the stored expiry is capped exactly anyway).
_CLOCK_SLACK = dt.timedelta(seconds=5)


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
        "created_by": creator.id if (creator := key.creator) else None,
        "created_by_type": creator.type if creator else None,
    }


def _with_secret(created: CreatedApiKey) -> dict[str, Any]:
    return {**api_key_json(created.key), "secret": created.secret}


def _check_covered(caller: Principal, scopes: tuple[str, ...], doing: str) -> None:
    """403 unless the caller's scopes cover every one of ``scopes``."""
    missing = [s for s in scopes if not covers(caller.scopes, s)]
    if not missing:
        return
    if caller.is_member:
        raise ApiError(
            403,
            "insufficient_permission",
            f"Your role cannot {doing} a key with the scope {missing[0]!r}: only keys within "
            "your own permissions.",
        )
    held = ", ".join(caller.scopes)
    raise ApiError(
        403,
        "insufficient_scope",
        f"This API key cannot {doing} a key with the scope {missing[0]!r}: a key may only "
        f"{doing} keys whose scopes it holds itself (it has: {held}).",
    )


def _check_environment(caller: Principal, environment: str, doing: str) -> None:
    if caller.environment == "test" and environment != "test":
        raise ApiError(
            403,
            "test_key_cannot_make_live",
            f"An rt_test_ key cannot {doing} an rt_live_ key; use an rt_live_ key.",
        )


def _check_lifetime(caller: Principal, expires_in: dt.timedelta | None) -> None:
    """403 when an explicit ``expires_in`` would outlive the calling key."""
    ends = caller.expires_at
    if expires_in is None or ends is None:
        return
    if dt.datetime.now(dt.UTC) + expires_in > ends + _CLOCK_SLACK:
        raise ApiError(
            403,
            "expires_after_caller",
            f"The new key would outlive the API key creating it (which expires at "
            f"{ends.isoformat(timespec='seconds')}); ask for a shorter expires_in, or leave it "
            "out to expire together.",
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
    _check_environment(caller, environment, "create")
    _check_lifetime(caller, expires_in)
    async with members.acting(db(request), caller.org_id, caller.creator, caller.issued_at) as conn:
        created = await api_keys.create_key(
            conn,
            org_id=caller.org_id,
            name=name,
            scopes=scopes,
            environment=environment,
            expires_in=expires_in,
            created_by=caller.creator,
            not_after=caller.expires_at,
        )
    audit(
        request,
        "api.api_key.create",
        target=str(created.key.id),
        details={
            "name": created.key.name,
            "scopes": list(scopes),
            "environment": environment,
            "expires_at": iso(created.key.expires_at),
        },
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
    caller = principal(request)
    target = await api_keys.get_key(db(request), caller.org_id, key_id)
    _check_covered(caller, target.scopes, "revoke")
    key = await api_keys.revoke_key(db(request), caller.org_id, key_id)
    audit(
        request,
        "api.api_key.revoke",
        target=str(key.id),
        details={"name": key.name, "scopes": list(key.scopes)},
    )
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
    _check_environment(caller, target.environment, "rotate")
    _check_lifetime(caller, expires_in)
    async with members.acting(db(request), caller.org_id, caller.creator, caller.issued_at) as conn:
        created, old = await api_keys.rotate_key(
            conn,
            caller.org_id,
            key_id,
            grace=grace,
            expires_in=expires_in,
            created_by=caller.creator,
            not_after=caller.expires_at,
        )
    audit(
        request,
        "api.api_key.rotate",
        target=str(old.id),
        details={
            "new_key_id": str(created.key.id),
            "grace_period": given.get("grace_period"),
            "old_expires_at": iso(old.expires_at),
            "new_expires_at": iso(created.key.expires_at),
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
