"""Lifecycle of the daemon: open the database, bind the SSH listener, serve, reload, drain, stop.

``runtools-gateway serve`` (gateway/cli.py) runs one ``Gateway`` in this process when
``process.workers`` is 1, else a ``Supervisor`` (gateway/daemon/supervisor.py) that starts one
``Gateway`` per worker process; the two never import each other. Signals (``Gateway.run``):

- SIGHUP: re-read the config file and the host keys; new connections use them, live sessions
  are untouched. Settings that need a restart (``restart needed`` in gateway/config.py) are
  reported in the log and keep their old value until then.
- SIGTERM / SIGINT: drain. Stop accepting; every live session gets one stderr line saying the
  gateway is restarting; sessions may finish until ``ssh.drain_timeout_seconds``; then the rest
  are closed (stderr line, exit 255), connections closed, the audit queue flushed; exit 0.

systemd (gateway/daemon/systemd.py): READY=1 once the database answered and the SSH listener
is bound, STATUS= along the way, RELOADING=1 around a reload, STOPPING=1 at drain, WATCHDOG=1 pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import asyncssh
import structlog

from gateway import messages
from gateway.audit.writer import AuditWriter
from gateway.config import Config, parse_listen, restart_required_changes
from gateway.daemon import health, metrics, systemd
from gateway.daemon.sockets import WORKER_INDEX_ENV, inherited_listen_socket
from gateway.errors import ConfigError
from gateway.ssh import algorithms, hostkeys
from gateway.ssh.access import CachedAccess
from gateway.ssh.proxy_protocol import Listener, ProxySettings
from gateway.ssh.revocation import Revocation
from gateway.ssh.runtime import Runtime
from gateway.ssh.runtime import configure as runtime_configure
from gateway.ssh.server import GatewayConnection, admission_gate
from gateway.upstream import certificates as upstream_certificates
from gateway.upstream import connect as upstream
from gateway.upstream.pool import PoolLimits, UpstreamPool
from keystore import db as keystore_db
from keystore.changes import AccessChange, ChangeListener
from keystore.errors import Unavailable

log = structlog.get_logger("gateway.daemon.lifecycle")


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


SERVER_VERSION = "OpenSSH_9.2p1 runtools-gateway"


def server_options(config: Config, host_keys: list[asyncssh.SSHKey]) -> dict[str, object]:
    """SSHServerConnectionOptions: given to listen() and again to update() on reload."""
    return {
        "server_host_keys": hostkeys.as_host_keypairs(host_keys),
        "send_server_host_keys": True,
        "login_timeout": config.ssh.login_timeout_seconds,
        "keepalive_interval": config.ssh.keepalive_interval_seconds,
        "keepalive_count_max": config.ssh.keepalive_count_max,
        "password_auth": False,
        # Offered only to show the registration hint after every key was refused
        # (GatewayConnection.kbdint_auth_supported); it never accepts anyone.
        "kbdint_auth": True,
        "public_key_auth": True,
        # Always on: a socket per connection that asks (-A); whether it is used, or refused
        # with a message, is decided per session by [forwarding] agent (gateway/ssh/channels.py).
        "agent_forwarding": True,
        "x11_forwarding": False,
        "allow_pty": True,
        "line_editor": False,
        "encoding": None,
        **algorithms.common_options(),
        "compression_algs": algorithms.server_compression_algs(),
        # Sent as "SSH-2.0-OpenSSH_9.2p1 runtools-gateway". Clients decide SFTP conventions by
        # the server's version string: asyncssh, libssh and WinSCP swap SSH_FXP_SYMLINK's
        # arguments only for "OpenSSH" (whose sftp-server has them reversed), and the SFTP
        # server behind the gateway is the sandbox's OpenSSH. Announcing asyncssh made their
        # symlinks point backwards.
        "server_version": SERVER_VERSION,
    }


def listen_options(config: Config, host_keys: list[asyncssh.SSHKey]) -> dict[str, object]:
    return {**server_options(config, host_keys), "reuse_address": True, "config": None}


def proxy_settings(config: Config) -> ProxySettings:
    return ProxySettings(
        mode=config.ssh.proxy_protocol,
        trusted=tuple(config.trusted_proxy_networks()),
        header_timeout_seconds=config.ssh.proxy_header_timeout_seconds,
    )


class Gateway:
    """Owns the listener and the shared runtime; ``run()`` serves until SIGTERM/SIGINT."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        *,
        notifier: systemd.Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or systemd.Notifier()
        self.runtime: Runtime | None = None
        self.worker_index: int | None = (
            int(os.environ[WORKER_INDEX_ENV]) if WORKER_INDEX_ENV in os.environ else None
        )
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._listener: Listener | None = None
        self._listening = False
        self._http: Any = None
        self._api: Any = None  # keystore.api.ApiServer
        self.api_port: int | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._changes: ChangeListener | None = None
        self._reload_lock = asyncio.Lock()
        self._last_status = ""
        self.ssh_port: int | None = None
        self.http_port: int | None = None

    # --- health probe (gateway.daemon.health.Probe) ---

    def listeners_up(self) -> bool:
        return self._listening

    def is_draining(self) -> bool:
        return self.runtime is None or self.runtime.draining

    async def database_ok(self) -> bool:
        if self.runtime is None:
            return False
        try:
            with keystore_db.unavailable_on_failure("readiness check"):
                return bool(await self.runtime.db.fetchval("SELECT 1") == 1)
        except Unavailable:
            return False

    # --- start ---

    async def start(self) -> None:
        config = self.config
        self.notifier.status("loading host keys")
        host_keys = hostkeys.load_host_keys(config.state.dir)
        upstream_key = hostkeys.load_upstream_key(config.state.dir)
        upstream_certificates.load(config.upstream)  # the CA key files (ConfigError if bad)
        self.notifier.status("waiting for the database")
        pool = await open_database(config)
        with keystore_db.unavailable_on_failure("first query"):
            await pool.fetchval("SELECT 1")
        audit = AuditWriter(pool)
        audit.start()
        self.runtime = Runtime(config=config, db=pool, upstream_key=upstream_key, audit=audit)
        rt_ = self.runtime
        started = config.upstream  # max_sessions_per_connection, pool_idle_seconds: restart
        rt_.upstream_pool = UpstreamPool(
            # Read config and key at call time, so a reload applies to new connections.
            lambda target: upstream.connect(
                target, client_key=rt_.upstream_key, config=rt_.config.upstream
            ),
            limits=lambda: PoolLimits(
                max_sessions=started.max_sessions_per_connection,
                idle_seconds=started.pool_idle_seconds,
                max_conns_per_target=rt_.config.upstream.max_connections_per_sandbox,
                max_total=rt_.config.upstream.max_connections_total,
                lease_timeout_seconds=rt_.config.upstream.lease_timeout_seconds,
            ),
            on_change=metrics.upstream_pool_changed,
        )
        rt = self.runtime
        runtime_configure(rt)
        await self._start_revocation(rt)

        sock = inherited_listen_socket()
        host, port = parse_listen(config.ssh.listen, "ssh.listen")
        self._listener = Listener(
            proxy_settings(config),
            sock=sock,
            reuse_port=self.worker_index is not None,
            on_outcome=lambda outcome: metrics.PROXY_HEADERS.labels(outcome).inc(),
            gate=admission_gate(rt),
        )
        self._acceptor = await asyncssh.listen(
            host,
            port,
            tunnel=self._listener,
            server_factory=lambda: GatewayConnection(rt),
            **listen_options(config, host_keys),  # type: ignore[arg-type]
        )
        self._listening = True
        self.ssh_port = self._acceptor.get_port()
        if self.worker_index in (None, 0):
            await self._start_http()
        self._tasks.append(asyncio.get_running_loop().create_task(self._housekeeping()))
        log.info(
            "listening",
            ssh=f"{host}:{self.ssh_port}",
            socket_activated=sock is not None,
            worker=self.worker_index,
            pid=os.getpid(),
            proxy_protocol=config.ssh.proxy_protocol,
            http=self.http_port,
            host_keys=[k.get_fingerprint("sha256") for k in host_keys],
        )
        self.notifier.ready(self._status_text())

    async def _start_http(self) -> None:
        """/healthz, /readyz, /metrics: on their own listener, or on the key API's."""
        config = self.config
        rt = self.runtime
        assert rt is not None
        routes = health.routes(self)
        if config.metrics.listen:
            host, port = parse_listen(config.metrics.listen, "metrics.listen")
            self._http = await health.HealthServer.start(self, host, port)
            self.http_port = self._http.port
            log.info("ops_listening", ops=f"{host}:{self.http_port}")
            routes = []  # the key API (below) is still served, without them
        if not config.api.enabled:
            if routes:
                log.warning("metrics_not_served", hint="set metrics.listen or enable the API")
            return
        from keystore.api import serve_api

        host, port = parse_listen(config.api.listen, "api.listen")
        self._api = await serve_api(
            rt.db,
            host=host,
            port=port,
            max_body_bytes=config.api.max_body_bytes,
            record_audit=rt.audit.record,
            extra_routes=routes,
            rate_per_second=config.api.key_rate_per_second,
            rate_burst=config.api.key_rate_burst,
            header_timeout_seconds=config.api.header_timeout_seconds,
            idle_timeout_seconds=config.api.idle_timeout_seconds,
            body_timeout_seconds=config.api.body_timeout_seconds,
            max_connections_per_source=config.api.max_connections_per_source,
            invalid_key_burst=config.api.invalid_key_burst,
            invalid_key_per_second=config.api.invalid_key_per_second,
            ipv4_prefix=config.admission.ipv4_prefix,
            ipv6_prefix=config.admission.ipv6_prefix,
            workos_jwks_url=config.workos.jwks_url,
            workos_issuer=config.workos.issuer,
            workos_webhook_secret=config.workos.webhook_secret,
            workos_roles=config.workos.roles,
        )
        self.api_port = self._api.port
        if routes:
            self.http_port = self.api_port

    async def _start_revocation(self, rt: Runtime) -> None:
        """Subscribe to access changes, then reconcile, before the SSH port opens."""
        revocation = Revocation(
            rt.registry,
            rt.db,
            mode=self.config.revocation.mode,
            register_key_hint=lambda: rt.config.ssh.register_key_hint,
            reuse_seconds=lambda: rt.config.revocation.access_cache_seconds,
        )

        # Logins answer from memory while the listener is up; every notification drops the
        # copies it concerns, and a (re)subscription drops them all (changes may have been
        # missed while it was away).
        cache = CachedAccess(
            rt.access_source(),
            ttl_seconds=rt.config.revocation.access_cache_seconds,
            listening=lambda: changes.state == "listening",
        )

        async def subscribed() -> None:
            cache.clear()
            await revocation.reconcile()

        def changed(change: AccessChange) -> None:
            cache.invalidate(change)
            revocation.on_change(change)

        self._changes = ChangeListener(self.config.database.url, changed, on_subscribed=subscribed)
        changes = self._changes
        revocation.listener_state = lambda: changes.state
        rt.revocation = revocation
        rt.access = cache
        await changes.start()
        if changes.state != "listening":
            log.error(
                "revocation_listener_down",
                mode=revocation.mode,
                consequence="new channels on live connections are refused until it is back"
                if revocation.mode == "strict"
                else "live sessions are checked per channel only until it is back",
            )
        interval = self.config.revocation.reconcile_interval_seconds
        self._tasks.append(
            asyncio.get_running_loop().create_task(revocation.reconcile_every(interval))
        )

    def revocation_status(self) -> dict[str, object]:
        rt = self.runtime
        if rt is None or rt.revocation is None:
            return {"mode": self.config.revocation.mode, "listener": "down", "healthy": False}
        rev = rt.revocation
        return {"mode": rev.mode, "listener": rev.listener_state(), "healthy": rev.healthy}

    async def _housekeeping(self) -> None:
        """Watchdog pings, pool metrics and a STATUS= line that says what is going on."""
        interval = self.notifier.watchdog_interval()
        period = min(interval, 5.0) if interval else 5.0
        while True:
            if interval:
                self.notifier.watchdog()
            rt = self.runtime
            if rt is not None:
                metrics.update_pool(rt.db)
                metrics.AUDIT_QUEUED.set(rt.audit.queued)
                metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
                if rt.revocation is not None:
                    metrics.REVOCATION_LISTENER.set(1 if rt.revocation.healthy else 0)
                status = self._status_text()
                if status != self._last_status and not rt.draining:
                    self._last_status = status
                    self.notifier.status(status)
            await asyncio.sleep(period)

    def _status_text(self) -> str:
        rt = self.runtime
        conns = len(rt.registry) if rt else 0
        sessions = rt.registry.session_count if rt else 0
        return f"serving SSH on port {self.ssh_port}: {conns} connections, {sessions} sessions"

    # --- run, reload, stop ---

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        start = loop.create_task(self.start())
        stop = loop.create_task(self._stop.wait())
        await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():  # stopped while still starting (e.g. waiting for the database)
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
        else:
            start.result()  # a failed start raises here
            await stop
        stop.cancel()
        await self.shutdown()

    async def reload(self) -> bool:
        """SIGHUP: new config and host keys for new connections; live sessions untouched."""
        async with self._reload_lock:
            self.notifier.reloading()
            log.info("reloading", config=self.config_path)
            try:
                new = Config.load(self.config_path)
                host_keys = hostkeys.load_host_keys(new.state.dir)
                upstream_certificates.load(new.upstream)
            except (ConfigError, OSError, asyncssh.KeyImportError, ValueError) as exc:
                metrics.RELOADS.labels("failed").inc()
                log.error("reload_failed", error=str(exc))
                self.notifier.ready(f"reload failed, still serving the old config: {exc}")
                return False
            ignored = restart_required_changes(self.config, new)
            if ignored:
                log.warning("reload_needs_restart", settings=ignored)
            self.config = new
            if self.runtime is not None:
                self.runtime.config = new
                runtime_configure(self.runtime)
            if self._acceptor is not None:
                self._acceptor.update(**server_options(new, host_keys))
            if self._listener is not None:
                self._listener.settings = proxy_settings(new)
            metrics.RELOADS.labels("ok").inc()
            log.info(
                "reloaded",
                host_keys=[k.get_fingerprint("sha256") for k in host_keys],
                proxy_protocol=new.ssh.proxy_protocol,
                restart_needed_for=ignored or None,
            )
            self.notifier.ready(self._status_text())
            return True

    async def shutdown(self, drain_seconds: float | None = None) -> None:
        """Stop accepting, tell users, let sessions finish until the deadline, then close."""
        rt = self.runtime
        drain = self.config.ssh.drain_timeout_seconds if drain_seconds is None else drain_seconds
        self.notifier.stopping(f"draining for at most {drain:g} s")
        self._listening = False
        if self._acceptor is not None:
            self._acceptor.close()
        if rt is None:
            await self._close_http()
            return
        rt.draining = True
        metrics.DRAINING.set(1)
        text = messages.GATEWAY_DRAINING.render(seconds=drain)
        idle = 0
        for conn in rt.registry:
            if conn.session_count:
                conn.notify_sessions(text)
            else:
                idle += 1
                conn.close()  # unauthenticated or no session: nothing to wait for
        sessions = rt.registry.session_count
        log.info(
            "draining",
            connections=len(rt.registry),
            sessions=sessions,
            idle_closed=idle,
            deadline_seconds=drain,
        )
        deadline = time.monotonic() + drain
        while len(rt.registry) and time.monotonic() < deadline:  # noqa: ASYNC110 - polling
            await asyncio.sleep(0.1)
        if len(rt.registry):
            left = len(rt.registry)
            final = messages.GATEWAY_DRAINING.render(seconds=0)
            for conn in rt.registry:
                conn.close_sessions(final, messages.GATEWAY_DRAINING.code)
            await asyncio.sleep(0.2)  # let the stderr line and exit status go out
            for conn in rt.registry:
                conn.close()
            log.warning("drain_deadline_reached", closed_connections=left)
        settle = time.monotonic() + 3.0
        while len(rt.registry) and time.monotonic() < settle:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await self._close_http()
        if self._acceptor is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._acceptor.wait_closed(), 2.0)
        if self._changes is not None:
            with contextlib.suppress(Exception):
                await self._changes.close()
        if rt.revocation is not None:
            rt.revocation.close()
        await rt.audit.close()
        if rt.upstream_pool is not None:
            await rt.upstream_pool.close()
        await rt.db.close()
        log.info("stopped", audit_written=rt.audit.written, audit_dropped=rt.audit.dropped)
        self.notifier.close()

    async def _close_http(self) -> None:
        if self._api is not None:
            with contextlib.suppress(Exception):
                await self._api.close()
            self._api = None
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.close()
            self._http = None
