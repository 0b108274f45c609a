"""Lifecycle of the daemon: open the database, bind the SSH listener, serve, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import asyncssh
import structlog

from gateway import algorithms, hostkeys, messages
from gateway.audit import AuditWriter
from gateway.config import Config, parse_listen
from gateway.runtime import Runtime
from gateway.ssh_server import GatewayConnection
from keystore import db as keystore_db
from keystore.errors import Unavailable

log = structlog.get_logger("gateway.server")


async def open_database(config: Config, wait_seconds: float = 30.0) -> keystore_db.Executor:
    """Open the pool, retrying for ``wait_seconds`` (the database may start after us)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return await keystore_db.create_pool(
                config.database.url,
                min_size=config.database.pool_min_size,
                max_size=config.database.pool_max_size,
                connect_timeout_seconds=config.database.connect_timeout_seconds,
                command_timeout_seconds=config.database.command_timeout_seconds,
            )
        except Unavailable as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("database_not_ready", error=str(exc))
            await asyncio.sleep(1.0)


def listen_options(config: Config, host_keys: list[asyncssh.SSHKey]) -> dict[str, object]:
    return {
        "server_host_keys": hostkeys.as_host_keypairs(host_keys),
        "send_server_host_keys": True,
        "login_timeout": config.ssh.login_timeout_seconds,
        "keepalive_interval": config.ssh.keepalive_interval_seconds,
        "keepalive_count_max": config.ssh.keepalive_count_max,
        "password_auth": False,
        "kbdint_auth": False,
        "public_key_auth": True,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "allow_pty": True,
        "line_editor": False,
        "encoding": None,
        "reuse_address": True,
        "config": None,
        **algorithms.common_options(),
    }


class Gateway:
    """Owns the listener and the shared runtime; ``run()`` serves until SIGTERM/SIGINT."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime: Runtime | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._stop = asyncio.Event()
        self.ssh_port: int | None = None

    async def start(self) -> None:
        config = self.config
        host_keys = hostkeys.load_host_keys(config.state.dir)
        upstream_key = hostkeys.load_upstream_key(config.state.dir)
        pool = await open_database(config)
        audit = AuditWriter(pool)
        audit.start()
        self.runtime = Runtime(config=config, db=pool, upstream_key=upstream_key, audit=audit)
        host, port = parse_listen(config.ssh.listen, "ssh.listen")
        rt = self.runtime
        self._acceptor = await asyncssh.listen(
            host,
            port,
            server_factory=lambda: GatewayConnection(rt),
            **listen_options(config, host_keys),  # type: ignore[arg-type]
        )
        self.ssh_port = self._acceptor.get_port()
        log.info(
            "listening",
            ssh=f"{host}:{self.ssh_port}",
            host_keys=[k.get_fingerprint("sha256") for k in host_keys],
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self, drain_seconds: float = 10.0) -> None:
        """Stop accepting, tell users, let sessions finish until the deadline, then close."""
        rt = self.runtime
        if self._acceptor is not None:
            self._acceptor.close()
            with contextlib.suppress(Exception):
                await self._acceptor.wait_closed()
        if rt is None:
            return
        rt.draining = True
        log.info("draining", connections=len(rt.connections), deadline_seconds=drain_seconds)
        deadline = time.monotonic() + drain_seconds
        while rt.connections and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a set
            await asyncio.sleep(0.1)
        text = messages.GATEWAY_DRAINING.render(seconds=0)
        for conn in list(rt.connections):
            conn.close_sessions(text, messages.GATEWAY_DRAINING.code)
        await asyncio.sleep(0.1)
        await rt.audit.close()
        await rt.db.close()
        log.info("stopped")
