"""The access cache: repeat logins of a sandbox are answered from memory only while the change
listener is up, and every notification that concerns a cached sandbox drops it."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest

from gateway.ssh.access import CachedAccess, StaticAccess
from keystore.changes import AccessChange
from keystore.errors import Unavailable
from keystore.models import Sandbox, SandboxAccess

ORG_A, ORG_B = uuid.uuid4(), uuid.uuid4()


def _access(sandbox_id: str, org: uuid.UUID) -> SandboxAccess:
    sandbox = Sandbox(
        id=sandbox_id,
        org_id=org,
        org_slug="org",
        project_id=uuid.uuid4(),
        status="running",
        upstream_host="127.0.0.1",
        upstream_port=22,
        login_user="dev",
        host_keys=("ssh-ed25519 AAAA",),
        created_at=dt.datetime.now(dt.UTC),
    )
    return SandboxAccess(sandbox=sandbox, keys=())


class World:
    def __init__(self) -> None:
        self.source = StaticAccess(
            {
                "sandbox-a1": _access("sandbox-a1", ORG_A),
                "sandbox-a2": _access("sandbox-a2", ORG_A),
                "sandbox-b1": _access("sandbox-b1", ORG_B),
            }
        )
        self.listening = True
        self.now = 1000.0
        self.cache = CachedAccess(
            self.source,
            ttl_seconds=30,
            listening=lambda: self.listening,
            clock=lambda: self.now,
        )

    def look(self, sandbox_id: str) -> SandboxAccess | None:
        return asyncio.run(self.cache.access_for(sandbox_id))


@pytest.fixture
def world() -> World:
    return World()


def test_a_repeat_login_needs_no_database_lookup(world: World) -> None:
    first = world.look("sandbox-a1")
    again = world.look("sandbox-a1")
    assert first is again is not None
    assert world.source.lookups == ["sandbox-a1"]


def test_entries_age_out_after_the_ttl(world: World) -> None:
    world.look("sandbox-a1")
    world.now += 31
    world.look("sandbox-a1")
    assert world.source.lookups == ["sandbox-a1", "sandbox-a1"]


def test_an_unknown_sandbox_is_never_cached(world: World) -> None:
    assert world.look("sandbox-new") is None
    world.source.table["sandbox-new"] = _access("sandbox-new", ORG_A)
    assert world.look("sandbox-new") is not None


def test_a_key_change_drops_every_sandbox_of_its_org_only(world: World) -> None:
    for sid in ("sandbox-a1", "sandbox-a2", "sandbox-b1"):
        world.look(sid)
    world.cache.invalidate(AccessChange("ssh_key", ORG_A, "update", key_id=uuid.uuid4()))
    assert len(world.cache) == 1
    world.look("sandbox-a1")
    world.look("sandbox-b1")
    assert world.source.lookups.count("sandbox-a1") == 2
    assert world.source.lookups.count("sandbox-b1") == 1


@pytest.mark.parametrize(
    "change",
    [
        AccessChange("ssh_key", ORG_A, "insert", key_id=uuid.uuid4()),
        AccessChange("cert_authority", ORG_A, "update", key_id=uuid.uuid4()),
        AccessChange("org", ORG_A, "update"),
        AccessChange("sandbox", ORG_A, "update", sandbox_id="sandbox-a1"),
        AccessChange("all", None, "truncate"),
    ],
)
def test_every_kind_of_change_drops_the_sandbox_it_concerns(
    world: World, change: AccessChange
) -> None:
    world.look("sandbox-a1")
    world.cache.invalidate(change)
    world.look("sandbox-a1")
    assert world.source.lookups == ["sandbox-a1", "sandbox-a1"]


def test_while_the_listener_is_down_every_lookup_goes_to_the_database(world: World) -> None:
    world.look("sandbox-a1")
    world.listening = False
    world.look("sandbox-a1")
    assert len(world.cache) == 0
    world.source.available = False  # and so a dead database refuses, cache or not
    with pytest.raises(Unavailable):
        world.look("sandbox-a1")
    world.source.available = True
    world.listening = True
    world.look("sandbox-a1")
    world.look("sandbox-a1")
    assert world.source.lookups == ["sandbox-a1"] * 4  # the last one from memory


def test_a_reply_that_raced_a_change_is_not_kept(world: World) -> None:
    class Racing(StaticAccess):
        async def access_for(self, sandbox_id: str) -> SandboxAccess | None:
            found = await super().access_for(sandbox_id)
            # The notification arrives while this (possibly stale) reply is on its way.
            world.cache.invalidate(AccessChange("ssh_key", ORG_A, "update", key_id=uuid.uuid4()))
            return found

    racing = Racing(world.source.table)
    world.cache = CachedAccess(
        racing, ttl_seconds=30, listening=lambda: world.listening, clock=lambda: world.now
    )
    world.look("sandbox-a1")
    assert len(world.cache) == 0
    world.look("sandbox-a1")
    assert racing.lookups == ["sandbox-a1", "sandbox-a1"]


def test_a_ttl_of_zero_turns_the_cache_off(world: World) -> None:
    world.cache.ttl_seconds = 0
    world.look("sandbox-a1")
    world.look("sandbox-a1")
    assert world.source.lookups == ["sandbox-a1", "sandbox-a1"]
