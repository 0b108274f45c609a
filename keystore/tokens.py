"""API keys: format, hashing, scopes and durations (pure: no I/O, no database).

An API key looks like ``rt_live_<lookup><secret>`` or ``rt_test_<lookup><secret>``:

* ``lookup`` is 12 base62 characters (``[0-9A-Za-z]``). It is not secret: it is stored in
  clear and indexed, so the row can be found without comparing hashes across the table.
* ``secret`` is 32 base62 characters from :mod:`secrets`, about 190 bits of entropy.

Only :func:`hash_token` of the whole key is stored. The full key is shown once, at issue.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass

from keystore.errors import InvalidInput, InvalidToken

__all__ = [
    "ENVIRONMENTS",
    "LOOKUP_LEN",
    "MAX_DURATION",
    "MAX_TOKEN_CHARS",
    "SCOPES",
    "SECRET_LEN",
    "IssuedToken",
    "ParsedToken",
    "hash_token",
    "issue",
    "parse",
    "parse_duration",
    "scope_allows",
    "validate_scopes",
    "verify",
]

ENVIRONMENTS = ("live", "test")
LOOKUP_LEN = 12
SECRET_LEN = 32
MAX_TOKEN_CHARS = 200
_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase  # base62
_TOKEN_RE = re.compile(rf"rt_(live|test)_([0-9A-Za-z]{{{LOOKUP_LEN}}})[0-9A-Za-z]{{{SECRET_LEN}}}")
_FORMAT_HINT = (
    f"API keys look like rt_live_... or rt_test_... followed by {LOOKUP_LEN + SECRET_LEN} "
    "letters and digits. Copy the whole key exactly as it was shown when it was created."
)

SCOPES: frozenset[str] = frozenset(
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
_CONCRETE_SCOPES = frozenset(s for s in SCOPES if s != "*" and not s.endswith(":*"))

MAX_DURATION = datetime.timedelta(days=3650)
_DURATION_RE = re.compile(r"([0-9]{1,12})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    """The full secret key. Show it once; never store or log it."""
    environment: str
    """'live' or 'test'."""
    lookup: str
    """12-character public lookup id (stored in clear, indexed)."""
    token_hash: bytes
    """sha256(token) digest (stored)."""


@dataclass(frozen=True, slots=True)
class ParsedToken:
    environment: str
    lookup: str
    token_hash: bytes


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def issue(environment: str) -> IssuedToken:
    """Make a new API key for ``environment`` ('live' or 'test')."""
    if environment not in ENVIRONMENTS:
        raise InvalidInput(
            f"Unknown environment; use one of: {', '.join(ENVIRONMENTS)}.",
            code="invalid_environment",
        )
    lookup = _random_base62(LOOKUP_LEN)
    token = f"rt_{environment}_{lookup}{_random_base62(SECRET_LEN)}"
    return IssuedToken(
        token=token, environment=environment, lookup=lookup, token_hash=hash_token(token)
    )


def parse(token: str) -> ParsedToken:
    """Check the format of a presented API key and return its environment, lookup and hash.

    Raises :class:`~keystore.errors.InvalidToken` on anything malformed: not a str, longer than
    :data:`MAX_TOKEN_CHARS`, wrong prefix, wrong length, characters outside base62, surrounding
    whitespace. The message never contains the token. Whether the key exists is not checked
    here: look the lookup up and :func:`verify` the hash.
    """
    if not isinstance(token, str):
        raise InvalidToken("The API key must be a string. " + _FORMAT_HINT)
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("The API key is far too long. " + _FORMAT_HINT)
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        if not token.startswith(("rt_live_", "rt_test_")):
            raise InvalidToken("This is not a runtools API key. " + _FORMAT_HINT)
        raise InvalidToken("The API key is malformed or incomplete. " + _FORMAT_HINT)
    return ParsedToken(
        environment=match.group(1), lookup=match.group(2), token_hash=hash_token(token)
    )


def hash_token(token: str) -> bytes:
    """Return sha256(token) (32 bytes), the form in which API keys are stored.

    A plain, unkeyed hash is enough, and a slow password hash is unnecessary: the secret part of
    every key is 32 random base62 characters (~190 bits of entropy), so the hash can neither be
    brute-forced nor looked up in precomputed tables, and a pepper would add nothing.
    """
    return hashlib.sha256(token.encode("utf-8")).digest()


def verify(token_hash: bytes, stored_hash: bytes) -> bool:
    """Compare a presented key's hash with the stored one in constant time."""
    return hmac.compare_digest(token_hash, stored_hash)


def validate_scopes(scopes: object) -> tuple[str, ...]:
    """Check a requested list of scopes; return them deduplicated and sorted.

    Raises :class:`~keystore.errors.InvalidInput` with ``code='invalid_scope'`` unless
    ``scopes`` is a non-empty list (or tuple) of strings from :data:`SCOPES`.
    """
    valid = ", ".join(sorted(SCOPES))
    if not isinstance(scopes, list | tuple):
        raise InvalidInput(
            f'Scopes must be a list of strings, e.g. ["ssh-key:read"]. Valid scopes: {valid}.',
            code="invalid_scope",
        )
    if not scopes:
        raise InvalidInput(
            f"At least one scope is required. Valid scopes: {valid}.", code="invalid_scope"
        )
    for scope in scopes:
        if not isinstance(scope, str):
            raise InvalidInput(
                f"Every scope must be a string. Valid scopes: {valid}.", code="invalid_scope"
            )
        if scope not in SCOPES:
            raise InvalidInput(
                f"Unknown scope {scope[:64]!r}. Valid scopes: {valid}.", code="invalid_scope"
            )
    return tuple(sorted(set(scopes)))


def scope_allows(granted: Iterable[str], required: str) -> bool:
    """True if the ``granted`` scopes allow the concrete scope ``required`` (e.g. 'ssh-key:read').

    '*' allows everything; 'X:*' allows 'X:read' and 'X:write'; otherwise the scope must be
    granted exactly. Unknown granted scopes allow nothing. A ``required`` that is not a concrete
    scope is a programming error (ValueError), as is passing a single string as ``granted``.
    """
    if required not in _CONCRETE_SCOPES:
        raise ValueError(f"required must be a concrete scope, not {required!r}")
    if isinstance(granted, str | bytes):
        raise TypeError("granted must be a collection of scopes, not a single string")
    resource = required.split(":", 1)[0]
    for scope in granted:
        if scope not in SCOPES:
            continue
        if scope in ("*", required, f"{resource}:*"):
            return True
    return False


def parse_duration(text: object) -> datetime.timedelta:
    """Parse a duration such as '90d', '12h', '30m', '45s' or '2w'.

    A positive integer and one unit (s, m, h, d, w), at most 3650 days; surrounding whitespace
    is ignored. Raises :class:`~keystore.errors.InvalidInput` with ``code='invalid_duration'``.
    """
    hint = (
        "Durations are a whole number and one unit: s, m, h, d or w (e.g. 90d, 12h, 30m, "
        f"45s, 2w), at most {MAX_DURATION.days} days."
    )
    if not isinstance(text, str):
        raise InvalidInput("The duration must be a string. " + hint, code="invalid_duration")
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise InvalidInput(f"Invalid duration {text[:32]!r}. " + hint, code="invalid_duration")
    amount = int(match.group(1))
    if amount <= 0:
        raise InvalidInput("The duration must be positive. " + hint, code="invalid_duration")
    seconds = amount * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise InvalidInput(
            f"The duration {text.strip()!r} is too long. " + hint, code="invalid_duration"
        )
    return datetime.timedelta(seconds=seconds)
