"""The SSH door: a thin asyncssh ``SSHServer`` adapter, one per client TCP connection.

Each callback is named after the RFC message it answers and hands the work to the part that
owns it: the auth decision (gateway/ssh/auth.py, a pure function fed by an injected
``AccessSource``), the live-connection registry (gateway/ssh/registry.py), and, once
authenticated, the connection's channels (gateway/ssh/channels.py), which lease shared upstream
connections (gateway/upstream/pool.py) and relay bytes (gateway/relay/). Several client
connections of one organization multiplex their channels on the same warm upstream connection
to a sandbox; this class never talks to the sandbox itself.
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

from gateway import messages
from gateway.daemon import metrics
from gateway.ssh import quotas
from gateway.ssh.admission import Refusal, Ticket
from gateway.ssh.auth import (
    Accept,
    LoginLookup,
    Refuse,
    canonical_line,
    decide,
    decide_certificate,
    look_up,
    presented_certificate,
)
from gateway.ssh.channels import Channels
from gateway.ssh.registry import Identity
from gateway.ssh.runtime import Runtime
from gateway.upstream.target import Target
from keystore import ssh_keys
from keystore.audit_events import AuditEvent
from keystore.errors import Unavailable
from keystore.keys import login_key_problem
from keystore.models import AuthorizedKey
from keystore.printable import printable as _printable

_log = structlog.get_logger("gateway.ssh")
_PID = os.getpid()  # workers are separate processes started by exec, never forked copies


def new_conn_id() -> str:
    return secrets.token_hex(6)


def printable(text: str) -> str:
    """A client-supplied login name made safe for banners, logs and audit rows (<= 80 chars)."""
    return _printable(text, limit=80)


class GatewayConnection(asyncssh.SSHServer):
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._conn_id = new_conn_id()
        self.log: FilteringBoundLogger = _log.bind(conn_id=self._conn_id, pid=_PID)
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer: str | None = None
        self._peer_port: int | None = None
        self._ticket: Ticket | None = None
        self._kex_timer: asyncio.TimerHandle | None = None
        self._lookups: dict[str, LoginLookup] = {}  # one lookup per login name per connection
        self._lookup: LoginLookup | None = None
        self._accepted: Accept | None = None
        self._channels: Channels | None = None
        self._offered = False  # a key was offered (so a failure is not the initial 'none')
        self._failures = 0  # failed attempts counted toward ssh.max_auth_tries
        self._refusals: dict[str, int] = {}  # reason code -> refused keys, for one audit row
        self._fingerprints: list[str] = []  # the first few refused keys, for that row
        self._gateway_fault = False  # refused for a reason of ours: no penalty for the source
        self._banner_sent = False
        self._hint_due = False  # a refused key earned the registration hint
        self._pinned: Target | None = None  # the sandbox whose upstream this client keeps warm
        self._started = time.monotonic()

    @property
    def conn_id(self) -> str:
        return self._conn_id

    @property
    def authenticated(self) -> bool:
        return self._channels is not None

    @property
    def session_count(self) -> int:
        return self._channels.session_count if self._channels is not None else 0

    # --- connection lifecycle ---

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        # With the PROXY protocol on, peername is the client the load balancer named.
        peer = conn.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else None
        self._peer_port = int(peer[1]) if peer else None
        self.log = self.log.bind(peer=self._peer)
        rt = self._rt
        # Admission costs no crypto: address parsing and dict lookups, before key exchange.
        verdict: Ticket | Refusal | None = None if rt.draining else rt.admission.admit(self._peer)
        if not isinstance(verdict, Ticket):
            # Too early for a DISCONNECT message (no version exchange yet): just drop it.
            reason = "gateway_draining" if verdict is None else verdict.code
            metrics.CONNECTIONS.labels(reason).inc()
            source = str(verdict.source) if verdict is not None else (self._peer or "")
            allowed, suppressed = rt.drop_log_limit.allow(f"{source} {reason}")
            if allowed:  # one line per source and reason at most every few seconds
                self.log.warning(
                    "connection_dropped",
                    reason=reason,
                    source=source,
                    retry_after=verdict.retry_after if verdict is not None else None,
                    suppressed_before=suppressed or None,
                )
            conn.abort()
            return
        self._ticket = verdict
        grace = rt.admission.settings.kex_grace_seconds
        self._kex_timer = asyncio.get_running_loop().call_later(grace, self._kex_grace_over)
        metrics.CONNECTIONS.labels("accepted").inc()
        metrics.CONNECTIONS_OPEN.labels("unauthenticated").inc()
        rt.registry.add(self)
        self.log.info("connection_open", peer_port=self._peer_port)

    def _kex_grace_over(self) -> None:
        """Key exchange not done within admission.kex_grace_seconds: drop, penalize."""
        ticket = self._ticket
        if ticket is not None and ticket.kex_pending and self._conn is not None:
            ticket.grace_exceeded()
            self.log.warning("connection_dropped", reason="kex_grace_exceeded")
            metrics.CONNECTIONS.labels("kex_grace_exceeded").inc()
            self._conn.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._kex_timer is not None:
            self._kex_timer.cancel()
        ticket = self._ticket
        if ticket is not None and not ticket.is_authenticated:
            if exc is not None and "login timeout" in str(exc).lower():
                ticket.grace_exceeded()
            penalty = ticket.closed(penalize=not (self._gateway_fault or self._rt.draining))
            if penalty is not None:
                metrics.PENALTIES.labels(penalty).inc()
            self._audit_refused_connection(penalty)
        elif ticket is not None:
            ticket.closed()
        registry = self._rt.registry
        if self in registry:
            state = "authenticated" if self.authenticated else "unauthenticated"
            metrics.CONNECTIONS_OPEN.labels(state).dec()
            registry.remove(self)
        if self._rt.revocation is not None:
            self._rt.revocation.forget(self)
        if self._channels is not None:
            self._channels.close()  # the shared upstream connections stay for other clients
        if self._pinned is not None and self._rt.upstream_pool is not None:
            self._rt.upstream_pool.unpin(self._pinned)
            self._pinned = None
        self.log.info(
            "connection_closed",
            error=str(exc) if exc else None,
            authenticated=self.authenticated,
            duration_seconds=round(time.monotonic() - self._started, 3),
        )

    # --- authentication (RFC 4252) ---

    async def begin_auth(self, username: str) -> bool:
        # Called again whenever the client switches login name mid-auth: forget everything
        # decided for the previous name, or a key accepted for one org's sandbox could
        # complete a login to another's.
        self._lookup = None
        self._accepted = None
        if self._ticket is not None:
            self._ticket.kex_completed()
        cached = self._lookups.get(username)
        if cached is None:
            if len(self._lookups) >= self._rt.config.admission.max_login_names:
                self._failures += 1
                if self._ticket is not None:
                    self._ticket.auth_failed()
                self._count_refusal(messages.TOO_MANY_LOGIN_NAMES.code, None)
                raise asyncssh.PermissionDenied(messages.TOO_MANY_LOGIN_NAMES.render())
            t0 = time.perf_counter()
            cached = await look_up(username, self._rt.access_source())
            elapsed = time.perf_counter() - t0
            self._lookups[username] = cached
            if cached.sandbox_id is not None:
                metrics.AUTH_DECISION.observe(elapsed)
                self.log.debug("auth_lookup", sandbox=cached.sandbox_id, seconds=round(elapsed, 6))
        lookup = cached
        if lookup.sandbox_id is not None:
            self.log = self.log.bind(sandbox=lookup.sandbox_id)
        self._gateway_fault = lookup.refusal == messages.KEYSTORE_UNAVAILABLE.code
        self._lookup = lookup
        if lookup.refusal == messages.INVALID_LOGIN_NAME.code:
            self._banner(messages.INVALID_LOGIN_NAME.render(login=printable(username)))
        elif lookup.refusal == messages.KEYSTORE_UNAVAILABLE.code:
            self.log.error("keystore_unavailable", error=lookup.error)
            self._banner(messages.KEYSTORE_UNAVAILABLE.render())
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Called for the unsigned query and again with the signature; both answered from the
        # access data of the current login name, looked up once in begin_auth.
        #
        # What the answer to the unsigned query reveals, as with OpenSSH: whether this key
        # opens this login name (the client learns it before proving it holds the private
        # key). An unknown sandbox and another organization's sandbox answer the same, and
        # admission.max_login_names bounds how many names one connection can probe; failed
        # attempts count toward ssh.max_auth_tries and penalize the source. Nothing happens
        # upstream until a signature verified (auth_completed).
        self._offered = True
        lookup = self._lookup or LoginLookup(username, None, None, messages.INVALID_LOGIN_NAME.code)
        fingerprint = key.get_fingerprint("sha256")
        problem = login_key_problem(key)  # hostile RSA sizes cost CPU on every verify
        decision = (
            Refuse(problem)
            if problem is not None
            else decide(lookup, fingerprint, canonical_line(key))
        )
        if isinstance(decision, Accept):
            self._accepted = decision
            return True
        self._refuse(decision, fingerprint)
        return False

    def validate_certificate(self, username: str, cert: asyncssh.SSHCertificate) -> bool:
        """An OpenSSH user certificate offered (gateway/asyncssh_patches.py
        'certificate-decision-by-owner'): decided like a key, from the same access data, by
        gateway/ssh/auth.py ``decide_certificate``. Called for the unsigned query and again
        with the signature, as validate_public_key is."""
        self._offered = True
        lookup = self._lookup or LoginLookup(username, None, None, messages.INVALID_LOGIN_NAME.code)
        presented = presented_certificate(cert)
        problem = login_key_problem(cert.key)
        decision = (
            Refuse(problem)
            if problem is not None
            else decide_certificate(lookup, presented, time.time())
        )
        if isinstance(decision, Accept):
            self._accepted = decision
            return True
        self._refuse(decision, presented.key_fingerprint)
        return False

    def userauth_failed(self) -> None:
        """After every USERAUTH_FAILURE (gateway/asyncssh_patches.py 'userauth-failure-hook'):
        refused keys, bad signatures, certificates, unknown key blobs, 'none' and other
        methods all count toward ssh.max_auth_tries, except the client's first 'none' probe
        (which only asks for the methods, as OpenSSH does not count it either)."""
        if not self._offered and self._failures == 0 and not self._refusals.get("none_probe"):
            self._refusals["none_probe"] = 1
            return
        self._failures += 1
        if self._ticket is not None:
            self._ticket.auth_failed()
        if self._failures >= self._rt.config.ssh.max_auth_tries and self._conn is not None:
            text = messages.TOO_MANY_AUTH_FAILURES.render(
                hint=self._rt.config.ssh.register_key_hint
            )
            conn = self._conn
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, text
            )

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        # Offered only once a key was refused for a reason the registration hint answers: a
        # client whose keys are all refused then tries keyboard-interactive last (OpenSSH does,
        # outside BatchMode), and that attempt shows the hint before the final failure. A
        # login that succeeds with a later key never sees it.
        return self._hint_due and not self._banner_sent

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> bool:
        self._banner(messages.KEY_NOT_REGISTERED.render(hint=self._rt.config.ssh.register_key_hint))
        return False

    def auth_completed(self) -> None:
        accepted = self._accepted
        assert accepted is not None
        sandbox, key = accepted.sandbox, accepted.key
        if self._kex_timer is not None:
            self._kex_timer.cancel()
        if self._ticket is not None:
            self._ticket.authenticated()
        cert = accepted.certificate
        identity = Identity(
            sandbox.org_id,
            sandbox.id,
            key.id,
            key.fingerprint,
            cert_key_id=cert.key_id if cert is not None else None,
            cert_serial=cert.serial if cert is not None else None,
            cert_principals=cert.via_principals if cert is not None else None,
        )
        refusal = quotas.check_connection(self._rt.registry, identity, self._rt.config.quotas, self)
        if refusal is not None:
            metrics.QUOTA_REFUSALS.labels(refusal.code).inc()
            self.log.warning(
                "connection_refused",
                reason=refusal.code,
                limit=refusal.limit,
                holding=refusal.count,
            )
            self._audit_auth("refused", refusal.code, key.fingerprint)
            if self._conn is not None:
                asyncio.get_running_loop().call_soon(
                    self._conn.disconnect, asyncssh.DISC_TOO_MANY_CONNECTIONS, refusal.text
                )
            return
        revocation = self._rt.revocation
        self._channels = Channels(
            self._rt,
            conn_id=self._conn_id,
            accepted=accepted,
            peer=self._peer,
            peer_port=self._peer_port,
            log=self.log,
            on_idle_while_draining=self.close,
            admit=(lambda: revocation.check_channel(self, identity)) if revocation else None,
        )
        if self in self._rt.registry:
            metrics.CONNECTIONS_OPEN.labels("unauthenticated").dec()
            metrics.CONNECTIONS_OPEN.labels("authenticated").inc()
            self._rt.registry.authenticated(self, identity)
            if revocation is not None:
                revocation.track(self, key.expires_at, sandbox.status == "running")
        self.log = self.log.bind(org=sandbox.org_slug, key=key.fingerprint)
        if cert is not None:
            self.log = self.log.bind(
                cert_key_id=printable(cert.key_id), cert_serial=cert.serial, ca=cert.ca_fingerprint
            )
        self._audit_auth("ok", None, key.fingerprint)
        self.log.info("auth_ok", failed_attempts=self._failures)
        asyncio.get_running_loop().create_task(self._touch_key(sandbox.org_id, key))
        if sandbox.status == "running" and self._rt.upstream_pool is not None:
            # The signature verified: only now may the gateway do work upstream.
            target = Target.of(sandbox)
            self._pinned = target
            self._rt.upstream_pool.pin(target)
            self._rt.upstream_pool.warm(target)

    async def _touch_key(self, org_id: Any, key: AuthorizedKey) -> None:
        with contextlib.suppress(Unavailable):
            await ssh_keys.touch_last_used(self._rt.db, org_id, key.id)

    def _refuse(self, decision: Refuse, fingerprint: str) -> None:
        """A key refused: counted for the connection's one audit row, not written per key."""
        self._count_refusal(decision.reason, fingerprint)
        self.log.debug("auth_refused", reason=decision.reason, fingerprint=fingerprint)
        metrics.AUTH.labels("refused", decision.reason).inc()
        if decision.shows_registration_hint:
            self._hint_due = True  # shown when the client runs out of keys (kbdint_auth_supported)

    def _count_refusal(self, reason: str, fingerprint: str | None) -> None:
        self._refusals[reason] = self._refusals.get(reason, 0) + 1
        if fingerprint is not None and fingerprint not in self._fingerprints:
            if len(self._fingerprints) < 10:
                self._fingerprints.append(fingerprint)

    def _audit_refused_connection(self, penalty: str | None) -> None:
        """One audit row per refused connection, with its counts (rate limited per source)."""
        refusals = {k: v for k, v in self._refusals.items() if k != "none_probe"}
        if not refusals and self._failures == 0 and self._lookup is None:
            return  # never tried to authenticate (scanner, health check): logs and metrics only
        source = str(self._ticket.source) if self._ticket is not None else (self._peer or "")
        allowed, suppressed = self._rt.audit_limit.allow(source)
        if not allowed:
            metrics.AUDIT_SUPPRESSED.inc()
            return
        reason = max(refusals, key=lambda k: refusals[k]) if refusals else "no_key_accepted"
        lookup = self._lookup
        sandbox = lookup.access.sandbox if lookup is not None and lookup.access else None
        self.log.info("auth", result="refused", reason=reason, attempts=self._failures)
        self._rt.audit.record(
            AuditEvent(
                action="ssh.auth",
                result="refused",
                reason=reason,
                org_id=sandbox.org_id if sandbox else None,
                actor=self._fingerprints[0] if self._fingerprints else None,
                target=(lookup.sandbox_id if lookup else None)
                or (printable(lookup.login) if lookup else ""),
                source_ip=self._peer,
                details={
                    "conn_id": self._conn_id,
                    "source_port": self._peer_port,
                    "org": sandbox.org_slug if sandbox else None,
                    "logins": [printable(name) for name in self._lookups],
                    "failed_attempts": self._failures,
                    "refusals": refusals,
                    "fingerprints": self._fingerprints,
                    "penalty": penalty,
                    "suppressed_before": suppressed or None,
                },
            )
        )

    # --- channels (RFC 4254) ---

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        if self._channels is None:
            return False
        return self._channels.open_session() or False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        if self._channels is None or self._conn is None:
            return False
        return self._channels.open_direct_tcpip(self._conn, dest_host, dest_port) or False

    def unix_connection_requested(self, dest_path: str) -> Any:
        """``ssh -L /local.sock:/remote.sock`` (direct-streamlocal@openssh.com)."""
        if self._channels is None:
            return False
        return self._channels.open_direct_streamlocal(dest_path) or False

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """``ssh -R``: a listener in the sandbox on this client's own upstream connection."""
        if self._channels is None or self._conn is None:
            return False
        self._channels.bind_client(self._conn)
        return self._channels.open_remote(listen_host, listen_port)

    def unix_server_requested(self, listen_path: str) -> Any:
        """``ssh -R /remote.sock:...`` (streamlocal-forward@openssh.com)."""
        if self._channels is None or self._conn is None:
            return False
        self._channels.bind_client(self._conn)
        return self._channels.open_remote_unix(listen_path)

    # --- what the daemon and the registry's users may do (registry.LiveConnection) ---

    def notify_sessions(self, text: str) -> None:
        """One stderr line on every live session, which goes on (drain has begun)."""
        if self._channels is not None:
            self._channels.notify_sessions(text)

    def close_sessions(self, text: str, reason: str) -> None:
        if self._channels is not None:
            self._channels.close_sessions(text, reason)

    def close(self) -> None:
        """Close the SSH connection (after its sessions were told and closed)."""
        if self._conn is not None:
            self._conn.close()

    # --- helpers ---

    def _banner(self, text: str) -> None:
        if self._banner_sent or self._conn is None:
            return
        self._banner_sent = True
        self._conn.send_auth_banner(text + "\n")

    def _audit_auth(self, result: str, reason: str | None, fingerprint: str) -> None:
        lookup = self._lookup
        sandbox = lookup.access.sandbox if lookup is not None and lookup.access else None
        login = printable(lookup.login) if lookup is not None else ""
        self.log.info("auth", result=result, reason=reason, fingerprint=fingerprint)
        metrics.AUTH.labels(result, reason or "ok").inc()
        self._rt.audit.record(
            AuditEvent(
                action="ssh.auth",
                result=result,
                reason=reason,
                org_id=sandbox.org_id if sandbox else None,
                actor=fingerprint,
                target=(lookup.sandbox_id if lookup else None) or login,
                source_ip=self._peer,
                details={
                    "conn_id": self._conn_id,
                    "source_port": self._peer_port,
                    "org": sandbox.org_slug if sandbox else None,
                    "login": login,
                    "failed_attempts": self._failures,
                    **self._certificate_details(),
                },
            )
        )

    def _certificate_details(self) -> dict[str, Any]:
        """Which certificate logged in, for the audit row (nothing for a plain key)."""
        accepted = self._accepted
        cert = accepted.certificate if accepted is not None else None
        if cert is None:
            return {}
        return {
            "certificate": {
                "ca_id": str(cert.ca_id),
                "ca_fingerprint": cert.ca_fingerprint,
                "key_id": printable(cert.key_id),
                "serial": str(cert.serial),
                "principals": [printable(p) for p in cert.principals[:8]],
            }
        }


def admission_gate(rt: Runtime) -> Callable[[str | None], str | None]:
    """The listener's cheap pre-check (gateway/ssh/proxy_protocol.py ``Gate``): a source that is
    penalized, or already holds its share of unauthenticated connections, is dropped before
    asyncssh builds anything for it. The full decision is still ``connection_made``'s."""

    def gate(peer: str | None) -> str | None:
        admission = rt.admission
        if rt.draining:
            return "gateway_draining"
        if admission.is_penalized(peer):
            code = "source_penalized"
        elif (
            admission.unauthenticated_from(peer)
            >= admission.settings.max_unauthenticated_per_source
        ):
            code = "too_many_unauthenticated_from_source"
        else:
            return None
        metrics.CONNECTIONS.labels(code).inc()
        return code

    return gate
