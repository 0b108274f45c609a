"""What every connection shares: config, the database pool, keys, the audit writer, counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncssh

from gateway.audit.writer import AuditWriter
from gateway.config import Config
from gateway.upstream.pool import UpstreamPool
from keystore.db import Executor

if TYPE_CHECKING:
    from gateway.ssh.server import GatewayConnection


@dataclass(slots=True)
class Runtime:
    config: Config
    db: Executor
    upstream_key: asyncssh.SSHKey
    audit: AuditWriter
    connections: set[GatewayConnection] = field(default_factory=set)
    unauthenticated: int = 0
    draining: bool = False
    # Warm shared upstream connections (gateway/upstream/pool.py); None only in unit tests.
    upstream_pool: UpstreamPool | None = None
