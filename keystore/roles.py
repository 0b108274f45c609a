"""What a member signed in through WorkOS may do, in this API's scope names (pure: no I/O).

A member's *permissions* are the union of

* the permissions of each of their roles: the session token's ``role`` claim (one role slug)
  and ``roles`` claim (a list of them), looked up in a role table (``workos.roles``);
* the entries of the token's ``permissions`` claim that are permissions of this API (WorkOS
  permissions of other applications are ignored).

Permissions are the API-key scopes (:data:`keystore.tokens.SCOPES`: ``*``, ``ssh-key:read``,
``api-key:*``, ``audit:read`` ...) plus one only members hold, :data:`SSH_KEY_WRITE_OWN`:
register SSH keys, and rename, move or revoke only the keys the member registered.

The default table follows the product's roles: owner and admin may do everything, API keys
included; developer and member may register SSH keys, list the organization's keys, and rename
or revoke the keys they registered; viewer may only read the organization's SSH keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from keystore import tokens

__all__ = [
    "DEFAULT_ROLES",
    "PERMISSIONS",
    "SSH_KEY_WRITE_OWN",
    "RoleTable",
    "allows",
    "own_only",
    "parse_roles",
    "permissions_for",
]

SSH_KEY_WRITE_OWN = "ssh-key:write:own"
PERMISSIONS: frozenset[str] = tokens.SCOPES | {SSH_KEY_WRITE_OWN}

#: ``role=permission permission ...``, one entry per role (workos.roles).
DEFAULT_ROLES: tuple[str, ...] = (
    "owner=*",
    "admin=*",
    f"developer=ssh-key:read {SSH_KEY_WRITE_OWN}",
    f"member=ssh-key:read {SSH_KEY_WRITE_OWN}",
    "viewer=ssh-key:read",
)

RoleTable = Mapping[str, tuple[str, ...]]

_ROLE = re.compile(r"^[a-z0-9][a-z0-9_:.-]{0,63}$")
MAX_CLAIM_ITEMS = 64


def parse_roles(entries: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The role table of ``role=permission permission ...`` entries; ``ValueError`` naming the
    bad entry. A role given twice is an error; a role with no permission (``guest=``) is
    allowed (it may do nothing)."""
    table: dict[str, tuple[str, ...]] = {}
    for entry in entries:
        role, sep, rest = entry.partition("=")
        role = role.strip().lower()
        if not sep or not _ROLE.fullmatch(role):
            raise ValueError(
                f"{entry[:80]!r} is not 'role=permission ...' (role: lowercase letters, digits, "
                "'-', '_', '.', ':')"
            )
        if role in table:
            raise ValueError(f"role {role!r} is given twice")
        granted = rest.split()
        unknown = [p for p in granted if p not in PERMISSIONS]
        if unknown:
            raise ValueError(
                f"role {role!r}: unknown permission {unknown[0][:40]!r}; use: "
                + ", ".join(sorted(PERMISSIONS))
            )
        table[role] = tuple(sorted(set(granted)))
    return table


def _strings(value: Any) -> list[str]:
    """A claim that is a string or a list of strings, as a list (anything else: empty)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value[:MAX_CLAIM_ITEMS] if isinstance(v, str)]
    return []


def roles_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The role slugs of a token (``role`` and ``roles``), lowercased, deduplicated, sorted."""
    found = _strings(claims.get("role")) + _strings(claims.get("roles"))
    return tuple(sorted({r.strip().lower() for r in found if 0 < len(r) <= 64}))


def permissions_for(claims: Mapping[str, Any], table: RoleTable) -> tuple[str, ...]:
    """A member's permissions: their roles' (unknown roles grant nothing) plus the API's own
    permission names in the ``permissions`` claim; sorted, deduplicated."""
    granted: set[str] = set()
    for role in roles_of(claims):
        granted.update(table.get(role, ()))
    granted.update(p for p in _strings(claims.get("permissions")) if p in PERMISSIONS)
    return tuple(sorted(granted))


def allows(permissions: Iterable[str], scope: str) -> bool:
    """True if ``permissions`` allow the concrete scope ``scope`` on any resource of the org."""
    return tokens.scope_allows(tuple(permissions), scope)


def own_only(permissions: Iterable[str], scope: str) -> bool:
    """True if ``permissions`` allow ``scope`` only on the member's own SSH keys."""
    held = tuple(permissions)
    return (
        scope == "ssh-key:write"
        and SSH_KEY_WRITE_OWN in held
        and not tokens.scope_allows(held, scope)
    )
