"""The channels of one authenticated client connection (RFC 4254): sessions and forwards.

``Channels`` opens each session or ``direct-tcpip`` channel on a lease of a warm upstream
connection to the sandbox, holds the leases (released when the channel ends, or all at once
with the client connection), counts channels in metrics, writes the session audit rows, and
renders the one line a user sees when a channel fails, from gateway/messages.py, once.
The bytes themselves are moved by gateway/relay/.

Quotas (gateway/ssh/quotas.py) are checked as each channel is asked for: sessions
(``ssh.max_sessions_per_connection``), forwarding channels
(``quotas.max_forwards_per_connection``) and the connection's share of its sandbox's upstream
capacity (``quotas.upstream_share_percent``). A refused forwarding channel fails to open with
the text (``ssh`` prints it); a refused session opens, prints the text on stderr and exits 255,
so that the user of a ControlMaster sees it too (a mux client whose session open is refused
says nothing and quietly logs in again on a connection of its own).

Whatever order things end in, no upstream slot outlives its channel: a session's slot is
free for the next one as soon as the session's channel is closing (not when the client's
CLOSE has been processed a loop turn later), its lease goes back when the sandbox's channel
closes, forwarding channels still waiting for a lease when the client connection drops are
cancelled, and a lease or an upstream channel that arrives after the client left is given
back or closed at once. A session the sandbox refuses (its MaxSessions, lower than
``upstream.max_sessions_per_connection``) marks that upstream connection full
(``Lease.report_full``) and is retried once on another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import asyncssh
from structlog.typing import FilteringBoundLogger

from gateway import messages
from gateway.daemon import metrics
from gateway.errors import UpstreamError
from gateway.relay import budget
from gateway.relay.forward import Bytes, TunnelEnd, back_to_client, open_tunnel, open_unix_tunnel
from gateway.relay.session import ClientSide, SessionSummary
from gateway.ssh import forwarding, quotas
from gateway.ssh.auth import Accept
from gateway.ssh.runtime import Runtime
from gateway.upstream import certificates as upstream_certificates
from gateway.upstream import connect as upstream_connect
from gateway.upstream.dedicated import Dedicated
from gateway.upstream.early import EarlyChannel
from gateway.upstream.pool import Lease, LeaseBook
from gateway.upstream.target import Target
from keystore.audit_events import AuditEvent

T = TypeVar("T")

# Failures a user can meet when a channel is opened, by reason code.
_UPSTREAM_REASONS = {
    r.code: r
    for r in (
        messages.SANDBOX_STOPPED,
        messages.UPSTREAM_HOST_KEY_MISMATCH,
        messages.UPSTREAM_AUTH_FAILED,
        messages.UPSTREAM_UNREACHABLE,
        messages.UPSTREAM_REFUSED,
        messages.UPSTREAM_BUSY,
        messages.GATEWAY_DRAINING,
        messages.TOO_MANY_SESSIONS,
        messages.ACCESS_ENDED,
        messages.REVOCATION_UNVERIFIED,
    )
}

_CLIENT_GONE = "client connection closed"


class AuditedSession(ClientSide):
    """ClientSide plus what the door needs: a start event, its id and a drain notice."""

    def __init__(self, *, owner: Channels, session_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner
        self.session_id = session_id
        self.has_pty = False
        self._user_chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._noticed = False

    @property
    def closing(self) -> bool:
        """The session is over for the user (exit sent, or the client closed its channel):
        asyncssh only waits for the other side's CLOSE before it forgets the channel."""
        chan = self._user_chan
        return chan is not None and chan.is_closing()

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

    def upstream_closed(self, exc: Exception | None) -> None:
        super().upstream_closed(exc)
        self._owner.upstream_channel_closed(self)  # the sandbox's channel is gone: free its slot

    def recv_window(self) -> int:
        """The window the client's channel grants: the sandbox's channel grants the same."""
        chan = self._user_chan
        return (chan.get_recv_window() if chan is not None else None) or budget.DEFAULT_WINDOW

    def agent_path(self) -> str | None:
        """The gateway's socket for this client's agent, once the client asked for it (-A)."""
        chan = self._user_chan
        return chan.get_agent_path() if chan is not None else None

    def notice(self, text: str) -> None:
        """One stderr line; the session goes on (e.g. drain has begun)."""
        if self._noticed:
            return
        self._noticed = True
        self.say(text)

    def say(self, text: str) -> None:
        """A stderr line about the connection (a refused forwarding); the session goes on."""
        chan = self._user_chan
        if chan is None or chan.is_closing():
            return
        end = b"\r\n" if self.has_pty else b"\n"
        with contextlib.suppress(OSError, asyncssh.Error):
            chan.write_stderr(text.encode() + end)


class RefusedSession(asyncssh.SSHServerSession[bytes]):
    """A session over a quota: it opens, says why on stderr and exits 255, using no upstream.

    Refusing the channel open instead would reach no ControlMaster user: the mux master keeps
    the text to itself and its client logs in anew on a connection of its own."""

    def __init__(self, text: str, on_end: Callable[[], None]) -> None:
        self._text = text
        self._on_end: Callable[[], None] | None = on_end
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._pty = False

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Any
    ) -> bool:
        self._pty = True
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return True

    def session_started(self) -> None:
        chan = self._chan
        if chan is None or chan.is_closing():
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            chan.write_stderr(self._text.encode() + (b"\r\n" if self._pty else b"\n"))
            chan.exit(messages.GATEWAY_EXIT_STATUS)

    def connection_lost(self, exc: Exception | None) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()


class _EarlyUpstream:
    """What a session's relay sees as its upstream connection when its channel was opened
    early (``Channels._prepare``): ``create_session`` sends only the requests."""

    def __init__(self, chan: EarlyChannel) -> None:
        self._chan = chan

    async def create_session(
        self, session_factory: Callable[[], asyncssh.SSHClientSession[bytes]], *args: Any, **kw: Any
    ) -> tuple[asyncssh.SSHClientChannel[bytes], asyncssh.SSHClientSession[bytes]]:
        # Awaited here, not in a task of its own (one loop turn less before the request goes
        # out): cancelled meanwhile (the client left), the channel is closed, which ends
        # whatever the sandbox may have started for it.
        try:
            return await self._chan.start(session_factory, *args, **kw)
        except BaseException:
            self._chan.close()
            raise


def _close_once_opened(opening: asyncio.Future[EarlyChannel]) -> None:
    """Close the channel ``opening`` gives, if it gives one, now or when it does."""

    def close(done: asyncio.Future[EarlyChannel]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    opening.add_done_callback(close)


def _drop_result(task: asyncio.Task[Any]) -> None:
    """A preparation nobody awaited (the session ended first): its failure was expected."""
    if not task.cancelled():
        task.exception()


async def _opened_or_closed(opening: Awaitable[T], discard: Callable[[T], None]) -> T:
    """Await an upstream channel open; if the caller is cancelled meanwhile, let the open
    finish and close what it opened (a cancelled asyncssh open would leave the channel open
    on the sandbox, holding one of its sessions, with nobody to close it)."""
    task = asyncio.ensure_future(opening)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def close_it(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                with contextlib.suppress(Exception):
                    discard(done.result())

        task.add_done_callback(close_it)
        raise


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
        # Each session's access check and early upstream channel, started when the client
        # opened the session channel and taken when its exec/shell/subsystem arrives.
        self._prepared: dict[AuditedSession, asyncio.Task[EarlyChannel]] = {}
        self._forwards: set[object] = set()  # forwarding channels open or being opened
        self._opening: set[asyncio.Task[Any]] = set()  # forwarding channels being opened
        self._refusing = 0  # RefusedSessions still open
        self._seq = 0
        # Agent and remote forwardings: an upstream connection of this client's own
        # (gateway/upstream/dedicated.py); opened by the first channel that needs it.
        self._dedicated = Dedicated(self._open_dedicated)
        self._remote: set[forwarding.RemoteListener] = set()
        # -R requests still being set up: a session asked for after them waits for them, as
        # with sshd, which handles a connection's requests in order (so `ssh -R P:… cmd` finds
        # its listener in place when cmd starts).
        self._remote_pending: set[asyncio.Future[None]] = set()
        self._client_conn: asyncssh.SSHServerConnection | None = None
        self._agent_refused_told = False
        # Refused forwardings asked for before any session (ssh -R ... cmd sends the request
        # first): told on the next session's stderr, since ssh prints no global-request text.
        self._untold: list[str] = []

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def forward_count(self) -> int:
        return len(self._forwards)

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
        config = self._rt.config
        reason = _UPSTREAM_REASONS.get(code, messages.UPSTREAM_UNREACHABLE)
        busy = code == messages.UPSTREAM_BUSY.code
        return reason.render(
            sandbox=self._accepted.sandbox.id,
            conn_id=self._conn_id,
            seconds=(
                config.upstream.lease_timeout_seconds
                if busy
                else config.upstream.connect_timeout_seconds
            ),
            limit=config.ssh.max_sessions_per_connection,
            capacity=self._capacity(),
            detail=detail or "no detail",
        )

    # --- quotas ---

    def _capacity(self) -> int:
        """The sandbox's upstream capacity: channels the pool may open to it at once."""
        pool = self._rt.upstream_pool
        if pool is not None:
            return pool.limits.per_target
        up = self._rt.config.upstream
        return up.max_sessions_per_connection * up.max_connections_per_sandbox

    def _live_sessions(self) -> int:
        """Sessions that count toward the limit: not those already closing, whose slot is
        free. A client that never acknowledges a close cannot pile them up: past twice the
        limit of closing ones, every session counts."""
        limit = self._rt.config.ssh.max_sessions_per_connection
        live = sum(1 for s in self._sessions if not s.closing)
        closing = len(self._sessions) - live
        return live if closing < 2 * limit else len(self._sessions)

    def _check(self, kind: quotas.ChannelKind) -> quotas.QuotaRefusal | None:
        config = self._rt.config
        refusal = quotas.check_channel(
            kind,
            sessions=self._live_sessions(),
            forwards=len(self._forwards),
            max_sessions=config.ssh.max_sessions_per_connection,
            max_forwards=config.quotas.max_forwards_per_connection,
            share=quotas.upstream_share(self._capacity(), config.quotas.upstream_share_percent),
        )
        if refusal is not None:
            metrics.QUOTA_REFUSALS.labels(refusal.code).inc()
            self._log.warning(
                "channel_refused",
                kind=kind,
                reason=refusal.code,
                limit=refusal.limit,
                holding=refusal.count,
            )
        return refusal

    def _quota_text(self, refusal: quotas.QuotaRefusal) -> str:
        reason = {
            messages.TOO_MANY_SESSIONS.code: messages.TOO_MANY_SESSIONS,
            messages.TOO_MANY_FORWARDS.code: messages.TOO_MANY_FORWARDS,
        }.get(refusal.code, messages.UPSTREAM_SHARE_EXCEEDED)
        return reason.render(
            limit=refusal.limit, capacity=self._capacity(), sandbox=self._accepted.sandbox.id
        )

    # --- session channels ---

    def open_session(self) -> asyncssh.SSHServerSession[bytes] | None:
        """The session the client asked for, a ``RefusedSession`` over a quota, or None
        (draining). Raises ChannelOpenError (with the text) when even refusals pile up."""
        if self._rt.draining:
            self._log.warning("session_refused", reason=messages.GATEWAY_DRAINING.code)
            return None
        refusal = self._check("session")
        if refusal is not None:
            text = self._quota_text(refusal)
            if self._refusing >= self._rt.config.ssh.max_sessions_per_connection:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, text)
            self._refusing += 1
            return RefusedSession(text, self._refused_session_ended)
        self._seq += 1
        session_id = f"{self._conn_id}-{self._seq}"
        session: AuditedSession = AuditedSession(
            owner=self,
            session_id=session_id,
            upstream=lambda: self._session_upstream(session),
            describe=self.describe,
            log=self._log,
            on_end=lambda summary: self._session_ended(session, summary),
        )
        self._sessions.add(session)
        metrics.CHANNELS_ACTIVE.labels("session").inc()
        self._log.info("session_open", session_id=session_id)
        task = asyncio.get_running_loop().create_task(self._prepare(session))
        task.add_done_callback(_drop_result)
        self._prepared[session] = task
        return session

    async def _prepare(self, session: AuditedSession) -> EarlyChannel:
        """Check access (the database's state now, as the channel opens) and, beside it,
        open the sandbox's session channel, while the client is still sending its requests:
        a session's exec then waits for neither (gateway/upstream/early.py). The channel
        carries no request before ``_session_upstream`` has this result, so nothing runs in
        the sandbox unless the check passed."""
        opening = asyncio.ensure_future(self._open_early(session))
        try:
            await self._admit_now()
        except BaseException:
            opening.cancel()  # an open already sent is let finish and closed,
            _close_once_opened(opening)  # and one that finished already is closed now
            raise
        return await _opened_or_closed(opening, lambda chan: chan.close())

    async def _open_early(self, session: AuditedSession) -> EarlyChannel:
        lease = await self._lease(session, admit=False)

        async def open_on(conn: asyncssh.SSHClientConnection) -> EarlyChannel:
            chan = EarlyChannel(conn, session.recv_window())
            await chan.open()
            return chan

        return await self.open_on_lease(
            session, lease, open_on, lambda chan: chan.close(), retry=True
        )

    def _drop_prepared(self, session: AuditedSession) -> None:
        """The session will not use its early channel (it ended, or needs the user's agent):
        stop preparing it, or close what was prepared."""
        task = self._prepared.pop(session, None)
        if task is None:
            return
        if not task.done():
            task.cancel()
        elif not task.cancelled() and task.exception() is None:
            task.result().close()

    def _refused_session_ended(self) -> None:
        self._refusing -= 1

    async def _session_upstream(self, session: AuditedSession) -> asyncssh.SSHClientConnection:
        if self._remote_pending:
            await asyncio.wait(
                set(self._remote_pending), timeout=self._rt.config.upstream.connect_timeout_seconds
            )
        # asyncssh handles a channel's requests one at a time, in order: an auth-agent-req
        # (sent before exec/shell, as OpenSSH does) has its socket by the time the session
        # starts.
        agent_path = session.agent_path()
        if agent_path is not None:
            if self._rt.config.forwarding.agent:
                # The sandbox's agent requests come back on the upstream connection: only one
                # of this client's own may carry them.
                self._drop_prepared(session)
                self._leases.release(session)
                await self._admit_now()
                try:
                    conn = await self._dedicated.get(agent_path)
                except UpstreamError as exc:
                    self._log.warning("upstream_failed", reason=exc.reason_code, error=exc.detail)
                    raise
                self._log.info("agent_forwarding", dedicated=True)
                return conn
            session.notice(messages.FORWARDING_DISABLED.render(what="Agent forwarding (ssh -A)"))
        # The relay only calls create_session on what is returned (gateway/relay/session.py).
        prepared = self._prepared.pop(session, None)
        if prepared is None:  # dropped: the session ended before it started
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, _CLIENT_GONE)
        chan = await _opened_or_closed(prepared, lambda early: early.close())
        return cast(asyncssh.SSHClientConnection, _EarlyUpstream(chan))

    def session_started(self, session: AuditedSession) -> None:
        untold, self._untold = self._untold, []
        for text in untold:
            session.say(text)
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

    def upstream_channel_closed(self, session: AuditedSession) -> None:
        self._leases.release(session)

    def _session_ended(self, session: AuditedSession, summary: SessionSummary) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._drop_prepared(session)
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
        """``ssh -L`` / ``-D`` / ``-W``: the TCP connection is opened inside the sandbox.

        Over a quota, raises ChannelOpenError with the text (ssh prints it)."""
        if self._rt.draining:
            return None
        refusal = self._check("forward")
        if refusal is not None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, self._quota_text(refusal)
            )
        dest = forwarding.printable_dest(f"{dest_host}:{dest_port}")
        self._log.info("direct_tcpip", dest=dest)
        holder = object()
        self._forwards.add(holder)
        return self._through_sandbox(
            holder,
            "direct-tcpip",
            dest,
            lambda up, closed: open_tunnel(up, dest_host, dest_port, closed),
        )

    async def _through_sandbox(
        self,
        holder: object,
        kind: str,
        dest: str,
        opener: Callable[[asyncssh.SSHClientConnection, Callable[[], None]], Awaitable[TunnelEnd]],
    ) -> TunnelEnd:
        # Whatever fails here fails this channel only, with the reason in the open-failure
        # text (ssh prints it), never the client's whole connection.
        gauge = metrics.CHANNELS_ACTIVE.labels(kind)
        ends: list[TunnelEnd] = []

        def closed() -> None:
            gauge.dec()
            self._forward_ended(holder)
            if ends:
                self._forward_audit(kind, dest, ends[0].count)

        try:
            lease = await self._cancellable(self._lease(holder))
        except UpstreamError as exc:
            self._forward_ended(holder)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, self.describe(exc.reason_code, exc.detail)
            ) from exc
        except BaseException:
            self._forward_ended(holder)
            raise
        # Not cancellable from here on: cancelling an asyncssh open would leave the channel
        # open in the sandbox with nobody to close it; and nothing may come between the
        # tunnel's open and asyncssh handing it the client's channel, or the sandbox's first
        # bytes (an sshd's banner for ssh -W) would reach an end with nowhere to write them.
        try:
            end = await opener(cast(asyncssh.SSHClientConnection, lease.conn), closed)
        except asyncssh.ChannelOpenError:
            self._forward_ended(holder)
            raise
        except (OSError, asyncssh.Error) as exc:
            self._forward_ended(holder)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED,
                self.describe(messages.UPSTREAM_REFUSED.code, type(exc).__name__),
            ) from exc
        except BaseException:
            self._forward_ended(holder)
            raise
        if self._leases.closed:  # the client left while the sandbox opened it
            end.close()
            self._forward_ended(holder)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, _CLIENT_GONE)
        gauge.inc()
        ends.append(end)
        self._rt.audit.record(self._event("ssh.forward.open", "ok", None, kind=kind, dest=dest))
        return end

    async def _cancellable(self, step: Awaitable[T]) -> T:
        """``step``, cancelled if the client connection goes meanwhile (asyncssh does not
        cancel a channel open that is still pending when its connection is lost)."""
        task = asyncio.current_task()
        if task is not None:
            self._opening.add(task)
        try:
            return await step
        finally:
            if task is not None:
                self._opening.discard(task)

    # --- Unix-socket and remote forwardings (gateway/ssh/forwarding.py) ---

    def bind_client(self, conn: asyncssh.SSHServerConnection) -> None:
        self._client_conn = conn

    async def _admit_now(self) -> None:
        sandbox = self._accepted.sandbox
        if self._admit is not None:
            await self._admit()
        elif sandbox.status != "running":
            raise UpstreamError(messages.SANDBOX_STOPPED.code, f"sandbox status {sandbox.status}")

    async def _open_dedicated(self, agent_path: str | None) -> asyncssh.SSHClientConnection:
        rt = self._rt
        t0 = time.perf_counter()
        cert = self._upstream_certificate()
        conn = await upstream_connect.connect(
            self.target,
            client_key=rt.upstream_key,
            config=rt.config.upstream,
            agent_path=agent_path,
            certificate=cert.certificate if cert is not None else None,
        )
        metrics.UPSTREAM_CONNECT.labels("ok").observe(time.perf_counter() - t0)
        self._log.info(
            "upstream_dedicated_open",
            seconds=round(time.perf_counter() - t0, 4),
            certificate_serial=cert.serial if cert is not None else None,
        )
        return conn

    def _upstream_certificate(self) -> upstream_certificates.UpstreamCertificate | None:
        """A fresh user certificate naming this connection's user for its dedicated upstream
        connection (gateway/upstream/certificates.py); None when off or the CA is unusable
        (the static key alone is offered then)."""
        accepted = self._accepted
        try:
            cert = upstream_certificates.issue(
                self._rt.config.upstream,
                self._rt.upstream_key,
                login_user=accepted.sandbox.login_user,
                key_fingerprint=accepted.key.fingerprint,
                org_slug=accepted.sandbox.org_slug,
                conn_id=self._conn_id,
            )
        except (upstream_certificates.CaKeyError, ValueError) as exc:
            self._log.error("upstream_certificate_failed", error=str(exc))
            return None
        if cert is not None:
            self._log.info(
                "upstream_certificate",
                key_id=cert.key_id,
                serial=cert.serial,
                principal=cert.principal,
                valid_after=cert.valid_after,
                valid_before=cert.valid_before,
            )
        return cert

    def open_direct_streamlocal(self, dest_path: str) -> Awaitable[TunnelEnd] | None:
        """``ssh -L /local.sock:/remote.sock``: the Unix socket is reached inside the sandbox."""
        if self._rt.draining:
            return None
        if not self._rt.config.forwarding.streamlocal:
            self._log.warning("forward_refused", kind="direct-streamlocal", reason="disabled")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                messages.FORWARDING_DISABLED.render(what="Unix-socket forwarding"),
            )
        refusal = self._check("forward")
        if refusal is not None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, self._quota_text(refusal)
            )
        dest = forwarding.printable_dest(dest_path)
        self._log.info("direct_streamlocal", dest=dest)
        holder = object()
        self._forwards.add(holder)
        return self._through_sandbox(
            holder,
            "direct-streamlocal",
            dest,
            lambda up, closed: open_unix_tunnel(up, dest_path, closed),
        )

    def open_remote(self, listen_host: str, listen_port: int) -> Awaitable[object] | bool:
        """``ssh -R [host:]port:...``: a listener inside the sandbox, on this client's own
        upstream connection; each connection to it comes back to this client only."""
        what = f"{listen_host}:{listen_port}"
        refused = self._remote_refusal(
            self._rt.config.forwarding.remote, "Remote port forwarding (ssh -R)", what
        )
        if refused:
            return False
        return self._in_order(self._listen(what, "remote-tcpip", listen_host, listen_port, None))

    def open_remote_unix(self, listen_path: str) -> Awaitable[object] | bool:
        """``ssh -R /remote.sock:...``: a Unix-socket listener inside the sandbox."""
        refused = self._remote_refusal(
            self._rt.config.forwarding.streamlocal, "Unix-socket forwarding", listen_path
        )
        if refused:
            return False
        return self._in_order(self._listen(listen_path, "remote-streamlocal", "", 0, listen_path))

    def _in_order(self, setup: Awaitable[object]) -> Awaitable[object]:
        """Run a -R setup while later sessions wait for it (``_remote_pending``)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._remote_pending.add(done)

        async def run() -> object:
            try:
                return await setup
            finally:
                self._remote_pending.discard(done)
                if not done.done():
                    done.set_result(None)

        return run()

    def _remote_refusal(self, enabled: bool, what: str, listen: str) -> bool:
        if self._rt.draining:
            return True
        text = None
        if not enabled:
            text = messages.FORWARDING_DISABLED.render(what=what)
            reason = messages.FORWARDING_DISABLED.code
        elif len(self._remote) >= self._rt.config.forwarding.max_remote_per_connection:
            limit = self._rt.config.forwarding.max_remote_per_connection
            text = messages.TOO_MANY_REMOTE_FORWARDS.render(limit=limit)
            reason = messages.TOO_MANY_REMOTE_FORWARDS.code
        if text is None:
            return False
        self._log.warning(
            "forward_refused",
            kind="remote",
            listen=forwarding.printable_dest(listen),
            reason=reason,
        )
        metrics.QUOTA_REFUSALS.labels(reason).inc()
        self._tell(text)
        return True

    def _tell(self, text: str) -> None:
        """``text`` on every live session's stderr, or on the next one's if none is live."""
        live = [s for s in self._sessions if not s.closing]
        if not live:
            if len(self._untold) < 4:
                self._untold.append(text)
            return
        for session in live:
            session.say(text)

    async def _listen(self, what: str, kind: str, host: str, port: int, path: str | None) -> object:
        client = self._client_conn
        if client is None:
            return False
        try:
            await self._admit_now()
            up = await self._dedicated.get()
        except (UpstreamError, asyncssh.Error, OSError) as exc:
            self._log.warning("forward_refused", kind=kind, reason="upstream", error=str(exc))
            return False
        dest = forwarding.printable_dest(what)
        listener = forwarding.RemoteListener(dest, on_close=self._remote_closed)

        def back(orig_host: str = "", orig_port: int = 0) -> Awaitable[Any]:
            return self._back_to_client(
                client, kind, dest, host, listener.port, path, orig_host, orig_port
            )

        try:
            if path is None:
                inner: Any = await up.create_server(cast(Any, back), host, port)
            else:
                inner = await up.create_unix_server(cast(Any, back), path)
        except (asyncssh.Error, OSError) as exc:
            self._log.warning("forward_refused", kind=kind, listen=dest, error=str(exc))
            return False
        listener.attach(inner, port)
        self._remote.add(listener)
        self._log.info("remote_forward_open", kind=kind, listen=dest, port=listener.port)
        self._rt.audit.record(
            self._event(
                "ssh.forward.open", "ok", None, kind=kind, listen=dest, port=listener.port or None
            )
        )
        return listener

    def _remote_closed(self, listener: forwarding.RemoteListener) -> None:
        if listener in self._remote:
            self._remote.discard(listener)
            self._log.info("remote_forward_closed", listen=listener.dest)
            self._rt.audit.record(
                self._event("ssh.forward.close", "ok", None, kind="remote", listen=listener.dest)
            )

    async def _back_to_client(
        self,
        client: asyncssh.SSHServerConnection,
        kind: str,
        dest: str,
        host: str,
        port: int,
        path: str | None,
        orig_host: str,
        orig_port: int,
    ) -> Any:
        """A sandbox process connected to one of this client's remote forwardings."""

        def open_on_client(factory: Callable[[], Any]) -> Awaitable[tuple[Any, Any]]:
            if path is None:
                return client.create_connection(factory, host, port, orig_host, orig_port)
            return client.create_unix_connection(factory, path)

        def ended(count: Bytes) -> None:
            self._forward_audit(kind + "-connection", dest, count)

        return await back_to_client(open_on_client, ended)

    def _forward_audit(self, kind: str, dest: str, count: Bytes) -> None:
        self._rt.audit.record(
            self._event(
                "ssh.forward.close",
                "ok",
                None,
                kind=kind,
                dest=dest,
                bytes_up=count.up,
                bytes_down=count.down,
            )
        )

    def _forward_ended(self, holder: object) -> None:
        self._forwards.discard(holder)
        self._leases.release(holder)

    # --- upstream leases ---

    async def _lease(self, holder: object, *, admit: bool = True) -> Lease:
        """A channel's share of a warm upstream connection to this login's sandbox.

        Raises UpstreamError (reason code + technical detail) when the sandbox is stopped,
        cannot be used or has no free slot in time; ChannelOpenError once the client
        connection is gone. The lease is released when ``holder`` ends, or with the
        connection. ``admit`` False: the caller checks access itself (``_prepare``).
        """
        if self._leases.closed:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, _CLIENT_GONE)
        sandbox = self._accepted.sandbox
        pool = self._rt.upstream_pool
        if admit:
            await self._admit_now()  # current state, not the snapshot taken at login
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
            if exc.reason_code == messages.UPSTREAM_BUSY.code:
                metrics.QUOTA_REFUSALS.labels(exc.reason_code).inc()
            raise
        elapsed = time.perf_counter() - t0
        metrics.UPSTREAM_CONNECT.labels("ok").observe(elapsed)
        self._log.info("upstream_leased", seconds=round(elapsed, 4))
        if not self._leases.hold(holder, lease):  # released at once: nobody to use it
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, _CLIENT_GONE)
        return lease

    async def open_on_lease(
        self,
        holder: object,
        lease: Lease,
        open_on: Callable[[asyncssh.SSHClientConnection], Awaitable[T]],
        discard: Callable[[T], None],
        *,
        retry: bool,
    ) -> T:
        """``open_on(connection)`` for ``holder``'s channel on its leased connection. With
        ``retry``, a sandbox that refuses it (its MaxSessions) gets that connection marked
        full and the channel is tried once more on another lease. Used for sessions; a
        cancelled open is let finish and what it opened is closed (``discard``)."""
        conn = cast(asyncssh.SSHClientConnection, lease.conn)
        try:
            return await _opened_or_closed(open_on(conn), discard)
        except asyncssh.ChannelOpenError as exc:
            if not retry:
                raise
            # OpenSSH's sshd refuses a session over its MaxSessions with "open failed"
            # (code 2 in 9.x, 1 before): whatever the code, the connection is full unless it
            # has just closed.
            if not lease.conn.is_closed():
                lease.report_full()
            self._log.warning("upstream_full", code=exc.code, error=exc.reason, retry=True)
            self._leases.release(holder)
        lease = await self._lease(holder)
        conn = cast(asyncssh.SSHClientConnection, lease.conn)
        return await _opened_or_closed(open_on(conn), discard)

    def close(self) -> None:
        """The client connection is gone: forwarding channels still being opened are
        cancelled, every lease goes back to the pool."""
        self._leases.release_all()
        self._dedicated.close()  # its listeners in the sandbox go with it
        for listener in list(self._remote):
            listener.close()
        for task in list(self._opening):
            task.cancel()
        # asyncssh ended every session it had opened before it told us (connection_lost);
        # those still here were asked for but never opened, and no callback will come.
        for session in list(self._sessions):
            self._drop_prepared(session)
            self._sessions.discard(session)
            metrics.CHANNELS_ACTIVE.labels("session").dec()

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
