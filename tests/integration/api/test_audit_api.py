"""``GET /v1/audit-events``: an organization's audit trail, newest first, filtered and paged,
and never another organization's events, whatever the filters name."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import pytest

from keystore import audit_events
from keystore.audit_events import AuditEvent
from tests.integration.api.support import Api, ApiOrg, make_org
from tests.integration.api.workos_support import (
    Issuer,
    JwksServer,
    SigningKey,
    close_api,
    member_org,
    start_api,
)

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with JwksServer([SigningKey.rsa()]) as server:
        yield server


@pytest.fixture(scope="module")
async def wapi(pool: Any, jwks: JwksServer) -> AsyncIterator[Api]:
    server, api = await start_api(pool, jwks.url)
    yield api
    await close_api(server, api)


async def seed(pool: Any, org: ApiOrg, n: int = 12) -> list[AuditEvent]:
    """``n`` events a minute apart from T0: actions, actors, targets and results vary."""
    events = [
        AuditEvent(
            action=["api.ssh_key.create", "api.ssh_key.revoke", "ssh.auth"][i % 3],
            result="refused" if i % 4 == 3 else "ok",
            org_id=org.id,
            reason="key_not_registered" if i % 4 == 3 else None,
            actor=f"actor-{i % 2}",
            target=f"target-{i % 5}",
            source_ip="192.0.2.7",
            details={"n": i},
            occurred_at=T0 + dt.timedelta(minutes=i),
        )
        for i in range(n)
    ]
    await audit_events.insert_many(pool, events)
    return events


async def everything(api: Api, token: str, query: str = "", limit: int = 5) -> list[Any]:
    """Every page of ``query``, following next_cursor."""
    found: list[Any] = []
    url = f"/v1/audit-events?limit={limit}{query}"
    for _ in range(100):
        r = await api.call("GET", url, token)
        assert r.status == 200, r.text
        found += r.body["data"]
        if r.body["next_cursor"] is None:
            return found
        url = f"/v1/audit-events?limit={limit}{query}&cursor={r.body['next_cursor']}"
    raise AssertionError("pagination never ended")


async def test_events_come_newest_first_in_pages_and_only_the_orgs_own(
    wapi: Api, pool: Any
) -> None:
    mine, theirs = await make_org(pool, "audit"), await make_org(pool, "audit")
    await seed(pool, mine)
    await seed(pool, theirs)
    token, _ = await mine.api_key(["audit:read"])
    events = await everything(wapi, token)
    assert [e["details"]["n"] for e in events] == list(range(11, -1, -1))
    first = events[0]
    assert first["occurred_at"] == (T0 + dt.timedelta(minutes=11)).isoformat()
    assert (first["source_ip"], first["actor"], first["target"]) == (
        "192.0.2.7",
        "actor-1",
        "target-1",
    )
    assert (first["action"], first["result"], first["reason"]) == (
        "ssh.auth",
        "refused",
        "key_not_registered",
    )
    assert len({e["id"] for e in events}) == 12


async def test_another_orgs_events_stay_invisible_whatever_the_filters_name(
    wapi: Api, pool: Any
) -> None:
    mine, theirs = await make_org(pool, "audit"), await make_org(pool, "audit")
    secret_actor = f"their-actor-{uuid.uuid4().hex[:6]}"
    await audit_events.insert_many(
        pool,
        [
            AuditEvent(
                action="api.api_key.create",
                result="ok",
                org_id=theirs.id,
                actor=secret_actor,
                target=str(theirs.id),
            )
        ],
    )
    token, _ = await mine.api_key(["*"])
    for query in (
        f"&actor={secret_actor}",
        f"&target={theirs.id}",
        "&action=api.api_key.create",
        "&action=api.*",
        "",
    ):
        assert await everything(wapi, token, query) == [], query
    r = await wapi.call("GET", f"/v1/audit-events?org_id={theirs.id}", token)
    assert (r.status, r.code) == (400, "unknown_parameter")
    their_token, _ = await theirs.api_key(["audit:read"])
    assert [e["actor"] for e in await everything(wapi, their_token)] == [secret_actor]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("&action=ssh.auth", [11, 8, 5, 2]),
        ("&action=api.ssh_key.*", [10, 9, 7, 6, 4, 3, 1, 0]),
        ("&actor=actor-0", [10, 8, 6, 4, 2, 0]),
        ("&target=target-3", [8, 3]),
        ("&result=refused", [11, 7, 3]),
        ("&since=2025-03-01T12:09:00Z", [11, 10, 9]),
        ("&until=2025-03-01T12:02:00Z", [1, 0]),
        ("&since=2025-03-01T12:03:00%2B00:00&until=2025-03-01T13:06:00%2B01:00", [5, 4, 3]),
        ("&action=ssh.auth&result=refused&actor=actor-1", [11]),
        ("&action=nothing.like.this", []),
    ],
)
async def test_filters(wapi: Api, pool: Any, query: str, expected: list[int]) -> None:
    org = await make_org(pool, "audit")
    await seed(pool, org)
    token, _ = await org.api_key(["audit:read"])
    found = await everything(wapi, token, query, limit=2)
    assert [e["details"]["n"] for e in found] == expected


async def test_a_like_pattern_in_the_action_is_taken_literally(wapi: Api, pool: Any) -> None:
    org = await make_org(pool, "audit")
    await seed(pool, org)
    token, _ = await org.api_key(["audit:read"])
    assert await everything(wapi, token, "&action=" + quote("%")) == []
    assert await everything(wapi, token, "&action=" + quote("api_ssh*")) == []


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("result=maybe", "invalid_parameter"),
        ("since=yesterday", "invalid_parameter"),
        ("since=2025-03-01", "invalid_parameter"),
        ("since=2025-03-01T12:00:00", "invalid_parameter"),  # no offset
        ("since=2025-03-02T00:00:00Z&until=2025-03-01T00:00:00Z", "invalid_parameter"),
        ("action=a*b*", "invalid_parameter"),
        ("actor=" + "x" * 101, "invalid_parameter"),
        ("actor=" + quote("é"), "invalid_parameter"),
        ("target=" + quote("a\nb"), "invalid_parameter"),
        ("cursor=not-a-cursor", "invalid_cursor"),
        ("limit=0", "invalid_limit"),
        ("limit=101", "invalid_limit"),
        ("actor=a&actor=b", "invalid_parameter"),
        ("org=acme", "unknown_parameter"),
    ],
)
async def test_bad_queries_are_refused_with_400(
    wapi: Api, pool: Any, query: str, code: str
) -> None:
    org = await make_org(pool, "audit")
    token, _ = await org.api_key(["audit:read"])
    r = await wapi.call("GET", f"/v1/audit-events?{query}", token)
    assert (r.status, r.code) == (400, code), r.text


async def test_admins_and_owners_read_the_trail_and_the_other_roles_do_not(
    wapi: Api, pool: Any, jwks: JwksServer
) -> None:
    morg = await member_org(pool, Issuer(jwks.keys[0]))
    await seed(pool, morg.org, 3)
    for role in ("owner", "admin"):
        r = await wapi.call("GET", "/v1/audit-events", morg.token(role))
        assert r.status == 200 and len(r.body["data"]) == 3, r.text
    for role in ("developer", "member", "viewer"):
        r = await wapi.call("GET", "/v1/audit-events", morg.token(role))
        assert (r.status, r.code) == (403, "insufficient_permission")
    r = await wapi.call("GET", "/v1/audit-events", morg.token("viewer", permissions=["audit:read"]))
    assert r.status == 200


async def test_an_over_long_query_still_answers_json(wapi: Api, pool: Any) -> None:
    org = await make_org(pool, "audit")
    token, _ = await org.api_key(["audit:read"])
    r = await wapi.call("GET", "/v1/audit-events?cursor=" + "%C3%A9" * 2000, token)
    assert r.status == 400
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.code == "bad_request"
