"""``/v1/ssh-cert-authorities``: register, list, read, update and revoke an org's SSH user
certificate authorities, and revoke (or un-revoke) the certificates they signed.

Every query is confined to the caller's organization: another org's CA or revocation id
answers 404 exactly like an id that never existed. Reading needs ``ssh-key:read``; every write
needs ``ssh-key:write`` over the whole organization. A CA is an organization-wide credential
(its holder signs certificates for every sandbox), so a member whose role allows only
``ssh-key:write:own`` (developer, member) gets 403 ``insufficient_permission`` on every write.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from keystore import cert_authorities, members
from keystore.api.auth import challenge
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
from keystore.errors import Conflict, InvalidInput
from keystore.models import CertAuthority, CertRevocation

BASE = "/v1/ssh-cert-authorities"
WRITE = "ssh-key:write"


def ca_json(ca: CertAuthority) -> dict[str, Any]:
    return {
        "id": str(ca.id),
        "name": ca.name,
        "type": ca.algorithm,
        "bits": ca.bits,
        "fingerprint": ca.fingerprint,
        "public_key": ca.public_key,
        "comment": ca.comment,
        "principals": list(ca.principals),
        "created_at": iso(ca.created_at),
        "created_by": ca.created_by,
        "created_by_type": ca.created_by_type,
    }


def revocation_json(revocation: CertRevocation) -> dict[str, Any]:
    return {
        "id": str(revocation.id),
        "ca_id": str(revocation.ca_id),
        "key_id": revocation.cert_key_id,
        "serial": revocation.serial,
        "reason": revocation.reason,
        "created_at": iso(revocation.created_at),
        "created_by": revocation.created_by,
        "created_by_type": revocation.created_by_type,
    }


def _may_write(caller: Principal) -> None:
    """403 for a member who may change only their own SSH keys: a CA is nobody's own."""
    if caller.allows(WRITE):
        return
    held = ", ".join(caller.roles) or "none"
    raise ApiError(
        403,
        "insufficient_permission",
        "A certificate authority is an organization-wide credential: registering or changing "
        "one, or revoking its certificates, needs ssh-key:write over the whole organization "
        f"(the owner or admin role; your roles: {held}). Ask an owner or admin.",
        headers={"WWW-Authenticate": challenge("insufficient_scope", scope=WRITE)},
    )


def _revocation_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["rid"])
    except ValueError:
        raise ApiError(
            404, "not_found", "no such certificate revocation for this certificate authority"
        ) from None


async def create_ca(request: web.Request) -> web.StreamResponse:
    caller = principal(request)
    _may_write(caller)
    body = await read_json(request)
    given = fields(body, required={"name": str, "public_key": str}, optional={"principals": list})
    try:
        # A member's write is serialised with their removal (keystore/members.py).
        async with members.acting(
            db(request), caller.org_id, caller.creator, caller.issued_at
        ) as conn:
            ca = await cert_authorities.add_ca(
                conn,
                caller.org_id,
                public_key_line=given["public_key"],
                name=given["name"],
                principals=given.get("principals", ()),
                creator=caller.creator,
            )
    except InvalidInput as exc:
        # The message never contains the pasted key; the audit keeps only the reason code.
        audit(request, "api.ssh_ca.create", target=None, result="refused", reason=exc.code)
        raise ApiError(400, exc.code, str(exc)) from None
    except Conflict as exc:
        audit(
            request,
            "api.ssh_ca.create",
            target=exc.existing_id,
            result="refused",
            reason="ca_already_registered",
        )
        extra = {"existing_id": exc.existing_id} if exc.existing_id else {}
        raise ApiError(409, "ca_already_registered", str(exc), extra=extra) from None
    audit(
        request,
        "api.ssh_ca.create",
        target=str(ca.id),
        details={
            "fingerprint": ca.fingerprint,
            "name": ca.name,
            "principals": list(ca.principals),
            "created_by": ca.created_by,
            "created_by_type": ca.created_by_type,
        },
    )
    return json_response(ca_json(ca), status=201, headers={"Location": f"{BASE}/{ca.id}"})


async def list_cas(request: web.Request) -> web.StreamResponse:
    limit, after = page_params(request)
    rows = await cert_authorities.list_cas(
        db(request), principal(request).org_id, after=after, limit=limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return json_response(
        {
            "data": [ca_json(ca) for ca in page],
            "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
        }
    )


async def get_ca(request: web.Request) -> web.StreamResponse:
    ca_id = path_uuid(request, "certificate authority")
    ca = await cert_authorities.get_ca(db(request), principal(request).org_id, ca_id)
    return json_response(ca_json(ca))


async def update_ca(request: web.Request) -> web.StreamResponse:
    ca_id = path_uuid(request, "certificate authority")
    caller = principal(request)
    _may_write(caller)
    body = await read_json(request)
    given = fields(body, optional={"name": str, "principals": list})
    if not given:
        raise ApiError(
            400, "nothing_to_update", "Give at least one of the fields 'name' and 'principals'."
        )
    ca = await cert_authorities.update_ca(
        db(request),
        caller.org_id,
        ca_id,
        name=given.get("name"),
        principals=given.get("principals"),
    )
    audit(
        request,
        "api.ssh_ca.update",
        target=str(ca.id),
        details={"changed": sorted(given), "name": ca.name, "principals": list(ca.principals)},
    )
    return json_response(ca_json(ca))


async def delete_ca(request: web.Request) -> web.StreamResponse:
    ca_id = path_uuid(request, "certificate authority")
    caller = principal(request)
    _may_write(caller)
    ca = await cert_authorities.revoke_ca(db(request), caller.org_id, ca_id)
    audit(
        request,
        "api.ssh_ca.revoke",
        target=str(ca.id),
        details={
            "fingerprint": ca.fingerprint,
            "name": ca.name,
            "created_by": ca.created_by,
            "created_by_type": ca.created_by_type,
        },
    )
    return web.Response(status=204)


async def create_revocation(request: web.Request) -> web.StreamResponse:
    ca_id = path_uuid(request, "certificate authority")
    caller = principal(request)
    _may_write(caller)
    body = await read_json(request)
    given = fields(body, optional={"key_id": str, "serial": int, "reason": str})
    try:
        async with members.acting(
            db(request), caller.org_id, caller.creator, caller.issued_at
        ) as conn:
            revocation = await cert_authorities.revoke_certificate(
                conn,
                caller.org_id,
                ca_id,
                cert_key_id=given.get("key_id"),
                serial=given.get("serial"),
                reason=given.get("reason"),
                creator=caller.creator,
            )
    except Conflict as exc:
        extra = {"existing_id": exc.existing_id} if exc.existing_id else {}
        raise ApiError(409, "already_revoked", str(exc), extra=extra) from None
    audit(
        request,
        "api.ssh_ca.revoke_certificate",
        target=str(ca_id),
        details={
            "revocation_id": str(revocation.id),
            "key_id": revocation.cert_key_id,
            "serial": None if revocation.serial is None else str(revocation.serial),
            "reason": revocation.reason,
        },
    )
    return json_response(
        revocation_json(revocation),
        status=201,
        headers={"Location": f"{BASE}/{ca_id}/revocations/{revocation.id}"},
    )


async def list_revocations(request: web.Request) -> web.StreamResponse:
    ca_id = path_uuid(request, "certificate authority")
    limit, after = page_params(request)
    rows = await cert_authorities.list_revocations(
        db(request), principal(request).org_id, ca_id, after=after, limit=limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return json_response(
        {
            "data": [revocation_json(r) for r in page],
            "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
        }
    )


async def delete_revocation(request: web.Request) -> web.StreamResponse:
    ca_id = path_uuid(request, "certificate authority")
    revocation_id = _revocation_id(request)
    caller = principal(request)
    _may_write(caller)
    revocation = await cert_authorities.delete_revocation(
        db(request), caller.org_id, ca_id, revocation_id
    )
    audit(
        request,
        "api.ssh_ca.unrevoke_certificate",
        target=str(ca_id),
        details={
            "revocation_id": str(revocation.id),
            "key_id": revocation.cert_key_id,
            "serial": None if revocation.serial is None else str(revocation.serial),
        },
    )
    return web.Response(status=204)


ROUTES = (
    ApiRoute("POST", BASE, create_ca, WRITE),
    ApiRoute("GET", BASE, list_cas, "ssh-key:read"),
    ApiRoute("GET", BASE + "/{id}", get_ca, "ssh-key:read"),
    ApiRoute("PATCH", BASE + "/{id}", update_ca, WRITE),
    ApiRoute("DELETE", BASE + "/{id}", delete_ca, WRITE),
    ApiRoute("POST", BASE + "/{id}/revocations", create_revocation, WRITE),
    ApiRoute("GET", BASE + "/{id}/revocations", list_revocations, "ssh-key:read"),
    ApiRoute("DELETE", BASE + "/{id}/revocations/{rid}", delete_revocation, WRITE),
)
