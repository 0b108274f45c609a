"""The asyncssh server: authentication callbacks and per-connection bookkeeping.

One ``GatewayConnection`` per TCP connection. Auth decisions are made here from data loaded
once in ``begin_auth`` (one query per connection, whatever the number of keys offered); after
auth, the upstream connection is opened in the background and shared by every channel of this
client connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import asyncssh
import structlog
from structlog.typing import FilteringBoundLogger

from gateway import asyncssh_patches, messages
from gateway.daemon import metrics
from gateway.errors import UpstreamError
from gateway.relay.session import ClientSide, SessionSummary
from gateway.ssh.login import sandbox_id_from_login
from gateway.ssh.runtime import Runtime
from gateway.upstream import connect as upstream
from gateway.upstream.pool import Lease
from keystore import sandboxes, ssh_keys
from keystore.audit_events import AuditEvent
from keystore.errors import Unavailable
from keystore.models import AuthorizedKey, SandboxAccess

asyncssh_patches.apply()

_log = structlog.get_logger("gateway.ssh")
_PID = os.getpid()  # workers are separate processes started by exec, never forked copies


def new_conn_id() -> str:
    return secrets.token_hex(6)


def canonical_line(key: asyncssh.SSHKey) -> str:
    """``TYPE BASE64`` without comment, the form stored in ssh_keys.public_key."""
    parts = key.export_public_key("openssh").decode().split()
    return f"{parts[0]} {parts[1]}"


class GatewayConnection(asyncssh.SSHServer):
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self.conn_id = new_conn_id()
        self.log: FilteringBoundLogger = _log.bind(conn_id=self.conn_id, pid=_PID)
        self._peer_port: int | None = None
        self._session_seq = 0
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer: str | None = None
        self._authenticated = False
        self._counted_unauth = False
        self._login: str | None = None
        self._sandbox_id: str | None = None
        self._access: SandboxAccess | None = None
        self._refusal: str | None = None  # reason code when no key can be accepted
        self._accepted: AuthorizedKey | None = None
        self._refused = 0
        self._banner_sent = False
        self._leases: dict[object, Lease] = {}  # session or forwarder -> its pool lease
        self._sessions: set[ClientSide] = set()
        self._started = time.monotonic()

    # --- connection lifecycle ---

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        # With the PROXY protocol on, peername is the client the load balancer named.
        peer = conn.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else None
        self._peer_port = int(peer[1]) if peer else None
        self.log = self.log.bind(peer=self._peer)
        rt = self._rt
        if rt.draining or rt.unauthenticated >= rt.config.ssh.max_unauthenticated:
            # Too early for a DISCONNECT message (no version exchange yet): just drop it.
            reason = "gateway_draining" if rt.draining else "too_many_unauthenticated"
            self.log.warning("connection_dropped", reason=reason)
            metrics.CONNECTIONS.labels(reason).inc()
            conn.abort()
            return
        metrics.CONNECTIONS.labels("accepted").inc()
        metrics.CONNECTIONS_OPEN.labels("unauthenticated").inc()
        rt.unauthenticated += 1
        self._counted_unauth = True
        rt.connections.add(self)
        self.log.info("connection_open", peer_port=self._peer_port)

    def connection_lost(self, exc: Exception | None) -> None:
        rt = self._rt
        self._uncount_unauth()
        if self._authenticated and self in rt.connections:
            metrics.CONNECTIONS_OPEN.labels("authenticated").dec()
        rt.connections.discard(self)
        for lease in self._leases.values():
            lease.release()  # the shared upstream connection stays for other clients
        self._leases.clear()
        self.log.info(
            "connection_closed",
            error=str(exc) if exc else None,
            authenticated=self._authenticated,
            duration_seconds=round(time.monotonic() - self._started, 3),
        )

    def _uncount_unauth(self) -> None:
        if self._counted_unauth:
            self._counted_unauth = False
            self._rt.unauthenticated -= 1
            metrics.CONNECTIONS_OPEN.labels("unauthenticated").dec()

    # --- authentication (RFC 4252) ---

    async def begin_auth(self, username: str) -> bool:
        # Called again whenever the client switches login name mid-auth: forget everything
        # decided for the previous name, or a key accepted for one org's sandbox could
        # complete a login to another's.
        self._login = username
        self._access = None
        self._refusal = None
        self._accepted = None
        self._sandbox_id = None
        sandbox_id = sandbox_id_from_login(username)
        if sandbox_id is None:
            self._refusal = messages.INVALID_LOGIN_NAME.code
            self._banner(messages.INVALID_LOGIN_NAME.render(login=_printable(username)))
            return True
        self._sandbox_id = sandbox_id
        self.log = self.log.bind(sandbox=sandbox_id)
        t0 = time.perf_counter()
        try:
            self._access = await sandboxes.access_for(self._rt.db, sandbox_id)
        except Unavailable as exc:
            self._refusal = messages.KEYSTORE_UNAVAILABLE.code
            self.log.error("keystore_unavailable", error=str(exc))
            self._banner(messages.KEYSTORE_UNAVAILABLE.render())
            return True
        finally:
            elapsed = time.perf_counter() - t0
            metrics.AUTH_DECISION.observe(elapsed)
            self.log.debug("auth_lookup", seconds=round(elapsed, 6))
        if self._access is None:
            self._refusal = "unknown_sandbox"  # logged as such, shown as key_not_registered
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Called for the unsigned query and again with the signature; both answered from the
        # key set of the current login's sandbox, loaded once in begin_auth.
        fingerprint = key.get_fingerprint("sha256")
        match = None
        if self._access is not None:
            match = self._access.key_for(fingerprint, canonical_line(key))
        if match is not None:
            self._accepted = match
            pool = self._rt.upstream_pool
            if pool is not None and self._access is not None:
                if self._access.sandbox.status == "running":
                    # A registered key was offered: open the upstream connection while the
                    # client signs (no unauthenticated amplification: only registered keys).
                    pool.warm(self._target())
            return True
        self._refused += 1
        reason = self._refusal or messages.KEY_NOT_REGISTERED.code
        self._audit_auth("refused", reason, fingerprint)
        if self._refusal in (None, "unknown_sandbox"):
            self._banner(
                messages.KEY_NOT_REGISTERED.render(hint=self._rt.config.ssh.register_key_hint)
            )
        if self._refused >= self._rt.config.ssh.max_auth_tries:
            raise asyncssh.PermissionDenied(
                messages.TOO_MANY_AUTH_FAILURES.render(hint=self._rt.config.ssh.register_key_hint)
            )
        return False

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def auth_completed(self) -> None:
        assert self._access is not None and self._accepted is not None
        self._authenticated = True
        self._uncount_unauth()
        metrics.CONNECTIONS_OPEN.labels("authenticated").inc()
        sandbox = self._access.sandbox
        self.log = self.log.bind(org=sandbox.org_slug, key=self._accepted.fingerprint)
        self._audit_auth("ok", None, self._accepted.fingerprint)
        self.log.info("auth_ok")
        asyncio.get_running_loop().create_task(self._touch_key(sandbox.org_id, self._accepted))
        if sandbox.status == "running" and self._rt.upstream_pool is not None:
            self._rt.upstream_pool.warm(self._target())

    async def _touch_key(self, org_id: Any, key: AuthorizedKey) -> None:
        with contextlib.suppress(Unavailable):
            await ssh_keys.touch_last_used(self._rt.db, org_id, key.id)

    def _target(self) -> upstream.Target:
        assert self._access is not None
        sandbox = self._access.sandbox
        return upstream.Target(
            sandbox_id=sandbox.id,
            host=sandbox.upstream_host,
            port=sandbox.upstream_port,
            user=sandbox.login_user,
            host_keys=sandbox.host_keys,
        )

    async def _lease(self, holder: object) -> asyncssh.SSHClientConnection:
        """A channel's share of a warm upstream connection to this login's sandbox.

        Raises UpstreamError with a message for this user (their connection id) when the sandbox
        is stopped or cannot be used. The lease is released when ``holder`` ends.
        """
        assert self._access is not None
        sandbox = self._access.sandbox
        pool = self._rt.upstream_pool
        if sandbox.status != "running" or pool is None:
            raise UpstreamError(
                messages.SANDBOX_STOPPED.code, messages.SANDBOX_STOPPED.render(sandbox=sandbox.id)
            )
        t0 = time.perf_counter()
        try:
            lease = await pool.acquire(self._target())
        except UpstreamError as exc:
            level = (
                "error"
                if exc.reason_code == messages.UPSTREAM_HOST_KEY_MISMATCH.code
                else "warning"
            )
            getattr(self.log, level)(
                "upstream_failed",
                reason=exc.reason_code,
                upstream=f"{sandbox.upstream_host}:{sandbox.upstream_port}",
                error=str(exc.__cause__) if exc.__cause__ else None,
            )
            metrics.UPSTREAM_CONNECT.labels(exc.reason_code).observe(time.perf_counter() - t0)
            raise UpstreamError(exc.reason_code, self._upstream_message(exc.reason_code)) from exc
        elapsed = time.perf_counter() - t0
        metrics.UPSTREAM_CONNECT.labels("ok").observe(elapsed)
        self.log.info("upstream_leased", seconds=round(elapsed, 4))
        # Released when the holder ends, or at the latest with this client connection.
        self._leases[holder] = lease
        return lease.conn  # type: ignore[return-value]

    def _release(self, holder: object) -> None:
        lease = self._leases.pop(holder, None)
        if lease is not None:
            lease.release()

    def _upstream_message(self, code: str) -> str:
        assert self._access is not None
        values = {"sandbox": self._access.sandbox.id, "conn_id": self.conn_id}
        reason = {
            r.code: r
            for r in (
                messages.UPSTREAM_HOST_KEY_MISMATCH,
                messages.UPSTREAM_AUTH_FAILED,
                messages.UPSTREAM_UNREACHABLE,
            )
        }.get(code, messages.UPSTREAM_UNREACHABLE)
        return reason.render(seconds=self._rt.config.upstream.connect_timeout_seconds, **values)

    # --- channels (RFC 4254) ---

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        limit = self._rt.config.ssh.max_sessions_per_connection
        if len(self._sessions) >= limit or self._rt.draining:
            self.log.warning("session_refused", reason=messages.TOO_MANY_SESSIONS.code)
            return False
        assert self._access is not None
        self._session_seq += 1
        session_id = f"{self.conn_id}-{self._session_seq}"
        session: AuditedSession = AuditedSession(
            owner=self,
            session_id=session_id,
            upstream=lambda: self._lease(session),
            sandbox_id=self._access.sandbox.id,
            conn_id=self.conn_id,
            log=self.log,
            on_end=lambda summary: self._session_ended(session, summary),
        )
        self._sessions.add(session)
        metrics.CHANNELS_ACTIVE.labels("session").inc()
        self.log.info("session_open", session_id=session_id)
        return session

    def _session_started(self, session: AuditedSession) -> None:
        assert self._access is not None and self._accepted is not None
        self._rt.audit.record(
            AuditEvent(
                action="ssh.session.start",
                result="ok",
                org_id=self._access.sandbox.org_id,
                actor=self._accepted.fingerprint,
                target=self._access.sandbox.id,
                source_ip=self._peer,
                details={
                    "conn_id": self.conn_id,
                    "session_id": session.session_id,
                    "kind": session.summary.kind,
                    "source_port": self._peer_port,
                    "org": self._access.sandbox.org_slug,
                    "pty": session.has_pty,
                },
            )
        )

    def _session_ended(self, session: ClientSide, summary: SessionSummary) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._release(session)
        metrics.CHANNELS_ACTIVE.labels("session").dec()
        result = "error" if summary.reason else "ok"
        metrics.session_ended(summary.kind, result, summary.bytes_up, summary.bytes_down)
        assert self._access is not None and self._accepted is not None
        details = {
            "conn_id": self.conn_id,
            "session_id": getattr(session, "session_id", None),
            "org": self._access.sandbox.org_slug,
            "source_port": self._peer_port,
            "kind": summary.kind,
            "bytes_up": summary.bytes_up,
            "bytes_down": summary.bytes_down,
            "duration_seconds": round(summary.duration_seconds, 3),
            "exit_status": summary.exit_status,
            "exit_signal": summary.exit_signal,
        }
        self._rt.audit.record(
            AuditEvent(
                action="ssh.session.end",
                result=result,
                reason=summary.reason,
                org_id=self._access.sandbox.org_id,
                actor=self._accepted.fingerprint,
                target=self._access.sandbox.id,
                source_ip=self._peer,
                details=details,
            )
        )
        if self._rt.draining and not self._sessions:
            self.close()  # draining: nothing left on this connection to wait for

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        """``ssh -L`` / ``-D``: open the TCP connection from inside the sandbox."""
        conn = self._conn
        if conn is None or self._access is None or self._access.sandbox.status != "running":
            return False
        self.log.info("direct_tcpip", dest=f"{dest_host}:{dest_port}")

        async def open_through_sandbox() -> Any:
            holder = object()
            up = await self._lease(holder)
            try:
                forwarder = await conn.forward_tunneled_connection(up, dest_host, dest_port)
            except BaseException:
                self._release(holder)
                raise
            _count_channel(forwarder, "direct-tcpip", on_close=lambda: self._release(holder))
            return forwarder

        return open_through_sandbox()

    # --- helpers ---

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def notify_sessions(self, text: str) -> None:
        """One stderr line on every live session, which goes on (drain has begun)."""
        for session in list(self._sessions):
            if isinstance(session, AuditedSession):
                session.notice(text)

    def close_sessions(self, text: str, reason: str) -> None:
        for session in list(self._sessions):
            session.close(text, reason)

    def close(self) -> None:
        """Close the SSH connection (after its sessions were told and closed)."""
        if self._conn is not None:
            self._conn.close()

    def _banner(self, text: str) -> None:
        if self._banner_sent or self._conn is None:
            return
        self._banner_sent = True
        self._conn.send_auth_banner(text + "\n")

    def _audit_auth(self, result: str, reason: str | None, fingerprint: str) -> None:
        sandbox = self._access.sandbox if self._access else None
        self.log.info("auth", result=result, reason=reason, fingerprint=fingerprint)
        metrics.AUTH.labels(result, reason or "ok").inc()
        self._rt.audit.record(
            AuditEvent(
                action="ssh.auth",
                result=result,
                reason=reason,
                org_id=sandbox.org_id if sandbox else None,
                actor=fingerprint,
                target=self._sandbox_id or _printable(self._login or ""),
                source_ip=self._peer,
                details={
                    "conn_id": self.conn_id,
                    "source_port": self._peer_port,
                    "org": sandbox.org_slug if sandbox else None,
                    "login": _printable(self._login or ""),
                },
            )
        )


class AuditedSession(ClientSide):
    """ClientSide plus what the daemon needs: a start event and a drain notice."""

    def __init__(self, *, owner: GatewayConnection, session_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner
        self.session_id = session_id
        self.has_pty = False
        self._user_chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._noticed = False

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._user_chan = chan
        super().connection_made(chan)

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Any
    ) -> bool:
        self.has_pty = True
        return super().pty_requested(term_type, term_size, term_modes)

    def session_started(self) -> None:
        super().session_started()
        self._owner._session_started(self)

    def notice(self, text: str) -> None:
        chan = self._user_chan
        if chan is None or self._noticed or chan.is_closing():
            return
        self._noticed = True
        end = b"\r\n" if self.has_pty else b"\n"
        with contextlib.suppress(OSError, asyncssh.Error):
            chan.write_stderr(text.encode() + end)


def _count_channel(session: Any, kind: str, on_close: Callable[[], None]) -> None:
    """Count an open forwarding channel until its session reports connection_lost, then call
    ``on_close`` (which releases its upstream lease)."""
    gauge = metrics.CHANNELS_ACTIVE.labels(kind)
    original = getattr(session, "connection_lost", None)
    if original is None:
        on_close()
        return
    gauge.inc()

    def lost(exc: Exception | None) -> None:
        gauge.dec()
        on_close()
        original(exc)

    try:
        session.connection_lost = lost
    except AttributeError:
        gauge.dec()
        on_close()


def _printable(text: str) -> str:
    """A login name made safe for logs and banners: printable ASCII, at most 80 characters."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text[:80])
