"""Prometheus metrics (prometheus_client), all prefixed ``rtgw_``.

With several worker processes the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before starting
them, so every worker writes its samples there and ``render()`` (served by worker 0) sums them:
one scrape shows the whole gateway. Gauges use ``livesum`` so a dead worker's values vanish.

Counters are incremented where things happen (gateway/ssh/server.py, gateway/ssh/proxy_protocol.py
outcomes, gateway/daemon/lifecycle.py); bytes are counted when a session ends.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

CONNECTIONS = Counter("rtgw_connections", "SSH connections accepted or dropped at once", ["result"])
CONNECTIONS_OPEN = Gauge(
    "rtgw_connections_open", "SSH connections open now", ["state"], multiprocess_mode="livesum"
)
PROXY_HEADERS = Counter(
    "rtgw_proxy_protocol", "PROXY protocol outcomes on the SSH listener", ["result"]
)
AUTH = Counter("rtgw_auth", "Public-key auth decisions by result and reason", ["result", "reason"])
AUTH_DECISION = Histogram(
    "rtgw_auth_decision_seconds",
    "Time to load what decides a login (sandbox + org keys), per connection",
    buckets=_LATENCY_BUCKETS,
)
ACCESS_CACHE = Counter(
    "rtgw_access_cache_lookups_total",
    "Login lookups of a sandbox's access data: answered from memory (hit), from the database "
    "(miss), or from the database because the cache is off or the listener is down (bypass)",
    ["result"],
)
CHANNEL_CHECKS = Counter(
    "rtgw_channel_checks_total",
    "Access checks of new channels on live connections: the connection's recent valid verdict "
    "reused (reused) or the database asked (queried)",
    ["result"],
)
UPSTREAM_CONNECT = Histogram(
    "rtgw_upstream_connect_seconds",
    "Time to an authenticated connection to the sandbox's sshd",
    ["result"],
    buckets=_LATENCY_BUCKETS,
)
SESSIONS = Counter(
    "rtgw_sessions", "Session channels ended, by kind and result", ["kind", "result"]
)
CHANNELS_ACTIVE = Gauge(
    "rtgw_channels_active",
    "Open channels by type (session, direct-tcpip)",
    ["type"],
    multiprocess_mode="livesum",
)
BYTES = Counter(
    "rtgw_relayed_bytes",
    "Session bytes relayed (up = client to sandbox), counted at session end",
    ["direction"],
)
DB_POOL = Gauge(
    "rtgw_db_pool_connections",
    "Database pool connections by state (open, idle, max)",
    ["state"],
    multiprocess_mode="livesum",
)
DRAINING = Gauge(
    "rtgw_draining", "1 while the gateway drains for a stop", multiprocess_mode="livemax"
)
RELOADS = Counter("rtgw_reloads", "Configuration reloads (SIGHUP)", ["result"])
AUDIT_QUEUED = Gauge(
    "rtgw_audit_queued", "Audit events waiting to be written", multiprocess_mode="livesum"
)
ASYNCIO_TASKS = Gauge(
    "rtgw_asyncio_tasks", "asyncio tasks alive in the process", multiprocess_mode="livesum"
)
PENALTIES = Counter(
    "rtgw_source_penalties", "Penalties given to sources for failed connections", ["kind"]
)
AUDIT_SUPPRESSED = Counter(
    "rtgw_audit_suppressed", "Refused-connection audit rows not written (per-source rate limit)"
)
REVOCATION_LISTENER = Gauge(
    "rtgw_revocation_listener_up",
    "1 while this process listens for access changes (LISTEN rtgw_access)",
    multiprocess_mode="livemin",
)
RECONCILES = Counter("rtgw_revocation_reconciles", "Full re-checks of live connections", ["result"])
REVOKED_CONNECTIONS = Counter(
    "rtgw_revoked_connections", "Live connections ended because access shrank", ["reason"]
)
REVOCATION_LAG = Histogram(
    "rtgw_revocation_lag_seconds",
    "From the change's commit to the affected connection being ended",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)

RELAY_BUFFER_RESERVED = Gauge(
    "rtgw_relay_buffer_reserved_bytes",
    "Bytes reserved by open relayed channels (gateway/relay/budget.py)",
    multiprocess_mode="livesum",
)
RELAY_BUFFER_BUDGET = Gauge(
    "rtgw_relay_buffer_budget_bytes",
    "ssh.max_buffered_bytes: the most relayed channels may reserve",
    multiprocess_mode="livesum",
)
RELAY_BUFFER_REFUSALS = Counter(
    "rtgw_relay_buffer_refusals",
    "Channels refused because the relay buffer budget was reached (buffer_budget_exhausted)",
    ["type"],
)
QUOTA_REFUSALS = Counter(
    "rtgw_quota_refusals",
    "Channels and connections refused after auth by a quota or the upstream capacity, by "
    "reason code (gateway/messages.py)",
    ["reason"],
)
UPSTREAM_POOL = Gauge(
    "rtgw_upstream_pool",
    "Shared upstream connections: connections, leases (channels on them), opening (connects "
    "in flight), waiting (channels waiting for a free slot), targets (sandboxes)",
    ["state"],
    multiprocess_mode="livesum",
)


_pool_last: dict[str, int] = {}


def upstream_pool_changed(stats: dict[str, int]) -> None:
    """The upstream pool's ``on_change`` hook (gateway/upstream/pool.py): called on every
    lease, so only the values that changed are written."""
    for state, value in stats.items():
        if _pool_last.get(state) != value:
            _pool_last[state] = value
            UPSTREAM_POOL.labels(state).set(value)


def _short(kind: str) -> str:
    """subsystem:sftp stays, anything else odd is folded so labels stay bounded."""
    if kind in ("shell", "exec", "subsystem:sftp"):
        return kind
    return "subsystem:other" if kind.startswith("subsystem:") else "other"


def session_ended(kind: str, result: str, bytes_up: int, bytes_down: int) -> None:
    SESSIONS.labels(_short(kind), result).inc()
    BYTES.labels("up").inc(bytes_up)
    BYTES.labels("down").inc(bytes_down)


def update_pool(pool: Any) -> None:
    """Sample an asyncpg pool (called periodically)."""
    try:
        DB_POOL.labels("open").set(pool.get_size())
        DB_POOL.labels("idle").set(pool.get_idle_size())
        DB_POOL.labels("max").set(pool.get_max_size())
    except AttributeError:  # a bare connection in tests
        return


def render() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))
    return bytes(generate_latest(REGISTRY))
