"""The auth decision: login name + offered key + the sandbox's access data -> accept or refuse.

``decide()`` is a pure function: everything it needs arrives as arguments, so it is tested
without a database or an SSH connection (tests/unit/test_auth_decision.py). ``look_up()`` is
the one impure step, done once per login name per connection, through an injected
``AccessSource`` (gateway/ssh/access.py).

Keys are org-scoped: the access data of a sandbox holds the active keys of *that sandbox's*
organization only, so a key of another organization can never match. An unknown sandbox and
another organization's sandbox are refused with the same user-facing text (no oracle); only
logs and audit rows tell ``unknown_sandbox`` apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncssh

from gateway import messages
from gateway.ssh.access import AccessSource
from gateway.ssh.login import sandbox_id_from_login
from keystore.errors import Unavailable
from keystore.models import AuthorizedKey, Sandbox, SandboxAccess

UNKNOWN_SANDBOX = "unknown_sandbox"


@dataclass(frozen=True, slots=True)
class LoginLookup:
    """What one login name resolved to. ``refusal`` is set when no key can be accepted."""

    login: str
    sandbox_id: str | None
    access: SandboxAccess | None
    refusal: str | None = None
    error: str | None = None  # technical detail for the log (never shown to the user)


@dataclass(frozen=True, slots=True)
class Accept:
    key: AuthorizedKey
    sandbox: Sandbox


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str  # a messages code, or UNKNOWN_SANDBOX

    @property
    def shows_registration_hint(self) -> bool:
        """Unregistered key and unknown sandbox look the same to the user, on purpose."""
        return self.reason in (messages.KEY_NOT_REGISTERED.code, UNKNOWN_SANDBOX)


Decision = Accept | Refuse


def canonical_line(key: asyncssh.SSHKey) -> str:
    """``TYPE BASE64`` without comment, the form stored in ssh_keys.public_key."""
    parts = key.export_public_key("openssh").decode().split()
    return f"{parts[0]} {parts[1]}"


async def look_up(login: str, source: AccessSource) -> LoginLookup:
    """Resolve a login name: grammar first (no query for a bad name), then one lookup."""
    sandbox_id = sandbox_id_from_login(login)
    if sandbox_id is None:
        return LoginLookup(login, None, None, messages.INVALID_LOGIN_NAME.code)
    try:
        access = await source.access_for(sandbox_id)
    except Unavailable as exc:
        return LoginLookup(
            login, sandbox_id, None, messages.KEYSTORE_UNAVAILABLE.code, error=str(exc)
        )
    if access is None:
        return LoginLookup(login, sandbox_id, None, UNKNOWN_SANDBOX)
    return LoginLookup(login, sandbox_id, access)


def decide(lookup: LoginLookup, fingerprint: str, public_key: str) -> Decision:
    """Accept only a key registered, active, for the organization of the named sandbox."""
    if lookup.refusal is not None or lookup.access is None:
        return Refuse(lookup.refusal or UNKNOWN_SANDBOX)
    match = lookup.access.key_for(fingerprint, public_key)
    if match is None:
        return Refuse(messages.KEY_NOT_REGISTERED.code)
    return Accept(match, lookup.access.sandbox)
