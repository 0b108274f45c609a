"""Relay of one session channel between the user's client and the sandbox.

asyncssh's built-in tunnelling of sessions drops exit status and refuses sftp, so the relay is
a hand-written pair: ``ClientSide`` (an SSHServerSession facing the user) and ``SandboxSide``
(an SSHClientSession facing the sandbox). Whatever the client asks for (pty, shell, exec, any
subsystem, env) is replayed on an upstream channel; data, EOF, window changes, signals, break,
exit status and exit signal flow back and forth. Flow control is end to end: when one side's
send buffer fills, the other side stops reading, which stops SSH window adjusts, which pushes
back on the sender. A send buffer also fills while its connection's TCP socket is full
(gateway/asyncssh_patches.py, ``pause-writing-reaches-channels``), so a peer that stops reading
costs at most the session's windows, which it reserves from the process's buffer budget
(gateway/relay/budget.py) when it starts; over budget, the session is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from structlog.typing import FilteringBoundLogger

from gateway import messages
from gateway.errors import UpstreamError
from gateway.relay import budget

# Renders the one stderr line a user sees when the gateway ends a session: (reason code,
# technical detail) -> text. The relay does not know why a user was let in or how the
# product words its errors; the SSH door (gateway/ssh/channels.py) hands this in.
Describe = Callable[[str, str | None], str]

# The documented bound on a session's environment (README, "Works with"): every variable up to
# it is passed to the sandbox whole; a session that asks for more is refused with one stderr
# line (env_too_large), never silently cut. 128 variables is what the sandbox's sshd keeps;
# the byte bound (names + values) stays well under the 256 KiB packet asyncssh accepts.
MAX_ENV_VARS = 128
MAX_ENV_BYTES = 128 * 1024

# A request replayed on the upstream channel once it exists, in the order the client sent it.
Early = Callable[[asyncssh.SSHClientChannel[bytes]], None]


@dataclass(slots=True)
class SessionSummary:
    """What the audit trail records when a session ends."""

    kind: str = "shell"  # shell | exec | subsystem:<name>
    started_at: float = field(default_factory=time.monotonic)
    bytes_up: int = 0  # client -> sandbox
    bytes_down: int = 0  # sandbox -> client
    exit_status: int | None = None
    exit_signal: str | None = None
    reason: str | None = None  # a messages code when the gateway ended it

    @property
    def duration_seconds(self) -> float:
        return time.monotonic() - self.started_at


def env_problem(env: Mapping[bytes, bytes]) -> str | None:
    """Why ``env`` is over the bound (for the user), or None: then it is passed on whole."""
    total = sum(len(key) + len(value) for key, value in env.items())
    if len(env) > MAX_ENV_VARS:
        return f"{len(env)} variables, at most {MAX_ENV_VARS} pass"
    if total > MAX_ENV_BYTES:
        return f"{total} bytes, at most {MAX_ENV_BYTES} pass"
    return None


def filtered_env(env: Any) -> dict[bytes, bytes]:
    """The environment to send upstream: all of it (``env_problem`` refuses what is over)."""
    return dict(env)


class SandboxSide(asyncssh.SSHClientSession[bytes]):
    """The upstream half: what the sandbox says goes to the user's channel."""

    def __init__(self, peer: ClientSide) -> None:
        self._peer = peer
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._peer.deliver(data, datatype)

    def eof_received(self) -> bool:
        self._peer.upstream_eof()
        return True  # keep our side open: the client may still send (half-close)

    def exit_status_received(self, status: int) -> None:
        self._peer.summary.exit_status = status
        self._peer.upstream_exited()

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._peer.exit_signal = (signal, core_dumped, msg, lang)
        self._peer.summary.exit_signal = signal
        self._peer.upstream_exited()

    def connection_lost(self, exc: Exception | None) -> None:
        self._peer.upstream_closed(exc)

    def pause_writing(self) -> None:
        self._peer.pause_client_reading()

    def resume_writing(self) -> None:
        self._peer.resume_client_reading()


class ClientSide(asyncssh.SSHServerSession[bytes]):
    """The user-facing half. Accepts the request, then opens the same thing upstream."""

    def __init__(
        self,
        *,
        upstream: Callable[[], Awaitable[asyncssh.SSHClientConnection]],
        describe: Describe,
        log: FilteringBoundLogger,
        on_end: Callable[[SessionSummary], None],
    ) -> None:
        self._upstream = upstream
        self._describe = describe
        self._log = log
        self._on_end = on_end
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._up_chan: asyncssh.SSHClientChannel[bytes] | None = None
        # Data, EOF, window changes, signals and breaks that arrived before the upstream
        # channel existed, replayed on it in order.
        self._early: list[Early] = []
        # True while the upstream channel's send buffer is over its high-water mark: the
        # client's channel must stay paused whatever else would resume it.
        self._upstream_full = False
        self._pty: tuple[str, tuple[int, int, int, int], dict[int, int]] | None = None
        self._command: str | None = None
        self._subsystem: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._ended = False
        self._upstream_eof = False
        self._exit_reported = False
        self._hold: budget.Hold | None = None
        self.exit_signal: tuple[str, bool, str, str] | None = None
        self.summary = SessionSummary()

    # --- requests from the client (RFC 4254 section 6) ---

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan
        # Hold the client's input until the upstream channel exists; the SSH window then
        # pushes back on the client instead of us buffering without bound.
        chan.pause_reading()

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Mapping[int, int]
    ) -> bool:
        self._pty = (term_type, term_size, dict(term_modes))
        return True

    def shell_requested(self) -> bool:
        self.summary.kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self._command = command
        self.summary.kind = "exec"
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self._subsystem = subsystem
        self.summary.kind = f"subsystem:{subsystem}"
        return True

    def session_started(self) -> None:
        window = self._chan.get_recv_window() if self._chan is not None else None
        self._hold = budget.BUFFERS.reserve(
            budget.relay_cost(window or budget.DEFAULT_WINDOW), "session"
        )
        if self._hold is None:
            code = messages.BUFFER_BUDGET_EXHAUSTED.code
            self._log.warning("session_refused", reason=code)
            self._fail(messages.BUFFER_BUDGET_EXHAUSTED.render(what="session"), code)
            return
        self._hold.tie_to(self)
        problem = env_problem(self._chan.get_environment_bytes()) if self._chan else None
        if problem is not None:
            code = messages.ENV_TOO_LARGE.code
            self._log.warning("session_refused", reason=code, detail=problem)
            self._fail(messages.ENV_TOO_LARGE.render(detail=problem), code)
            return
        self._task = asyncio.get_running_loop().create_task(self._open_upstream())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.summary.bytes_up += len(data)
        if self._up_chan is None:
            # asyncssh resumes reading by itself once exec/shell/subsystem is accepted, before
            # the upstream channel exists: hold at most this packet, leave the rest unread
            # (the SSH window then pushes back on the client).
            self._early.append(lambda up: up.write(data, datatype))
            if self._chan is not None:
                self._chan.pause_reading()
        else:
            self._up_chan.write(data)

    def eof_received(self) -> bool:
        if self._up_chan is None:
            self._early.append(lambda up: up.write_eof())
        else:
            self._up_chan.write_eof()
        return True  # half-close: the sandbox may still answer

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._pty is not None:
            self._pty = (self._pty[0], (width, height, pixwidth, pixheight), self._pty[2])
        if self._up_chan is not None:
            self._up_chan.change_terminal_size(width, height, pixwidth, pixheight)
        else:  # the pty request upstream may already be on its way with the old size
            self._early.append(
                lambda up: up.change_terminal_size(width, height, pixwidth, pixheight)
            )

    def break_received(self, msec: int) -> bool:
        if self._up_chan is None:
            self._early.append(lambda up: up.send_break(msec))
        else:
            self._up_chan.send_break(msec)
        return True

    def signal_received(self, signal: str) -> None:
        if self._up_chan is not None:
            self._up_chan.send_signal(signal)
        else:
            self._early.append(lambda up: up.send_signal(signal))

    def pause_writing(self) -> None:
        if self._up_chan is not None:
            self._up_chan.pause_reading()

    def resume_writing(self) -> None:
        if self._up_chan is not None:
            self._up_chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """The user's channel is gone (closed, or the whole connection dropped)."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._up_chan is not None:
            self._up_chan.close()
        self._finish()

    # --- called by SandboxSide ---

    def deliver(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._chan is None or self._closed:
            return
        self.summary.bytes_down += len(data)
        self._chan.write(data, datatype)

    # Ordering matters to OpenSSH clients: a ControlMaster closes a mux session as soon as it
    # has seen EOF both ways, so the exit status must reach the client no later than our EOF.
    # asyncssh reports the exit status as soon as it arrives but EOF only after all data before
    # it was delivered; so we hold the sandbox's EOF until the exit is known, then send
    # EOF + exit-status + close together (``_report_exit``).

    def upstream_eof(self) -> None:
        self._upstream_eof = True
        if self._exit_known():
            self._report_exit()

    def upstream_exited(self) -> None:
        if self._upstream_eof:
            self._report_exit()

    def _exit_known(self) -> bool:
        return self.exit_signal is not None or self.summary.exit_status is not None

    def _report_exit(self) -> None:
        chan = self._chan
        if chan is None or self._closed or self._exit_reported:
            return
        self._exit_reported = True
        chan.write_eof()
        if self.exit_signal is not None:
            signal, core, msg, lang = self.exit_signal
            chan.exit_with_signal(signal, core, msg, lang)
        elif self.summary.exit_status is not None:
            chan.exit(self.summary.exit_status)
        else:
            chan.close()

    def upstream_closed(self, exc: Exception | None) -> None:
        """The sandbox closed its channel: every byte has been delivered; report the exit."""
        chan = self._chan
        if chan is None or self._closed or self._exit_reported:
            return
        if self._exit_known() or exc is None:
            self._report_exit()
        else:
            self._fail_code(messages.UPSTREAM_REFUSED.code, "connection lost")

    def pause_client_reading(self) -> None:
        self._upstream_full = True
        if self._chan is not None and not self._closed:
            self._chan.pause_reading()

    def resume_client_reading(self) -> None:
        self._upstream_full = False
        if self._chan is not None and not self._closed:
            self._chan.resume_reading()

    # --- internals ---

    async def _open_upstream(self) -> None:
        assert self._chan is not None
        chan = self._chan
        try:
            conn = await self._upstream()
            kwargs: dict[str, Any] = {
                "env": filtered_env(chan.get_environment_bytes()),
                "encoding": None,
                # The same window as the client's leg: what relay_cost() reserved for.
                "window": chan.get_recv_window(),
            }
            if self._pty is not None:
                term_type, term_size, term_modes = self._pty
                kwargs.update(
                    request_pty="force",
                    term_type=term_type,
                    term_size=term_size,
                    term_modes=term_modes,
                )
            else:
                kwargs["request_pty"] = False
            if self._subsystem is not None:
                kwargs["subsystem"] = self._subsystem
            up_chan, _ = await conn.create_session(
                lambda: SandboxSide(self), self._command, **kwargs
            )
        except UpstreamError as exc:
            self._fail_code(exc.reason_code, exc.detail)
            return
        except asyncssh.ChannelOpenError as exc:
            if self._subsystem is not None and exc.code == asyncssh.OPEN_REQUEST_SESSION_FAILED:
                # The channel opened; the sandbox's sshd has no such subsystem.
                code = messages.UNKNOWN_SUBSYSTEM.code
                self._fail(messages.UNKNOWN_SUBSYSTEM.render(name=self._subsystem[:64]), code)
                return
            self._fail_code(messages.UPSTREAM_REFUSED.code, exc.reason)
            return
        except (OSError, asyncssh.Error) as exc:
            self._log.warning("upstream_session_failed", error=str(exc))
            self._fail_code(messages.UPSTREAM_REFUSED.code, type(exc).__name__)
            return
        if self._closed:
            up_chan.close()
            return
        self._up_chan = up_chan
        early, self._early = self._early, []
        for request in early:
            request(up_chan)
        if not self._upstream_full:  # flushing _pending may already have filled the upstream
            chan.resume_reading()

    def _fail_code(self, reason: str, detail: str | None) -> None:
        self._fail(self._describe(reason, detail), reason)

    def _fail(self, text: str, reason: str) -> None:
        """One line on stderr, nothing on stdout, exit 255."""
        self.summary.reason = reason
        self.summary.exit_status = messages.GATEWAY_EXIT_STATUS
        if self._up_chan is not None:
            self._up_chan.close()
        chan = self._chan
        if chan is None or self._closed or self._exit_reported:
            return
        self._exit_reported = True
        chan.write_stderr(text.encode() + b"\r\n" if self._pty else text.encode() + b"\n")
        chan.exit(messages.GATEWAY_EXIT_STATUS)

    def _finish(self) -> None:
        if self._hold is not None:
            self._hold.release()
        if not self._ended:
            self._ended = True
            self._on_end(self.summary)

    def close(self, text: str, reason: str) -> None:
        """End the session from the gateway's side (drain deadline, key revoked)."""
        self._fail(text, reason)
