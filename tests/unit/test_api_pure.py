"""The key API's pure parts: cursors, body fields, bearer headers, scope coverage, rate limit."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from keystore.api.auth import RateLimiter, bearer_token, challenge, covers
from keystore.api.common import decode_cursor, encode_cursor, fields
from keystore.api.errors import ApiError, from_keystore
from keystore.errors import Conflict, InvalidInput, NotFound, Unavailable

# --- cursors -------------------------------------------------------------------------------


def test_a_cursor_gives_back_exactly_the_row_position_it_was_made_from() -> None:
    when = dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.UTC)
    row_id = uuid.uuid4()
    cursor = encode_cursor(when, row_id)
    assert decode_cursor(cursor) == (when, row_id)
    assert cursor.isascii() and "=" not in cursor and "|" not in cursor


def test_a_cursor_keeps_a_non_utc_offset() -> None:
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert decode_cursor(encode_cursor(when, uuid.UUID(int=1)))[0] == when


@pytest.mark.parametrize(
    "cursor",
    ["", "!!!", "a" * 201, "bm90LWEtY3Vyc29y", "MjAyNC0wMS0wMVQwMDowMDowMHw", "MjAyNC0wMS0wMXx4"],
)
def test_a_tampered_or_foreign_cursor_is_a_400(cursor: str) -> None:
    with pytest.raises(ApiError) as info:
        decode_cursor(cursor)
    assert (info.value.status, info.value.code) == (400, "invalid_cursor")


def test_a_cursor_without_a_time_zone_is_refused() -> None:
    naive = encode_cursor(dt.datetime(2024, 1, 1), uuid.UUID(int=5))
    with pytest.raises(ApiError):
        decode_cursor(naive)


# --- body fields ---------------------------------------------------------------------------


def test_fields_returns_what_was_given_and_of_the_right_type() -> None:
    got = fields({"name": "a", "tags": ["x"]}, required={"name": str}, optional={"tags": list})
    assert got == {"name": "a", "tags": ["x"]}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "missing_field"),
        ({"name": None}, "invalid_type"),
        ({"name": 1}, "invalid_type"),
        ({"name": "a", "size": True}, "invalid_type"),
        ({"name": "a", "extra": 1}, "unknown_field"),
    ],
)
def test_fields_refuses_missing_wrong_and_unknown_fields(
    body: dict[str, object], code: str
) -> None:
    with pytest.raises(ApiError) as info:
        fields(body, required={"name": str}, optional={"size": int})
    assert (info.value.status, info.value.code) == (400, code)


# --- bearer header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer abc", "abc"), ("  Bearer   abc  ", "abc")],
)
def test_the_token_is_taken_from_a_bearer_header(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("Basic abc", "invalid_api_key"),
        ("Bearer", "invalid_api_key"),
        ("Token abc", "invalid_api_key"),
    ],
)
def test_a_missing_or_foreign_authorization_header_is_a_401_with_a_challenge(
    header: str | None, code: str
) -> None:
    with pytest.raises(ApiError) as info:
        bearer_token(header)
    assert (info.value.status, info.value.code) == (401, code)
    assert info.value.headers["WWW-Authenticate"].startswith('Bearer realm="runtools"')


def test_the_challenge_quotes_its_parameters() -> None:
    text = challenge("insufficient_scope", scope="ssh-key:write")
    assert text == 'Bearer realm="runtools", error="insufficient_scope", scope="ssh-key:write"'


# --- scope coverage (what a key may grant) -------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "wanted", "ok"),
    [
        (["*"], "*", True),
        (["*"], "ssh-key:*", True),
        (["api-key:*"], "*", False),
        (["api-key:*"], "api-key:*", True),
        (["api-key:*"], "api-key:read", True),
        (["api-key:*"], "ssh-key:read", False),
        (["api-key:read", "api-key:write"], "api-key:*", False),
        (["ssh-key:*"], "ssh-key:write", True),
        (["ssh-key:read"], "ssh-key:*", False),
        (["ssh-key:read"], "ssh-key:read", True),
        ([], "ssh-key:read", False),
    ],
)
def test_a_key_covers_only_scopes_it_holds(granted: list[str], wanted: str, ok: bool) -> None:
    assert covers(granted, wanted) is ok


# --- rate limit ----------------------------------------------------------------------------


def test_the_rate_limit_allows_a_burst_then_refills_over_time() -> None:
    limiter = RateLimiter(per_second=2.0, burst=3)
    assert [limiter.take("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("k", now=0.0)
    assert wait == pytest.approx(0.5)
    assert limiter.take("k", now=0.5) == 0.0
    assert limiter.take("other", now=0.5) == 0.0  # per key


def test_the_rate_limiter_forgets_idle_keys_instead_of_growing_without_bound() -> None:
    limiter = RateLimiter(per_second=1.0, burst=1, max_keys=10)
    for i in range(10):
        limiter.take(i, now=0.0)
    limiter.take("late", now=100.0)
    assert len(limiter._buckets) == 1


# --- keystore errors as HTTP ---------------------------------------------------------------


def test_keystore_errors_map_to_their_status() -> None:
    assert from_keystore(NotFound("gone")).status == 404
    conflict = from_keystore(Conflict("dup", existing_id="abc"))
    assert (conflict.status, conflict.extra) == (409, {"existing_id": "abc"})
    invalid = from_keystore(InvalidInput("bad", code="invalid_name"))
    assert (invalid.status, invalid.code, invalid.message) == (400, "invalid_name", "bad")
    down = from_keystore(Unavailable("database unavailable while x: OSError"))
    assert down.status == 503
    assert "OSError" not in down.message
