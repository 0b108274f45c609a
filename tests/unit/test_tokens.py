"""keystore.tokens: issuing, checking and scoping API keys."""

from __future__ import annotations

import datetime
import hashlib
import re
import string

import pytest

from keystore import tokens
from keystore.errors import InvalidInput, InvalidToken
from keystore.tokens import (
    ENVIRONMENTS,
    SCOPES,
    IssuedToken,
    ParsedToken,
    hash_token,
    issue,
    parse,
    parse_duration,
    scope_allows,
    validate_scopes,
    verify,
)

TOKEN_RE = re.compile(r"rt_(live|test)_[0-9A-Za-z]{44}")


def refused_token(value: object) -> str:
    with pytest.raises(InvalidToken) as info:
        parse(value)  # type: ignore[arg-type]
    assert info.value.code == "invalid_token"
    assert isinstance(info.value, InvalidInput)
    return str(info.value)


# --------------------------------------------------------------------------- issue / parse


@pytest.mark.parametrize("environment", ["live", "test"])
def test_issued_key_parses_back_to_the_same_lookup_and_hash(environment: str) -> None:
    issued = issue(environment)

    assert isinstance(issued, IssuedToken)
    assert TOKEN_RE.fullmatch(issued.token)
    assert issued.token.startswith(f"rt_{environment}_")
    assert issued.environment == environment
    assert len(issued.lookup) == 12
    assert issued.token[8:20] == issued.lookup
    assert issued.token_hash == hashlib.sha256(issued.token.encode()).digest()

    parsed = parse(issued.token)

    assert parsed == ParsedToken(
        environment=environment, lookup=issued.lookup, token_hash=issued.token_hash
    )
    assert verify(parsed.token_hash, issued.token_hash)


def test_environments_are_live_and_test() -> None:
    assert ENVIRONMENTS == ("live", "test")


def test_every_issued_key_is_different_and_uses_all_of_base62() -> None:
    issued = [issue("live") for _ in range(200)]

    assert len({t.token for t in issued}) == 200
    assert len({t.lookup for t in issued}) == 200
    used = set("".join(t.token[8:] for t in issued))  # 8800 random characters
    assert used == set(string.digits + string.ascii_letters)


def test_issuing_for_an_unknown_environment_is_refused() -> None:
    with pytest.raises(InvalidInput) as info:
        issue("prod")

    assert info.value.code == "invalid_environment"
    assert "live" in str(info.value) and "test" in str(info.value)


def test_stored_hash_is_sha256_of_the_whole_key() -> None:
    token = "rt_live_" + "a" * 12 + "B" * 32

    assert hash_token(token) == hashlib.sha256(token.encode()).digest()
    assert len(hash_token(token)) == 32
    assert parse(token).token_hash == hash_token(token)


def test_verify_accepts_the_right_key_and_refuses_any_other() -> None:
    issued = issue("live")
    other = issue("live")

    assert verify(hash_token(issued.token), issued.token_hash) is True
    assert verify(hash_token(other.token), issued.token_hash) is False
    assert verify(issued.token_hash[:-1], issued.token_hash) is False
    assert verify(b"", issued.token_hash) is False


def _flip(ch: str) -> str:
    return "b" if ch == "a" else "a"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-1] + _flip(t[-1]),  # last secret character
        lambda t: t[:30] + _flip(t[30]) + t[31:],  # middle of the secret
        lambda t: t[:8] + _flip(t[8]) + t[9:],  # lookup
        lambda t: t.replace("rt_live_", "rt_test_", 1),  # environment
    ],
    ids=["secret-end", "secret-middle", "lookup", "environment"],
)
def test_tampered_key_is_well_formed_but_does_not_verify(tamper: object) -> None:
    assert callable(tamper)
    issued = issue("live")
    tampered: str = tamper(issued.token)
    assert tampered != issued.token

    parsed = parse(tampered)

    assert not verify(parsed.token_hash, issued.token_hash)


GOOD = "rt_live_" + "Ab3" * 4 + "xY9z" * 8


@pytest.mark.parametrize(
    "value",
    [
        "",
        "rt_live_",
        GOOD[:-1],  # one character short
        GOOD + "x",  # one character long
        GOOD.replace("rt_live_", "rt_prod_"),
        GOOD.replace("rt_live_", "RT_LIVE_"),
        GOOD.replace("rt_live_", "sk_live_"),
        GOOD.replace("rt_live_", "rt_live-"),
        GOOD[:-1] + "-",
        GOOD[:-1] + "_",
        GOOD[:-1] + "é",
        GOOD[:-1] + "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit, but not base62
        GOOD[:20] + " " + GOOD[21:],
        GOOD + "\n",
        " " + GOOD,
        "Bearer " + GOOD,
        GOOD * 4,  # > 200 characters
        "x" * 10_000,
    ],
    ids=[
        "empty",
        "prefix-only",
        "short",
        "long",
        "wrong-env",
        "upper-case-prefix",
        "foreign-prefix",
        "dash-separator",
        "dash-char",
        "underscore-char",
        "accented-char",
        "unicode-digit",
        "space-inside",
        "trailing-newline",
        "leading-space",
        "bearer-prefix",
        "over-200",
        "huge",
    ],
)
def test_malformed_key_is_refused_without_echo(value: str) -> None:
    assert parse(GOOD).lookup == "Ab3" * 4  # the reference key itself is well formed

    message = refused_token(value)

    if len(value) >= 12:
        assert value not in message
        assert "xY9z" * 2 not in message
    assert "rt_live_" in message  # tells the person what a key looks like


@pytest.mark.parametrize("value", [None, 42, b"rt_live_" + b"a" * 44, ["rt_live_"]])
def test_non_string_key_is_refused(value: object) -> None:
    refused_token(value)


# --------------------------------------------------------------------------- scopes


def test_known_scopes() -> None:
    assert (
        frozenset(
            {
                "*",
                "ssh-key:*",
                "ssh-key:read",
                "ssh-key:write",
                "api-key:*",
                "api-key:read",
                "api-key:write",
                "audit:read",
            }
        )
        == SCOPES
    )


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (["ssh-key:read"], ("ssh-key:read",)),
        (["ssh-key:write", "api-key:read", "ssh-key:write"], ("api-key:read", "ssh-key:write")),
        (("*",), ("*",)),
        (["ssh-key:*", "*", "api-key:*"], ("*", "api-key:*", "ssh-key:*")),
    ],
)
def test_requested_scopes_are_deduplicated_and_sorted(
    requested: object, expected: tuple[str, ...]
) -> None:
    assert validate_scopes(requested) == expected


@pytest.mark.parametrize(
    ("requested", "named"),
    [
        (["ssh-key:admin"], "ssh-key:admin"),
        (["ssh-key:read", "billing:read"], "billing:read"),
        (["SSH-KEY:READ"], "SSH-KEY:READ"),
        ([" ssh-key:read"], " ssh-key:read"),
        (["ssh-key"], "ssh-key"),
    ],
)
def test_unknown_scope_is_refused_naming_it_and_listing_valid_ones(
    requested: object, named: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_scopes(requested)

    assert info.value.code == "invalid_scope"
    message = str(info.value)
    assert repr(named) in message
    for scope in SCOPES:
        assert scope in message


@pytest.mark.parametrize(
    "requested",
    [[], (), None, "ssh-key:read", {"ssh-key:read"}, {"ssh-key:read": True}, [1], [None]],
    ids=["empty-list", "empty-tuple", "none", "bare-string", "set", "dict", "int", "null-item"],
)
def test_scopes_that_are_not_a_non_empty_list_of_strings_are_refused(requested: object) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_scopes(requested)

    assert info.value.code == "invalid_scope"
    assert "ssh-key:read" in str(info.value)


SCOPE_MATRIX = [
    # granted, required, allowed
    (["*"], "ssh-key:read", True),
    (["*"], "api-key:write", True),
    (["ssh-key:*"], "ssh-key:read", True),
    (["ssh-key:*"], "ssh-key:write", True),
    (["ssh-key:*"], "api-key:read", False),
    (["api-key:*"], "api-key:write", True),
    (["api-key:*"], "ssh-key:read", False),
    (["ssh-key:read"], "ssh-key:read", True),
    (["ssh-key:read"], "ssh-key:write", False),
    (["ssh-key:write"], "ssh-key:read", False),
    (["ssh-key:read"], "api-key:read", False),
    (["api-key:read", "ssh-key:write"], "ssh-key:write", True),
    (["api-key:read", "ssh-key:write"], "api-key:write", False),
    ([], "ssh-key:read", False),
    (["ssh:*"], "ssh-key:read", False),  # unknown wildcard
    (["ssh-key"], "ssh-key:read", False),
    (["ssh-key:admin"], "ssh-key:read", False),
    (["**"], "ssh-key:read", False),
    (["SSH-KEY:READ"], "ssh-key:read", False),
]


@pytest.mark.parametrize(("granted", "required", "allowed"), SCOPE_MATRIX)
def test_scope_matrix(granted: list[str], required: str, allowed: bool) -> None:
    assert scope_allows(granted, required) is allowed
    assert scope_allows(tuple(granted), required) is allowed
    assert scope_allows(iter(granted), required) is allowed


@pytest.mark.parametrize("required", ["*", "ssh-key:*", "ssh-key:delete", ""])
def test_required_scope_must_be_concrete(required: str) -> None:
    with pytest.raises(ValueError):
        scope_allows(["*"], required)


def test_a_single_string_is_not_mistaken_for_a_list_of_scopes() -> None:
    # iterating "a*b" would yield "*" and allow everything
    with pytest.raises(TypeError):
        scope_allows("x*", "ssh-key:read")


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", datetime.timedelta(days=90)),
        ("12h", datetime.timedelta(hours=12)),
        ("30m", datetime.timedelta(minutes=30)),
        ("45s", datetime.timedelta(seconds=45)),
        ("2w", datetime.timedelta(weeks=2)),
        ("1s", datetime.timedelta(seconds=1)),
        ("3650d", datetime.timedelta(days=3650)),
        ("87600h", datetime.timedelta(days=3650)),
        ("521w", datetime.timedelta(weeks=521)),
        (" 7d\n", datetime.timedelta(days=7)),
        ("007d", datetime.timedelta(days=7)),
    ],
)
def test_duration_is_parsed(text: str, expected: datetime.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "d",
        "90",
        "0d",
        "000s",
        "-1d",
        "+1d",
        "1.5h",
        "1y",
        "1M",
        "90D",
        "1d2h",
        "1 d",
        "1_0d",
        "\u0661d",  # ARABIC-INDIC DIGIT ONE
        "3651d",
        "522w",
        "87601h",
        "315360001s",
        "99999999999999999999d",
        None,
        90,
        True,
        datetime.timedelta(days=1),
    ],
)
def test_invalid_duration_is_refused(text: object) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_duration(text)

    assert info.value.code == "invalid_duration"
    assert "90d" in str(info.value)  # shows an example of what works


def test_module_exports_its_public_api() -> None:
    for name in (
        "ENVIRONMENTS",
        "SCOPES",
        "IssuedToken",
        "ParsedToken",
        "issue",
        "parse",
        "hash_token",
        "verify",
        "validate_scopes",
        "scope_allows",
        "parse_duration",
    ):
        assert name in tokens.__all__
