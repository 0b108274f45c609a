"""What every connection of this process shares, built once by the daemon and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncssh

from gateway.audit.writer import AuditWriter
from gateway.config import Config
from gateway.ssh.access import AccessSource, DatabaseAccess
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
    draining: bool = False
    # Warm shared upstream connections (gateway/upstream/pool.py); None only in unit tests.
    upstream_pool: UpstreamPool | None = None
    # Live revocation (gateway/ssh/revocation.py); None only in unit tests.
    revocation: Revocation | None = None

    def access_source(self) -> AccessSource:
        if self.access is None:
            self.access = DatabaseAccess(self.db)
        return self.access
