"""The channels of one authenticated client connection (RFC 4254): sessions and forwards.

``Channels`` opens each session or ``direct-tcpip`` channel on a lease of a warm upstream
connection to the sandbox, holds the leases (released when the channel ends, or all at once
with the client connection), counts channels in metrics, writes the session audit rows, and
renders the one line a user sees when a channel fails, from gateway/messages.py, once.
The bytes themselves are moved by gateway/relay/.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh
from structlog.typing import FilteringBoundLogger

from gateway import messages
from gateway.daemon import metrics
from gateway.errors import UpstreamError
from gateway.relay.forward import TunnelEnd, open_tunnel
from gateway.relay.session import ClientSide, SessionSummary
from gateway.ssh.auth import Accept
from gateway.ssh.runtime import Runtime
from gateway.upstream.pool import LeaseBook
from gateway.upstream.target import Target
from keystore.audit_events import AuditEvent

# Failures a user can meet when a channel is opened, by reason code.
_UPSTREAM_REASONS = {
    r.code: r
    for r in (
        messages.SANDBOX_STOPPED,
        messages.UPSTREAM_HOST_KEY_MISMATCH,
        messages.UPSTREAM_AUTH_FAILED,
        messages.UPSTREAM_UNREACHABLE,
        messages.UPSTREAM_REFUSED,
        messages.GATEWAY_DRAINING,
        messages.TOO_MANY_SESSIONS,
        messages.ACCESS_ENDED,
        messages.REVOCATION_UNVERIFIED,
    )
}


class AuditedSession(ClientSide):
    """ClientSide plus what the door needs: a start event, its id and a drain notice."""

    def __init__(self, *, owner: Channels, session_id: str, **kwargs: Any) -> None:
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
        self._owner.session_started(self)

    def notice(self, text: str) -> None:
        """One stderr line; the session goes on (e.g. drain has begun)."""
        chan = self._user_chan
        if chan is None or self._noticed or chan.is_closing():
            return
        self._noticed = True
        end = b"\r\n" if self.has_pty else b"\n"
        with contextlib.suppress(OSError, asyncssh.Error):
            chan.write_stderr(text.encode() + end)


class Channels:
    def __init__(
        self,
        rt: Runtime,
        *,
        conn_id: str,
        accepted: Accept,
        peer: str | None,
        peer_port: int | None,
        log: FilteringBoundLogger,
        on_idle_while_draining: Callable[[], None],
        admit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._rt = rt
        # Checks the connection's access against the database before each channel opens
        # (gateway/ssh/revocation.py); None only in unit tests.
        self._admit = admit
        self._on_idle_while_draining = on_idle_while_draining
        self._conn_id = conn_id
        self._accepted = accepted
        self._peer = peer
        self._peer_port = peer_port
        self._log = log
        self._leases = LeaseBook()
        self._sessions: set[AuditedSession] = set()
        self._seq = 0

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def target(self) -> Target:
        return Target.of(self._accepted.sandbox)

    def describe(self, code: str, detail: str | None) -> str:
        """The user's text for a failed channel: rendered here, at the edge, once."""
        if code == messages.ACCESS_ENDED.code:
            key = self._accepted.key.fingerprint
            return messages.access_ended(
                detail or "",
                sandbox=self._accepted.sandbox.id,
                key=key,
                hint=self._rt.config.ssh.register_key_hint,
            )
        reason = _UPSTREAM_REASONS.get(code, messages.UPSTREAM_UNREACHABLE)
        return reason.render(
            sandbox=self._accepted.sandbox.id,
            conn_id=self._conn_id,
            seconds=self._rt.config.upstream.connect_timeout_seconds,
            limit=self._rt.config.ssh.max_sessions_per_connection,
            detail=detail or "no detail",
        )

    # --- session channels ---

    def open_session(self) -> AuditedSession | None:
        limit = self._rt.config.ssh.max_sessions_per_connection
        if len(self._sessions) >= limit or self._rt.draining:
            self._log.warning("session_refused", reason=messages.TOO_MANY_SESSIONS.code)
            return None
        self._seq += 1
        session_id = f"{self._conn_id}-{self._seq}"
        session: AuditedSession = AuditedSession(
            owner=self,
            session_id=session_id,
            upstream=lambda: self._lease(session),
            describe=self.describe,
            log=self._log,
            on_end=lambda summary: self._session_ended(session, summary),
        )
        self._sessions.add(session)
        metrics.CHANNELS_ACTIVE.labels("session").inc()
        self._log.info("session_open", session_id=session_id)
        return session

    def session_started(self, session: AuditedSession) -> None:
        self._rt.audit.record(
            self._event(
                "ssh.session.start",
                "ok",
                None,
                session_id=session.session_id,
                kind=session.summary.kind,
                pty=session.has_pty,
            )
        )

    def _session_ended(self, session: AuditedSession, summary: SessionSummary) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._leases.release(session)
        metrics.CHANNELS_ACTIVE.labels("session").dec()
        result = "error" if summary.reason else "ok"
        metrics.session_ended(summary.kind, result, summary.bytes_up, summary.bytes_down)
        self._rt.audit.record(
            self._event(
                "ssh.session.end",
                result,
                summary.reason,
                session_id=session.session_id,
                kind=summary.kind,
                bytes_up=summary.bytes_up,
                bytes_down=summary.bytes_down,
                duration_seconds=round(summary.duration_seconds, 3),
                exit_status=summary.exit_status,
                exit_signal=summary.exit_signal,
            )
        )
        if self._rt.draining and not self._sessions:
            self._on_idle_while_draining()  # nothing left on this connection to wait for

    def notify_sessions(self, text: str) -> None:
        for session in list(self._sessions):
            session.notice(text)

    def close_sessions(self, text: str, reason: str) -> None:
        for session in list(self._sessions):
            session.close(text, reason)

    # --- forwarding channels ---

    def open_direct_tcpip(
        self, conn: asyncssh.SSHServerConnection, dest_host: str, dest_port: int
    ) -> Awaitable[TunnelEnd] | None:
        """``ssh -L`` / ``-D`` / ``-W``: the TCP connection is opened inside the sandbox."""
        if self._rt.draining:
            return None
        self._log.info("direct_tcpip", dest=f"{dest_host}:{dest_port}")
        gauge = metrics.CHANNELS_ACTIVE.labels("direct-tcpip")

        async def through_sandbox() -> TunnelEnd:
            # Whatever fails here fails this channel only, with the reason in the open-failure
            # text (ssh prints it), never the client's whole connection.
            holder = object()
            try:
                up = await self._lease(holder)
            except UpstreamError as exc:
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_CONNECT_FAILED, self.describe(exc.reason_code, exc.detail)
                ) from exc

            def closed() -> None:
                gauge.dec()
                self._leases.release(holder)

            try:
                end = await open_tunnel(up, dest_host, dest_port, closed)
            except asyncssh.ChannelOpenError:
                self._leases.release(holder)
                raise
            except (OSError, asyncssh.Error) as exc:
                self._leases.release(holder)
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_CONNECT_FAILED,
                    self.describe(messages.UPSTREAM_REFUSED.code, type(exc).__name__),
                ) from exc
            except BaseException:
                self._leases.release(holder)
                raise
            gauge.inc()
            return end

        return through_sandbox()

    # --- upstream leases ---

    async def _lease(self, holder: object) -> asyncssh.SSHClientConnection:
        """A channel's share of a warm upstream connection to this login's sandbox.

        Raises UpstreamError (reason code + technical detail) when the sandbox is stopped or
        cannot be used. The lease is released when ``holder`` ends, or with the connection.
        """
        sandbox = self._accepted.sandbox
        pool = self._rt.upstream_pool
        if self._admit is not None:
            await self._admit()  # current state, not the snapshot taken at login
        elif sandbox.status != "running":
            raise UpstreamError(messages.SANDBOX_STOPPED.code, f"sandbox status {sandbox.status}")
        if pool is None:
            raise UpstreamError(messages.SANDBOX_STOPPED.code, "no upstream pool")
        t0 = time.perf_counter()
        try:
            lease = await pool.acquire(self.target)
        except UpstreamError as exc:
            mismatch = exc.reason_code == messages.UPSTREAM_HOST_KEY_MISMATCH.code
            (self._log.error if mismatch else self._log.warning)(
                "upstream_failed",
                reason=exc.reason_code,
                upstream=f"{sandbox.upstream_host}:{sandbox.upstream_port}",
                error=exc.detail,
            )
            metrics.UPSTREAM_CONNECT.labels(exc.reason_code).observe(time.perf_counter() - t0)
            raise
        elapsed = time.perf_counter() - t0
        metrics.UPSTREAM_CONNECT.labels("ok").observe(elapsed)
        self._log.info("upstream_leased", seconds=round(elapsed, 4))
        self._leases.hold(holder, lease)
        return lease.conn  # type: ignore[return-value]

    def close(self) -> None:
        """The client connection is gone: every lease goes back to the pool."""
        self._leases.release_all()

    def _event(self, action: str, result: str, reason: str | None, **details: Any) -> AuditEvent:
        sandbox = self._accepted.sandbox
        return AuditEvent(
            action=action,
            result=result,
            reason=reason,
            org_id=sandbox.org_id,
            actor=self._accepted.key.fingerprint,
            target=sandbox.id,
            source_ip=self._peer,
            details={
                "conn_id": self._conn_id,
                "source_port": self._peer_port,
                "org": sandbox.org_slug,
                **details,
            },
        )
