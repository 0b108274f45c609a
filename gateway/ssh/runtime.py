"""What every connection of this process shares, built once by the daemon and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncssh

from gateway.audit.ratelimit import SourceRateLimit
from gateway.audit.writer import AuditWriter
from gateway.config import AdmissionConfig, Config
from gateway.relay import budget
from gateway.ssh.access import AccessSource, CachedAccess, DatabaseAccess
from gateway.ssh.admission import Admission, AdmissionSettings
from gateway.ssh.registry import Registry
from gateway.ssh.revocation import Revocation
from gateway.upstream.pool import UpstreamPool
from keystore.db import Executor


@dataclass(slots=True)
class Runtime:
    config: Config  # replaced as a whole on reload; read it at use, never cache it
    db: Executor
    upstream_key: asyncssh.SSHKey
    audit: AuditWriter
    access: AccessSource | None = None  # None: the database (DatabaseAccess(db))
    registry: Registry = field(default_factory=Registry)
    admission: Admission = field(default_factory=Admission)
    audit_limit: SourceRateLimit = field(default_factory=lambda: SourceRateLimit(30))
    # Log lines for dropped connections: a few per source and reason a minute, not thousands.
    drop_log_limit: SourceRateLimit = field(default_factory=lambda: SourceRateLimit(6))
    draining: bool = False
    # Warm shared upstream connections (gateway/upstream/pool.py); None only in unit tests.
    upstream_pool: UpstreamPool | None = None
    # Live revocation (gateway/ssh/revocation.py); None only in unit tests.
    revocation: Revocation | None = None

    def access_source(self) -> AccessSource:
        if self.access is None:
            self.access = DatabaseAccess(self.db)
        return self.access


def admission_settings(config: Config) -> AdmissionSettings:
    """The [admission] settings (plus ssh.max_unauthenticated as the full mark) for the module."""
    a: AdmissionConfig = config.admission
    return AdmissionSettings(
        ipv4_prefix=a.ipv4_prefix,
        ipv6_prefix=a.ipv6_prefix,
        max_unauthenticated_per_source=a.max_unauthenticated_per_source,
        startups_start=min(a.startups_start, config.ssh.max_unauthenticated),
        startups_rate=a.startups_rate,
        startups_full=config.ssh.max_unauthenticated,
        kex_grace_seconds=a.kex_grace_seconds,
        penalty_authfail_seconds=a.penalty_authfail_seconds,
        penalty_noauth_seconds=a.penalty_noauth_seconds,
        penalty_grace_exceeded_seconds=a.penalty_grace_exceeded_seconds,
        penalty_min_seconds=a.penalty_min_seconds,
        penalty_max_seconds=a.penalty_max_seconds,
        penalty_exempt_cidrs=a.penalty_exempt_cidrs,
    )


def configure(rt: Runtime) -> None:
    """Apply the current config to the runtime's policies (at start and on every reload)."""
    rt.admission.reconfigure(admission_settings(rt.config))
    rt.audit_limit.per_minute = rt.config.admission.audit_refusals_per_minute
    budget.BUFFERS.reconfigure(rt.config.ssh.max_buffered_bytes)
    if isinstance(rt.access, CachedAccess):
        rt.access.ttl_seconds = rt.config.revocation.access_cache_seconds
