"""The API-key gaps closed by issue 13: a key revokes or rotates only keys its scopes cover, a
key made by an expiring key never outlives it, and an rt_test_ key never makes rt_live_ keys."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from tests.integration.api.support import Api, ApiOrg


def when(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


# --- revoke and rotate only what one's scopes cover ----------------------------------------


async def test_an_api_key_star_key_cannot_revoke_the_orgs_star_key(api: Api, org: ApiOrg) -> None:
    narrow, _ = await org.api_key(["api-key:*"], name="key manager")
    root_token, root = await org.api_key(["*"], name="root")
    r = await api.call("DELETE", f"/v1/api-keys/{root.id}", narrow)
    assert (r.status, r.code) == (403, "insufficient_scope"), r.text
    assert "'*'" in r.body["error"]["message"]
    assert (await api.call("GET", "/v1/ssh-keys", root_token)).status == 200
    assert not [
        e for e in api.events if e.action == "api.api_key.revoke" and e.target == str(root.id)
    ]


@pytest.mark.parametrize(
    ("caller", "target", "allowed"),
    [
        (["api-key:*"], ["api-key:read"], True),
        (["api-key:*"], ["api-key:*"], True),
        (["api-key:*"], ["ssh-key:read"], False),
        (["api-key:*", "ssh-key:*"], ["ssh-key:read", "api-key:write"], True),
        (["api-key:write"], ["api-key:read"], False),  # api-key:write covers no scope
        (["api-key:write", "ssh-key:read"], ["ssh-key:read"], True),
        (["api-key:*"], ["audit:read"], False),
        (["*"], ["*"], True),
    ],
)
@pytest.mark.parametrize("operation", ["revoke", "rotate"])
async def test_revoking_and_rotating_need_the_targets_scopes(
    api: Api,
    org: ApiOrg,
    caller: list[str],
    target: list[str],
    allowed: bool,
    operation: str,
) -> None:
    token, _ = await org.api_key(caller)
    target_token, key = await org.api_key(target)
    if operation == "revoke":
        r = await api.call("DELETE", f"/v1/api-keys/{key.id}", token)
    else:
        r = await api.call("POST", f"/v1/api-keys/{key.id}/rotate", token)
    if allowed:
        assert r.status in (201, 204), r.text
    else:
        assert (r.status, r.code) == (403, "insufficient_scope"), r.text
        still = await api.call("GET", "/v1/api-keys", target_token)
        assert still.status != 401, "the target key must still work"


async def test_a_key_may_revoke_itself(api: Api, org: ApiOrg) -> None:
    token, key = await org.api_key(["api-key:*"])
    assert (await api.call("DELETE", f"/v1/api-keys/{key.id}", token)).status == 204
    assert (await api.call("GET", "/v1/api-keys", token)).code == "api_key_revoked"


# --- an expiring key's creations expire with it ----------------------------------------------


async def test_a_key_made_by_an_expiring_key_expires_with_it_by_default(
    api: Api, org: ApiOrg
) -> None:
    token, caller = await org.api_key(["*"], expires_in=dt.timedelta(hours=2))
    r = await api.call("POST", "/v1/api-keys", token, json_body={"name": "x", "scopes": ["*"]})
    assert r.status == 201, r.text
    assert when(r.body["expires_at"]) == caller.expires_at


async def test_a_key_made_by_an_expiring_key_may_expire_sooner(api: Api, org: ApiOrg) -> None:
    token, caller = await org.api_key(["*"], expires_in=dt.timedelta(hours=2))
    r = await api.call(
        "POST",
        "/v1/api-keys",
        token,
        json_body={"name": "x", "scopes": ["ssh-key:read"], "expires_in": "1h"},
    )
    assert r.status == 201, r.text
    ends = when(r.body["expires_at"])
    assert ends is not None and caller.expires_at is not None
    assert ends < caller.expires_at
    assert abs(ends - (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))) < dt.timedelta(minutes=1)


@pytest.mark.parametrize("expires_in", ["3h", "90d"])
async def test_a_key_cannot_make_a_key_that_outlives_it(
    api: Api, org: ApiOrg, expires_in: str
) -> None:
    token, _ = await org.api_key(["*"], expires_in=dt.timedelta(hours=2))
    r = await api.call(
        "POST",
        "/v1/api-keys",
        token,
        json_body={"name": "x", "scopes": ["*"], "expires_in": expires_in},
    )
    assert (r.status, r.code) == (403, "expires_after_caller"), r.text


async def test_rotation_by_an_expiring_key_never_outlives_it(api: Api, org: ApiOrg) -> None:
    token, caller = await org.api_key(["*"], expires_in=dt.timedelta(hours=1))
    _, forever = await org.api_key(["ssh-key:read"], name="no expiry")
    r = await api.call("POST", f"/v1/api-keys/{forever.id}/rotate", token)
    assert r.status == 201, r.text
    assert when(r.body["expires_at"]) == caller.expires_at
    _, other = await org.api_key(["ssh-key:read"])
    r = await api.call(
        "POST", f"/v1/api-keys/{other.id}/rotate", token, json_body={"expires_in": "30d"}
    )
    assert (r.status, r.code) == (403, "expires_after_caller")
    # Rotating itself cannot extend its own life either.
    r = await api.call("POST", f"/v1/api-keys/{caller.id}/rotate", token)
    assert r.status == 201, r.text
    assert when(r.body["expires_at"]) == caller.expires_at


async def test_a_key_in_its_rotation_grace_period_makes_keys_that_end_with_the_grace(
    api: Api, org: ApiOrg, admin: str
) -> None:
    old_token, old = await org.api_key(["*"])
    r = await api.call(
        "POST", f"/v1/api-keys/{old.id}/rotate", admin, json_body={"grace_period": "1h"}
    )
    grace_end = when(r.body["previous"]["expires_at"])
    made = await api.call(
        "POST", "/v1/api-keys", old_token, json_body={"name": "x", "scopes": ["ssh-key:read"]}
    )
    assert made.status == 201, made.text
    assert when(made.body["expires_at"]) == grace_end


async def test_keys_without_expiry_and_members_are_not_bounded(api: Api, admin: str) -> None:
    r = await api.call(
        "POST", "/v1/api-keys", admin, json_body={"name": "x", "scopes": ["*"], "expires_in": "90d"}
    )
    assert r.status == 201
    r = await api.call("POST", "/v1/api-keys", admin, json_body={"name": "x", "scopes": ["*"]})
    assert (r.status, r.body["expires_at"]) == (201, None)


# --- rt_test_ keys stay in test ----------------------------------------------------------------


async def test_a_test_key_cannot_create_a_live_key(api: Api, org: ApiOrg) -> None:
    token, _ = await org.api_key(["*"], environment="test")
    for body in (
        {"name": "x", "scopes": ["ssh-key:read"], "environment": "live"},
        {"name": "x", "scopes": ["ssh-key:read"]},  # live is the default
    ):
        r = await api.call("POST", "/v1/api-keys", token, json_body=body)
        assert (r.status, r.code) == (403, "test_key_cannot_make_live"), r.text
    r = await api.call(
        "POST",
        "/v1/api-keys",
        token,
        json_body={"name": "x", "scopes": ["ssh-key:read"], "environment": "test"},
    )
    assert r.status == 201 and r.body["secret"].startswith("rt_test_")


async def test_a_test_key_cannot_rotate_a_live_key_into_a_new_live_secret(
    api: Api, org: ApiOrg
) -> None:
    token, _ = await org.api_key(["*"], environment="test")
    live_token, live = await org.api_key(["ssh-key:read"])
    r = await api.call("POST", f"/v1/api-keys/{live.id}/rotate", token)
    assert (r.status, r.code) == (403, "test_key_cannot_make_live")
    assert (await api.call("GET", "/v1/ssh-keys", live_token)).status == 200
    _, test_key = await org.api_key(["ssh-key:read"], environment="test")
    r = await api.call("POST", f"/v1/api-keys/{test_key.id}/rotate", token)
    assert r.status == 201 and r.body["secret"].startswith("rt_test_")


async def test_a_live_key_may_still_make_test_keys(api: Api, admin: str) -> None:
    body: dict[str, Any] = {"name": "x", "scopes": ["ssh-key:read"], "environment": "test"}
    r = await api.call("POST", "/v1/api-keys", admin, json_body=body)
    assert r.status == 201
