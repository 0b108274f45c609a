"""keystore.changes without a database: payload parsing, what a change concerns, the pending
queue's overflow; and the multi-host DSN helpers of keystore.db."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from typing import Any

import pytest

from keystore import db as keystore_db
from keystore.changes import CHANNEL, AccessChange, ChangeListener, parse_change
from keystore.errors import InvalidChange, InvalidInput

ORG = uuid.UUID("6f1c7a52-4a55-4c3e-9a43-0d7b1c1c2a10")
KEY = uuid.UUID("0b8e3f0e-2a8c-4a8e-8b5e-1d6f3a9c7e21")
FP = "SHA256:" + "A" * 43


def payload(**fields: Any) -> str:
    return json.dumps(fields)


def test_parses_each_kind_the_triggers_send() -> None:
    key = parse_change(
        payload(
            kind="ssh_key",
            op="update",
            org_id=str(ORG),
            key_id=str(KEY),
            fingerprint=FP,
            changed=["revoked_at"],
            at=1767225600.123456,
        )
    )
    assert key == AccessChange(
        kind="ssh_key",
        org_id=ORG,
        op="update",
        key_id=KEY,
        fingerprint=FP,
        changed=("revoked_at",),
        at=1767225600.123456,
    )
    sandbox = parse_change(
        payload(kind="sandbox", op="delete", org_id=str(ORG), sandbox_id="sandbox-a", at=1)
    )
    assert (sandbox.sandbox_id, sandbox.op, sandbox.at, sandbox.changed) == (
        "sandbox-a",
        "delete",
        1.0,
        (),
    )
    org = parse_change(payload(kind="org", op="delete", org_id=str(ORG), at=2.5))
    assert (org.kind, org.org_id, org.key_id, org.sandbox_id) == ("org", ORG, None, None)
    everything = parse_change(b'{"kind": "all", "op": "truncate", "at": 3}')
    assert everything.org_id is None


def test_unknown_fields_are_ignored_and_op_and_at_are_optional() -> None:
    change = parse_change(payload(kind="org", org_id=str(ORG), future="x", v=2))
    assert change == AccessChange(kind="org", org_id=ORG)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        "[1, 2]",
        '"org"',
        payload(kind="user", org_id=str(ORG)),
        payload(org_id=str(ORG)),
        payload(kind="org"),
        payload(kind="org", org_id="not-a-uuid"),
        payload(kind="org", org_id=42),
        payload(kind="org", org_id=str(ORG), op="upsert"),
        payload(kind="ssh_key", org_id=str(ORG)),
        payload(kind="ssh_key", org_id=str(ORG), key_id="nope"),
        payload(kind="sandbox", org_id=str(ORG)),
        payload(kind="sandbox", org_id=str(ORG), sandbox_id=7),
        payload(kind="ssh_key", org_id=str(ORG), key_id=str(KEY), fingerprint=1),
        payload(kind="org", org_id=str(ORG), changed="status"),
        payload(kind="org", org_id=str(ORG), changed=[1]),
        payload(kind="org", org_id=str(ORG), at="yesterday"),
        payload(kind="org", org_id=str(ORG), at=True),
        f'{{"kind": "org", "org_id": "{ORG}", "at": NaN}}',
        payload(kind="org", org_id=str(ORG), pad="x" * 8000),
        b"\xff\xfe",
    ],
)
def test_rejects_what_is_not_one_of_ours(raw: str | bytes) -> None:
    with pytest.raises(InvalidChange) as caught:
        parse_change(raw)
    assert isinstance(caught.value, InvalidInput)
    assert caught.value.code == "invalid_change"


def test_changes_are_frozen() -> None:
    change = AccessChange(kind="org", org_id=ORG)
    with pytest.raises(AttributeError):
        change.kind = "all"  # type: ignore[misc]


def test_concerns_matches_a_grant_by_org_then_key_or_sandbox() -> None:
    other_org, other_key = uuid.uuid4(), uuid.uuid4()
    key = AccessChange(kind="ssh_key", org_id=ORG, key_id=KEY)
    assert key.concerns(ORG, "sandbox-a", KEY)
    assert not key.concerns(ORG, "sandbox-a", other_key)
    assert not key.concerns(other_org, "sandbox-a", KEY)  # same key id, another org's grant
    sandbox = AccessChange(kind="sandbox", org_id=ORG, sandbox_id="sandbox-a")
    assert sandbox.concerns(ORG, "sandbox-a", other_key)
    assert not sandbox.concerns(ORG, "sandbox-b", KEY)
    assert not sandbox.concerns(other_org, "sandbox-a", KEY)
    assert AccessChange(kind="org", org_id=ORG).concerns(ORG, "sandbox-z", other_key)
    assert not AccessChange(kind="org", org_id=ORG).concerns(other_org, "sandbox-z", KEY)
    assert AccessChange(kind="all", org_id=None).concerns(other_org, "sandbox-z", KEY)


async def test_an_overflowing_queue_becomes_one_recheck() -> None:
    seen: list[str] = []
    listener = ChangeListener(
        "postgresql://unused/db",
        lambda change: seen.append(change.sandbox_id or ""),
        on_subscribed=lambda: seen.append("recheck"),
        max_pending=3,
    )
    for n in range(5):
        body = payload(kind="sandbox", org_id=str(ORG), sandbox_id=f"sandbox-{n}")
        listener._notified(None, 0, CHANNEL, body)
    listener._notified(None, 0, CHANNEL, "garbage")
    assert (listener.notifications, listener.malformed, listener.overflows) == (6, 1, 1)
    dispatcher = asyncio.create_task(listener._dispatch())
    try:
        await asyncio.wait_for(_until_empty(listener), 2.0)
    finally:
        dispatcher.cancel()
    # The three queued before the overflow were replaced by one re-check; the fifth came after.
    assert seen == ["recheck", "sandbox-4"]


async def _until_empty(listener: ChangeListener) -> None:
    while not listener._queue.empty():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)


async def test_start_never_raises_for_an_unreachable_database() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listener = ChangeListener(
        f"postgresql://nobody@127.0.0.1:{port}/db",
        lambda change: None,
        connect_timeout_seconds=0.5,
        backoff_initial_seconds=0.05,
        backoff_max_seconds=0.1,
    )
    await asyncio.wait_for(listener.start(), 5.0)
    try:
        assert listener.state in ("down", "connecting")
        assert listener.last_error and listener.down_since is not None
        assert not await listener.wait_listening(0.2)
    finally:
        await listener.close()
    assert listener.state == "down"


def test_dsn_hosts() -> None:
    hosts = keystore_db.dsn_hosts
    assert hosts("postgresql://u:p@db1:5433,db2/runtools?target_session_attrs=read-write") == [
        ("db1", 5433),
        ("db2", 5432),
    ]
    assert hosts("postgresql://[::1]:6000,[fe80::2]/x") == [("::1", 6000), ("fe80::2", 5432)]
    assert hosts("postgresql://u@db1:5433/runtools") == []  # one host: asyncpg's own path
    assert hosts("postgresql:///runtools?host=/tmp") == []


def test_target_session_attrs_of(monkeypatch: pytest.MonkeyPatch) -> None:
    of = keystore_db.target_session_attrs_of
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)
    assert of("postgresql://a,b/x") == "any"
    assert of("postgresql://a,b/x?target_session_attrs=read-write") == "read-write"
    assert of("postgresql://a,b/x?sslmode=disable", {"target_session_attrs": "primary"}) == (
        "primary"
    )
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "prefer-standby")
    assert of("postgresql://a,b/x") == "prefer-standby"
