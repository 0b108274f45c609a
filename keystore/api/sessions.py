"""WorkOS AuthKit session tokens: how the dashboard and the ``runtools`` CLI call the API as a
member of an organization.

A bearer token that is not an API key (``rt_live_``/``rt_test_``) is verified as an AuthKit
access token, with PyJWT (keystore/api/README.md says why that library):

* the signature, against the key of the token's ``kid`` in the JWKS at ``workos.jwks_url``,
  fetched with aiohttp (never blocking the event loop), cached for :data:`JWKS_MAX_AGE` and
  fetched again for an unknown ``kid`` at most every :data:`REFETCH_MIN_SECONDS`;
* asymmetric algorithms only (:data:`ALGORITHMS`), and the one the key is for: ``none``, HMAC
  and a header that names another algorithm than the key's are refused; symmetric keys in the
  JWKS are ignored;
* ``iss`` equal to ``workos.issuer``; ``exp``, ``iat`` and ``sub`` present; ``exp``, ``nbf``
  and ``iat`` checked with a leeway of :data:`LEEWAY_SECONDS`;
* ``org_id`` names the organization (``organizations.workos_org_id``), ``sub`` the member.

Every failure is a :class:`SessionError` (401, or 503 while no JWKS could be fetched yet).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import structlog
from prometheus_client import Counter

from keystore import roles

log = structlog.get_logger("keystore.api")

ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
LEEWAY_SECONDS = 30.0
REFETCH_MIN_SECONDS = 5.0
JWKS_MAX_AGE = 600.0
JWKS_MAX_BYTES = 256 * 1024
JWKS_FETCH_TIMEOUT = 5.0
MAX_TOKEN_CHARS = 8192
_MAX_ID_CHARS = 200

SESSION_CHECK_RESULTS = (
    "ok",
    "invalid",
    "expired",
    "unknown_organization",
    "organization_disabled",
    "member_removed",
    "unavailable",
)
SESSION_CHECKS = Counter(
    "rtgw_api_session_checks",
    "WorkOS session tokens presented to the key API, by result",
    ["result"],
)
JWKS_FETCHES = Counter("rtgw_api_jwks_fetches", "Fetches of the WorkOS JWKS, by result", ["result"])
for _result in SESSION_CHECK_RESULTS:
    SESSION_CHECKS.labels(_result)
for _result in ("ok", "failed"):
    JWKS_FETCHES.labels(_result)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def check_url(url: str, what: str) -> None:
    """https://..., or http:// to a loopback address (tests, a local proxy); ``ValueError``."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ValueError(f"{what} must be an https:// URL (http:// only to a loopback address)")


@dataclass(frozen=True, slots=True)
class WorkosSettings:
    """The ``[workos]`` settings. Sessions need both ``jwks_url`` and ``issuer``; webhooks
    need ``webhook_secret``; with none of them only API keys are accepted."""

    jwks_url: str = ""
    issuer: str = ""
    webhook_secret: str = ""
    roles: tuple[str, ...] = roles.DEFAULT_ROLES
    role_table: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.jwks_url) != bool(self.issuer):
            raise ValueError("workos.jwks_url and workos.issuer must be set together")
        if self.jwks_url:
            check_url(self.jwks_url, "workos.jwks_url")
        object.__setattr__(self, "role_table", roles.parse_roles(self.roles))

    @property
    def sessions_enabled(self) -> bool:
        return bool(self.jwks_url)

    @property
    def webhooks_enabled(self) -> bool:
        return bool(self.webhook_secret)


class SessionError(Exception):
    """A session token that cannot be used: ``status`` 401 (or 503), a stable ``code``, and a
    message for a person that never quotes the token. ``result`` is the metric label."""

    def __init__(self, code: str, message: str, *, status: int = 401, result: str = "invalid"):
        super().__init__(message)
        self.code = code
        self.status = status
        self.result = result


class JwksUnavailable(Exception):
    """No JWKS could be fetched yet."""


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What a verified token says."""

    user_id: str
    workos_org_id: str | None
    claims: Mapping[str, Any]
    issued_at: dt.datetime | None
    expires_at: dt.datetime


FetchJson = Callable[[str], Awaitable[Any]]


async def _fetch_json(session: aiohttp.ClientSession, url: str) -> Any:
    timeout = aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT)
    async with session.get(url, timeout=timeout, allow_redirects=False) as reply:
        if reply.status != 200:
            raise JwksUnavailable(f"JWKS answered HTTP {reply.status}")
        raw = await reply.content.read(JWKS_MAX_BYTES + 1)
    if len(raw) > JWKS_MAX_BYTES:
        raise JwksUnavailable("JWKS is too large")
    return json.loads(raw)


def usable_keys(document: Any) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document by ``kid``: asymmetric keys for an algorithm of
    :data:`ALGORITHMS` with a ``kid``; anything else (``oct`` keys, encryption keys, keys
    PyJWT cannot load) is left out."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksUnavailable("JWKS document has no 'keys' list")
    found: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"][:100]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= _MAX_ID_CHARS:
            continue
        if entry.get("kty") not in ("RSA", "EC", "OKP") or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
        if key.algorithm_name in ALGORITHMS:
            found[kid] = key
    return found


class JwksCache:
    """The JWKS, fetched on demand: at first use, when older than ``max_age``, and for a
    ``kid`` it does not know, but never more than once per ``refetch_min`` seconds.
    Concurrent callers share one fetch. A failed fetch keeps the keys it had."""

    def __init__(
        self,
        url: str,
        *,
        fetch: FetchJson | None = None,
        refetch_min: float = REFETCH_MIN_SECONDS,
        max_age: float = JWKS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.refetch_min = refetch_min
        self.max_age = max_age
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at: float | None = None
        self._tried_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            self._inflight = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, url: str) -> Any:
        if self._fetch is not None:
            return await self._fetch(url)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return await _fetch_json(self._session, url)

    def _may_fetch(self, now: float) -> bool:
        return self._tried_at is None or now - self._tried_at >= self.refetch_min

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key ``kid`` (None: the JWKS has no such key). ``JwksUnavailable`` when no JWKS
        was ever fetched and this fetch failed too."""
        now = self._clock()
        fresh = self._loaded_at is not None and now - self._loaded_at < self.max_age
        if kid in self._keys and fresh:
            return self._keys[kid]
        if self._inflight is None and self._may_fetch(now):
            self._inflight = asyncio.get_running_loop().create_task(self._refresh())
        if self._inflight is not None:
            # Wait for the fetch in flight (ours or another caller's); a caller that gives up
            # (cancelled) does not cancel it for the others.
            inflight = self._inflight
            await asyncio.shield(inflight)
            if self._inflight is inflight:
                self._inflight = None
        if self._loaded_at is None:
            raise JwksUnavailable("the WorkOS signing keys could not be fetched")
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        """One fetch; never raises (a failure keeps the keys we had, and is logged)."""
        self._tried_at = self._clock()
        self.fetches += 1
        try:
            keys = usable_keys(await self._get(self.url))
        except (JwksUnavailable, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            JWKS_FETCHES.labels("failed").inc()
            log.warning("workos_jwks_fetch_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            return
        JWKS_FETCHES.labels("ok").inc()
        self._keys = keys
        self._loaded_at = self._clock()
        log.info("workos_jwks_fetched", keys=len(keys))


def _invalid(message: str) -> SessionError:
    return SessionError("invalid_session_token", message)


def _epoch(value: Any) -> dt.datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    return None


def _printable_id(value: Any, limit: int = _MAX_ID_CHARS) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= limit
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


class SessionVerifier:
    """Verifies session tokens against the settings' issuer and JWKS."""

    def __init__(self, settings: WorkosSettings, jwks: JwksCache | None = None) -> None:
        self.settings = settings
        self.jwks = jwks or JwksCache(settings.jwks_url)

    async def close(self) -> None:
        await self.jwks.close()

    async def verify(self, token: str) -> SessionClaims:
        if len(token) > MAX_TOKEN_CHARS:
            raise _invalid("The session token is far too long.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid(
                "The bearer token is neither an API key (rt_live_...) nor a session token."
            ) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise _invalid("The session token's algorithm is not accepted.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= _MAX_ID_CHARS:
            raise _invalid("The session token names no signing key.")
        try:
            key = await self.jwks.key(kid)
        except JwksUnavailable:
            raise SessionError(
                "unavailable",
                "Session tokens cannot be checked right now; retry shortly.",
                status=503,
                result="unavailable",
            ) from None
        if key is None:
            raise _invalid("The session token is signed with an unknown key.")
        if key.algorithm_name != alg:
            raise _invalid("The session token's algorithm does not match its key.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                issuer=self.settings.issuer,
                leeway=LEEWAY_SECONDS,
                options={
                    "require": ["exp", "iat", "iss", "sub"],
                    "verify_aud": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise SessionError(
                "session_expired",
                "The session token has expired; sign in again (runtools login).",
                result="expired",
            ) from None
        except jwt.ImmatureSignatureError:
            raise _invalid("The session token is not valid yet.") from None
        except jwt.InvalidIssuerError:
            raise _invalid("The session token was issued by someone else.") from None
        except jwt.InvalidTokenError:
            raise _invalid("The session token is not valid.") from None
        sub = claims.get("sub")
        if not _printable_id(sub):
            raise _invalid("The session token names no valid user.")
        org_id = claims.get("org_id")
        if org_id is not None and not _printable_id(org_id, 128):
            raise _invalid("The session token names no valid organization.")
        expires_at = _epoch(claims.get("exp"))
        assert expires_at is not None  # required and checked by PyJWT
        return SessionClaims(
            user_id=str(sub),
            workos_org_id=org_id,
            claims=claims,
            issued_at=_epoch(claims.get("iat")),
            expires_at=expires_at,
        )
