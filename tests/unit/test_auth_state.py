"""The auth state machine of one connection, driven the way asyncssh drives it.

OpenSSH's client never changes login name within a connection, but the protocol allows it
(RFC 4252 section 5) and a hostile client can: these tests drive the callbacks directly, with
the key sets that one query per login name would return held in memory.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncssh
import pytest

from gateway.audit.writer import AuditWriter
from gateway.config import Config
from gateway.ssh.access import StaticAccess
from gateway.ssh.auth import canonical_line
from gateway.ssh.runtime import Runtime
from gateway.ssh.server import GatewayConnection
from keystore.keys import fingerprint_of_blob
from keystore.models import AuthorizedKey, Sandbox, SandboxAccess


def _access(sandbox_id: str, keys: list[asyncssh.SSHKey]) -> SandboxAccess:
    org = uuid.uuid4()
    sandbox = Sandbox(
        id=sandbox_id,
        org_id=org,
        org_slug=f"org-of-{sandbox_id}",
        project_id=uuid.uuid4(),
        status="running",
        upstream_host="127.0.0.1",
        upstream_port=22,
        login_user="dev",
        host_keys=("ssh-ed25519 AAAA",),
        created_at=dt.datetime.now(dt.UTC),
    )
    authorized = tuple(
        AuthorizedKey(uuid.uuid4(), fingerprint_of_blob(k.public_data), canonical_line(k))
        for k in keys
    )
    return SandboxAccess(sandbox=sandbox, keys=authorized)


@pytest.fixture
def conn() -> tuple[GatewayConnection, asyncssh.SSHKey]:
    mine = asyncssh.generate_private_key("ssh-ed25519")
    theirs = asyncssh.generate_private_key("ssh-ed25519")
    access = StaticAccess(
        {
            "sandbox-mine": _access("sandbox-mine", [mine]),
            "sandbox-theirs": _access("sandbox-theirs", [theirs]),
        }
    )
    runtime = Runtime(
        config=Config.load(env={}),
        db=None,
        upstream_key=mine,
        audit=AuditWriter(db=None),
        access=access,
    )
    return GatewayConnection(runtime), mine


async def test_a_key_accepted_for_one_sandbox_does_not_carry_over_to_another_login(
    conn: tuple[GatewayConnection, asyncssh.SSHKey],
) -> None:
    gw, key = conn
    await gw.begin_auth("sandbox-mine")
    assert gw.validate_public_key("sandbox-mine", key) is True  # the unsigned query: PK_OK
    await gw.begin_auth("sandbox-theirs")  # the client switches login name ...
    assert gw.validate_public_key("sandbox-theirs", key) is False  # ... and is refused


async def test_the_signed_request_is_answered_from_the_current_logins_keys(
    conn: tuple[GatewayConnection, asyncssh.SSHKey],
) -> None:
    gw, key = conn
    await gw.begin_auth("sandbox-mine")
    assert gw.validate_public_key("sandbox-mine", key) is True
    assert gw.validate_public_key("sandbox-mine", key) is True  # the signed call
    await gw.begin_auth("not-a-sandbox")
    assert gw.validate_public_key("not-a-sandbox", key) is False


async def test_keyboard_interactive_only_shows_the_hint_and_never_lets_anyone_in(
    conn: tuple[GatewayConnection, asyncssh.SSHKey],
) -> None:
    gw, _key = conn
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    await gw.begin_auth("sandbox-mine")
    assert gw.kbdint_auth_supported() is False  # nothing refused yet: not offered
    assert gw.validate_public_key("sandbox-mine", stranger) is False
    assert gw.kbdint_auth_supported() is True  # offered last, to carry the hint
    assert gw.get_kbdint_challenge("sandbox-mine", "", "") is False  # fails at once
    assert gw.validate_kbdint_response("sandbox-mine", ["anything"]) is False
    assert gw.password_auth_supported() is False
