"""Quotas after authentication: what one client connection, key or organization may hold.

Pure decisions on counts (no I/O, no clock); the callers count, refuse, render the message
(gateway/messages.py) and count the refusal (``rtgw_quota_refusals{reason}``):

* ``check_connection`` - client connections per key and per organization
  (``quotas.max_connections_per_key`` / ``max_connections_per_org``), counted in the registry
  of live connections. The SSH door asks it once the signature verified (``auth_completed``)
  and disconnects with the refusal's text.
* ``check_channel`` - one client connection's channels (gateway/ssh/channels.py): sessions
  (``ssh.max_sessions_per_connection``), forwarding channels
  (``quotas.max_forwards_per_connection``) and, since each of them takes a slot on the shared
  upstream connections of the sandbox, at most ``upstream_share`` of that sandbox's capacity
  (``quotas.upstream_share_percent``), so that one connection never takes a sandbox from the
  other members of its organization.

Counts are per process: with ``process.workers > 1`` each worker applies the limits to its own
connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway import messages
from gateway.config import QuotasConfig
from gateway.ssh.registry import Identity, Registry

ChannelKind = Literal["session", "forward"]


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    """A quota reached: ``code`` for logs and metrics, ``limit`` for the message."""

    code: str
    limit: int
    count: int  # how many the connection, key or organization already holds
    text: str = ""  # the user's text, when the decision can render it (connection quotas)


def check_connection(
    registry: Registry, identity: Identity, quotas: QuotasConfig, conn: object | None = None
) -> QuotaRefusal | None:
    """Whether one more client connection of ``identity`` may stay.

    Counts the registry's authenticated connections of the same key and organization, not
    counting ``conn`` (the connection being decided, whether it is indexed yet or not).
    """
    per_key = registry.by_key(identity.key_id)
    per_org = registry.by_org(identity.org_id)
    return connection_refusal(
        per_key=len(per_key) - int(conn in per_key),
        per_org=len(per_org) - int(conn in per_org),
        quotas=quotas,
    )


def connection_refusal(*, per_key: int, per_org: int, quotas: QuotasConfig) -> QuotaRefusal | None:
    """The decision of ``check_connection`` on bare counts of the *other* connections."""
    if per_key >= quotas.max_connections_per_key:
        limit = quotas.max_connections_per_key
        reason = messages.TOO_MANY_CONNECTIONS_PER_KEY
        return QuotaRefusal(reason.code, limit, per_key, reason.render(limit=limit))
    if per_org >= quotas.max_connections_per_org:
        limit = quotas.max_connections_per_org
        reason = messages.TOO_MANY_CONNECTIONS_PER_ORG
        return QuotaRefusal(reason.code, limit, per_org, reason.render(limit=limit))
    return None


def upstream_share(capacity: int, percent: int) -> int:
    """Upstream slots one client connection may hold of a sandbox's ``capacity`` (>= 1)."""
    return max(1, capacity * percent // 100)


def check_channel(
    kind: ChannelKind,
    *,
    sessions: int,
    forwards: int,
    max_sessions: int,
    max_forwards: int,
    share: int,
) -> QuotaRefusal | None:
    """Whether a client connection holding ``sessions`` sessions and ``forwards`` forwarding
    channels (open or being opened) may open one more of ``kind``; ``share`` is its
    ``upstream_share``. Each channel holds one upstream slot."""
    if kind == "session" and sessions >= max_sessions:
        return QuotaRefusal(messages.TOO_MANY_SESSIONS.code, max_sessions, sessions)
    if kind == "forward" and forwards >= max_forwards:
        return QuotaRefusal(messages.TOO_MANY_FORWARDS.code, max_forwards, forwards)
    if sessions + forwards >= share:
        return QuotaRefusal(messages.UPSTREAM_SHARE_EXCEEDED.code, share, sessions + forwards)
    return None
