"""WorkOS webhooks, the pure part: the signature, and what an event says (no I/O).

WorkOS signs each delivery with the endpoint's secret:
``WorkOS-Signature: t=<milliseconds since the epoch>, v1=<hex HMAC-SHA256 of "<t>.<raw body>">``.
:func:`verify_signature` accepts it when a ``v1`` matches (compared in constant time) and ``t``
is within :data:`TOLERANCE_SECONDS` of now, so a captured delivery cannot be replayed later;
the event id, recorded once (keystore/workos_events.py), stops a replay within the tolerance.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HANDLED_EVENTS",
    "MEMBERSHIP_DELETED",
    "ORGANIZATION_DELETED",
    "SIGNATURE_HEADER",
    "TOLERANCE_SECONDS",
    "InvalidEvent",
    "InvalidSignature",
    "WebhookEvent",
    "parse_event",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "WorkOS-Signature"
TOLERANCE_SECONDS = 180.0
MEMBERSHIP_DELETED = "organization_membership.deleted"
ORGANIZATION_DELETED = "organization.deleted"
HANDLED_EVENTS = (MEMBERSHIP_DELETED, ORGANIZATION_DELETED)
_MAX_HEADER_CHARS = 1024
_MAX_ID_CHARS = 200


class InvalidSignature(Exception):
    """The delivery is not signed with the secret, or not now. ``code``: ``missing_signature``,
    ``malformed_signature``, ``stale_signature`` or ``invalid_signature``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class InvalidEvent(Exception):
    """A signed body that is not a WorkOS event."""


def _digest(secret: str, timestamp: str, body: bytes) -> str:
    message = timestamp.encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp_ms: int | None = None) -> str:
    """The ``WorkOS-Signature`` value WorkOS would send for ``body`` (for tests and tools)."""
    t = str(int(time.time() * 1000) if timestamp_ms is None else timestamp_ms)
    return f"t={t}, v1={_digest(secret, t, body)}"


def verify_signature(
    header: str | None,
    body: bytes,
    secret: str,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE_SECONDS,
) -> None:
    """Raise :class:`InvalidSignature` unless ``header`` signs ``body`` with ``secret`` within
    ``tolerance`` seconds of ``now`` (either way: a clock ahead is as suspicious as one behind).
    """
    if not secret:
        raise ValueError("no webhook secret")
    if header is None or not header.strip():
        raise InvalidSignature("missing_signature", f"The {SIGNATURE_HEADER} header is missing.")
    malformed = InvalidSignature(
        "malformed_signature", f"The {SIGNATURE_HEADER} header is not 't=<ms>, v1=<hex>'."
    )
    if len(header) > _MAX_HEADER_CHARS:
        raise malformed
    timestamp: str | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise malformed
        if name == "t":
            timestamp = value
        elif name == "v1":
            signatures.append(value)
    if (
        timestamp is None
        or not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 16)
        or not signatures
    ):
        raise malformed
    now = time.time() if now is None else now
    if abs(now - int(timestamp) / 1000.0) > tolerance:
        raise InvalidSignature(
            "stale_signature", "The signature's timestamp is too far from now (replayed?)."
        )
    expected = _digest(secret, timestamp, body)
    # Every candidate is compared (no early exit on the first miss), in constant time each.
    matched = False
    for candidate in signatures:
        if hmac.compare_digest(expected.encode("ascii"), candidate.encode("utf-8", "replace")):
            matched = True
    if not matched:
        raise InvalidSignature("invalid_signature", "The signature does not match.")


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One delivery: ``id`` (event id), ``event`` (its type), ``data`` and the whole payload."""

    id: str
    event: str
    data: dict[str, Any]
    payload: dict[str, Any]

    def text(self, name: str) -> str | None:
        """``data[name]`` when it is a short printable string, else None."""
        value = self.data.get(name)
        if isinstance(value, str) and 0 < len(value) <= _MAX_ID_CHARS and value.isprintable():
            return value
        return None


def _short_text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID_CHARS and value.isprintable()


def parse_event(payload: Any) -> WebhookEvent:
    """A decoded JSON body as a :class:`WebhookEvent`; :class:`InvalidEvent` when it has no
    string ``id`` and ``event``, or a ``data`` that is not an object."""
    if isinstance(payload, bytes | str):
        try:
            payload = json.loads(payload)
        except ValueError as exc:
            raise InvalidEvent("the body is not JSON") from exc
    if not isinstance(payload, dict):
        raise InvalidEvent("the body is not a JSON object")
    event_id, kind, data = payload.get("id"), payload.get("event"), payload.get("data", {})
    if not _short_text(event_id):
        raise InvalidEvent("the event has no valid 'id'")
    if not _short_text(kind):
        raise InvalidEvent("the event has no valid 'event' type")
    if not isinstance(data, dict):
        raise InvalidEvent("the event's 'data' is not an object")
    return WebhookEvent(id=str(event_id), event=str(kind), data=data, payload=payload)
