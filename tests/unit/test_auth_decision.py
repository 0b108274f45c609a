"""The auth decision as a pure function: login name + offered key + access data -> a verdict.

No database and no SSH connection: the access data comes from ``StaticAccess``, the fake
shipped beside the real source.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncssh
import pytest

from gateway import messages
from gateway.ssh.access import StaticAccess
from gateway.ssh.auth import (
    UNKNOWN_SANDBOX,
    Accept,
    LoginLookup,
    Refuse,
    canonical_line,
    decide,
    look_up,
)
from keystore.models import AuthorizedKey, Sandbox, SandboxAccess


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def _access(sandbox_id: str, org: uuid.UUID, keys: list[asyncssh.SSHKey]) -> SandboxAccess:
    sandbox = Sandbox(
        id=sandbox_id,
        org_id=org,
        org_slug=f"org-{org.hex[:6]}",
        project_id=uuid.uuid4(),
        status="running",
        upstream_host="127.0.0.1",
        upstream_port=22,
        login_user="dev",
        host_keys=("ssh-ed25519 AAAA",),
        created_at=dt.datetime.now(dt.UTC),
    )
    return SandboxAccess(
        sandbox=sandbox,
        keys=tuple(
            AuthorizedKey(uuid.uuid4(), k.get_fingerprint("sha256"), canonical_line(k))
            for k in keys
        ),
    )


def _offer(lookup: LoginLookup, key: asyncssh.SSHKey) -> Accept | Refuse:
    return decide(lookup, key.get_fingerprint("sha256"), canonical_line(key))


@pytest.fixture
def world() -> tuple[StaticAccess, asyncssh.SSHKey, asyncssh.SSHKey]:
    """Two organizations, one sandbox and one registered key each."""
    acme_key, globex_key = _key(), _key()
    source = StaticAccess(
        {
            "sandbox-acme": _access("sandbox-acme", uuid.uuid4(), [acme_key]),
            "sandbox-globex": _access("sandbox-globex", uuid.uuid4(), [globex_key]),
        }
    )
    return source, acme_key, globex_key


async def test_registered_key_opens_its_orgs_sandbox(world: tuple) -> None:
    source, acme_key, _ = world
    verdict = _offer(await look_up("sandbox-acme", source), acme_key)
    assert isinstance(verdict, Accept)
    assert verdict.sandbox.id == "sandbox-acme"
    assert verdict.key.fingerprint == acme_key.get_fingerprint("sha256")


async def test_key_from_other_org_is_refused(world: tuple) -> None:
    source, acme_key, globex_key = world
    globex = await look_up("sandbox-globex", source)
    assert isinstance(_offer(globex, globex_key), Accept)  # the sandbox itself is fine ...
    verdict = _offer(globex, acme_key)  # ... but acme's key does not open it
    assert verdict == Refuse(messages.KEY_NOT_REGISTERED.code)
    assert verdict.shows_registration_hint


async def test_unknown_sandbox_looks_like_an_unregistered_key_to_the_user(world: tuple) -> None:
    source, acme_key, _ = world
    verdict = _offer(await look_up("sandbox-nope", source), acme_key)
    assert verdict == Refuse(UNKNOWN_SANDBOX)  # logs and audit tell them apart ...
    assert verdict.shows_registration_hint  # ... the user sees the same hint


async def test_invalid_login_name_is_refused_without_a_lookup(world: tuple) -> None:
    source, acme_key, _ = world
    for name in ("root", "Sandbox-acme", "sandbox-acme ", "sandbox-" + "a" * 64, "sandbox-é"):
        verdict = _offer(await look_up(name, source), acme_key)
        assert verdict == Refuse(messages.INVALID_LOGIN_NAME.code), name
        assert not verdict.shows_registration_hint
    assert source.lookups == []


async def test_unreachable_keystore_refuses_every_key(world: tuple) -> None:
    source, acme_key, _ = world
    source.available = False
    lookup = await look_up("sandbox-acme", source)
    assert lookup.error
    assert _offer(lookup, acme_key) == Refuse(messages.KEYSTORE_UNAVAILABLE.code)


async def test_same_fingerprint_with_another_key_body_is_refused(world: tuple) -> None:
    """The stored line must match too, not only the fingerprint column."""
    source, acme_key, _ = world
    lookup = await look_up("sandbox-acme", source)
    verdict = decide(lookup, acme_key.get_fingerprint("sha256"), "ssh-ed25519 AAAAforged")
    assert verdict == Refuse(messages.KEY_NOT_REGISTERED.code)


async def test_one_lookup_per_login_name(world: tuple) -> None:
    source, acme_key, globex_key = world
    lookup = await look_up("sandbox-acme", source)
    for key in (globex_key, _key(), acme_key):
        _offer(lookup, key)
    assert source.lookups == ["sandbox-acme"]
