"""A real OpenSSH ``sshd`` on a loopback port, standing in for a sandbox's SSH endpoint.

Used by the integration tests, the bench and ``runtools-gateway demo``:

    with SandboxSshd(authorized_keys=[gateway_public_key_line]) as sandbox:
        connect to sandbox.host:sandbox.port as sandbox.login_user, pinning sandbox.host_key_line

Everything it needs (config, host key, ``authorized_keys``, log) lives in one temp dir that
``stop()`` deletes. When this process is root and no ``login_user`` is given, logins go to a
dedicated ``rtsandbox`` user whose shell is ``/bin/sh`` (root's shell start-up on these machines
is slow, and the sandbox should not be entered as root by default).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from gateway.lab.host import free_port, log_tail, make_traversable

__all__ = ["DEFAULT_ROOT_LOGIN_USER", "SandboxSshd"]

DEFAULT_ROOT_LOGIN_USER = "rtsandbox"
_USER_SETUP_LOCK = "/run/lock/rtgw-rtsandbox.lock"
_SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
_PORT_ATTEMPTS = 3
_TERMINATE_GRACE_SECONDS = 5.0
_PORT_IN_USE = re.compile(r"address already in use|cannot bind any address", re.I)
# Paths go into sshd_config unquoted (and AuthorizedKeysFile is %-expanded): keep them plain.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+-]+$")
_ssh_version_cache: dict[str, tuple[int, int] | None] = {}
_LOG_LEVELS = ("QUIET", "FATAL", "ERROR", "INFO", "VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3")


def _find_sshd() -> str:
    for candidate in _SSHD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("sshd")
    if found is None:
        raise RuntimeError("OpenSSH sshd not found (looked in /usr/sbin, /usr/local/sbin, PATH)")
    # sshd re-executes itself and insists on an absolute path.
    return os.path.abspath(found)


def _sshd_version(sshd: str) -> tuple[int, int] | None:
    """(major, minor) from ``sshd -V``, or None when it cannot be told."""
    if sshd not in _ssh_version_cache:
        version: tuple[int, int] | None = None
        try:
            out = subprocess.run(
                [sshd, "-V"], capture_output=True, text=True, timeout=10, check=False
            )
            match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
            if match:
                version = (int(match.group(1)), int(match.group(2)))
        except (OSError, subprocess.TimeoutExpired):
            pass
        _ssh_version_cache[sshd] = version
    return _ssh_version_cache[sshd]


def _answers_ssh_banner(host: str, port: int, timeout: float) -> bool:
    """True if ``host:port`` accepts a TCP connection and sends an ``SSH-2.0-`` line."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 1024:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    # RFC 4253 lets a server send other lines before its identification string.
    return any(line.startswith(b"SSH-2.0-") for line in data.split(b"\n"))


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state, ppid, ...), or None."""
    try:
        stat_line = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return None
    return stat_line.rpartition(")")[2].split()


# A process is identified by (pid, start time) so a recycled pid is never signalled.
_ProcessId = tuple[int, str]


def _children(pid: int) -> list[_ProcessId]:
    """Direct children of ``pid`` (Linux ``/proc``); empty where that cannot be read."""
    children: list[_ProcessId] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _proc_stat_fields(int(entry))
        # fields[1] is the ppid, fields[19] the start time (stat fields 4 and 22).
        if fields is not None and len(fields) > 19 and fields[1] == str(pid):
            children.append((int(entry), fields[19]))
    return children


def _alive(process: _ProcessId) -> bool:
    """True while the process runs (not gone, not a zombie, pid not recycled)."""
    fields = _proc_stat_fields(process[0])
    return fields is not None and len(fields) > 19 and fields[19] == process[1] and fields[0] != "Z"


def _signal(process: _ProcessId, signum: signal.Signals) -> None:
    if _alive(process):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process[0], signum)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_admin(argv: list[str]) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{argv[0]} failed: {exc}") from exc
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed (exit {result.returncode}): {result.stderr.strip()}"
        )


def _shadow_password_field(user: str) -> str | None:
    try:
        with open("/etc/shadow") as f:
            for line in f:
                fields = line.split(":")
                if fields[0] == user and len(fields) > 1:
                    return fields[1]
    except OSError:
        return None
    return None


def ensure_sandbox_user(name: str = DEFAULT_ROOT_LOGIN_USER) -> pwd.struct_passwd:
    """Make sure the dedicated login user exists and can log in with a key (root only).

    Creates it with ``/bin/sh`` as shell and ``/var/lib/<name>`` as home if missing; sets its
    password field to ``*`` (``UsePAM no`` sshd refuses *locked* accounts, ``*`` is merely
    "no password"); creates its home if missing. Safe to run concurrently.
    """
    if os.geteuid() != 0:
        raise RuntimeError("creating the sandbox login user needs root")
    with _file_lock(_USER_SETUP_LOCK):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            _run_admin(["useradd", "-M", "-d", f"/var/lib/{name}", "-s", "/bin/sh", name])
            pw = pwd.getpwnam(name)
        if _shadow_password_field(name) != "*":
            _run_admin(["usermod", "-p", "*", name])
        if not os.path.isdir(pw.pw_dir):
            os.makedirs(pw.pw_dir, mode=0o755, exist_ok=True)
            os.chown(pw.pw_dir, pw.pw_uid, pw.pw_gid)
        return pw


class SandboxSshd:
    """A throwaway OpenSSH ``sshd`` listening on 127.0.0.1, trusting the given keys.

    :param authorized_keys: ``authorized_keys`` lines (e.g. ``"ssh-ed25519 AAAA... comment"``).
    :param login_user: the account sessions run as. Default: ``rtsandbox`` (created if needed)
        when running as root, else the current user.
    :param base_dir: where to create the temp dir (default: the system temp dir). The login user
        must be able to reach it (``authorized_keys`` is read with its uid): when running as
        root, parents get the others-search bit, and must keep it while sshd runs (pytest's
        ``tmp_path`` does not: each pytest run resets ``/tmp/pytest-of-root`` to 0700).
    :param max_sessions: ``MaxSessions`` (sessions per connection).
    :param extra_config: extra ``sshd_config`` lines, appended after the generated ones. sshd
        uses the *first* value it reads for most keywords, so these add settings rather than
        override generated ones.
    :param trusted_user_ca_keys: CA public key lines for ``TrustedUserCAKeys`` (user
        certificates signed by them log in as a listed principal); none by default.
    :param log_level: sshd's ``LogLevel``; ``VERBOSE`` also logs each accepted certificate's
        key id and serial.
    :param host_ca_key: a CA private key file (mode 0600): the host key is certified by it
        (``ssh-keygen -s``) for ``host_certificate_principals`` and served with
        ``HostCertificate``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        authorized_keys: Sequence[str],
        login_user: str | None = None,
        base_dir: str | None = None,
        max_sessions: int = 32,
        extra_config: Sequence[str] = (),
        trusted_user_ca_keys: Sequence[str] = (),
        log_level: str = "INFO",
        host_ca_key: str | None = None,
        host_certificate_principals: Sequence[str] = ("127.0.0.1",),
    ) -> None:
        if isinstance(authorized_keys, str):
            raise TypeError("authorized_keys must be a sequence of lines, not a str")
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self._authorized_keys = self._check_lines(authorized_keys)
        if isinstance(trusted_user_ca_keys, str):
            raise TypeError("trusted_user_ca_keys must be a sequence of lines, not a str")
        self._trusted_user_ca_keys = self._check_lines(trusted_user_ca_keys)
        if log_level.upper() not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        self._log_level = log_level.upper()
        self._host_ca_key = host_ca_key
        self._host_certificate_principals = [str(p) for p in host_certificate_principals]
        self._explicit_login_user = login_user is not None
        if login_user is not None:
            self._login_user = login_user
        elif os.geteuid() == 0:
            self._login_user = DEFAULT_ROOT_LOGIN_USER
        else:
            self._login_user = getpass.getuser()
        self._base_dir = base_dir
        self._max_sessions = max_sessions
        self._extra_config = [str(line) for line in extra_config]
        for line in self._extra_config:
            if "\n" in line or "\r" in line:
                raise ValueError(f"extra_config line contains a newline: {line!r}")
        self._lock = threading.Lock()
        self._work_dir: str | None = None
        self._port: int | None = None
        self._host_key_line: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port sshd listens on; only valid after ``start()``."""
        if self._port is None:
            raise RuntimeError("SandboxSshd is not running; call start() first")
        return self._port

    @property
    def login_user(self) -> str:
        """The account to log in as."""
        return self._login_user

    @property
    def host_key_line(self) -> str:
        """The host public key, ``"ssh-ed25519 AAAA..."`` (no comment); valid after ``start()``."""
        if self._host_key_line is None:
            raise RuntimeError("SandboxSshd is not running; call start() first")
        return self._host_key_line

    @property
    def known_hosts_line(self) -> str:
        """A ``known_hosts`` line for this server: ``"[127.0.0.1]:PORT ssh-ed25519 AAAA..."``."""
        return f"[{self.host}]:{self.port} {self.host_key_line}"

    @property
    def log_path(self) -> str:
        """sshd's log (its stderr, ``-e``); valid after ``start()`` until ``stop()``."""
        if self._work_dir is None:
            raise RuntimeError("SandboxSshd is not running; call start() first")
        return os.path.join(self._work_dir, "sshd.log")

    @property
    def work_dir(self) -> str | None:
        """The temp dir holding config, keys and log; None when stopped."""
        return self._work_dir

    @property
    def pid(self) -> int | None:
        """The listening sshd's process id while it runs, else None."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout_seconds: float = 15.0) -> None:
        """Write config, host key and ``authorized_keys``, start sshd and wait for its banner.

        Does nothing if already running. On failure everything is cleaned up and
        ``RuntimeError`` is raised with the tail of sshd's log.
        """
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return
            self._stop_locked()
            deadline = time.monotonic() + timeout_seconds
            try:
                self._start(deadline)
            except BaseException:
                self._stop_locked()
                raise

    def stop(self) -> None:
        """Stop sshd (SIGTERM, SIGKILL after 5 s) and its session processes; delete the temp dir.

        Safe to call more than once and before or after a failed ``start()``.
        """
        with self._lock:
            self._stop_locked()

    def set_authorized_keys(self, lines: Sequence[str]) -> None:
        """Replace the trusted keys. sshd reads the file at every login, so no restart needed."""
        if isinstance(lines, str):
            raise TypeError("lines must be a sequence of lines, not a str")
        with self._lock:
            self._authorized_keys = self._check_lines(lines)
            if self._work_dir is not None:
                self._write_authorized_keys()

    def __enter__(self) -> SandboxSshd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port} pid={self.pid}" if self._port is not None else "stopped"
        return f"<SandboxSshd {state} user={self._login_user!r}>"

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _check_lines(lines: Sequence[str]) -> list[str]:
        checked = [str(line).strip() for line in lines]
        for line in checked:
            if "\n" in line or "\r" in line:
                raise ValueError(f"authorized_keys entry contains a newline: {line[:60]!r}")
        return checked

    def _start(self, deadline: float) -> None:
        sshd = _find_sshd()
        root = os.geteuid() == 0
        if root:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            if not self._explicit_login_user:
                ensure_sandbox_user(self._login_user)
        try:
            pwd.getpwnam(self._login_user)
        except KeyError:
            raise RuntimeError(f"login user {self._login_user!r} does not exist") from None

        work_dir = tempfile.mkdtemp(prefix="rtgw-sshd-", dir=self._base_dir)
        self._work_dir = work_dir
        if not _SAFE_PATH.match(work_dir):
            raise RuntimeError(
                f"temp dir path {work_dir!r} has characters sshd_config cannot take unquoted; "
                "pass a plain base_dir"
            )
        # The login user's sshd child reads authorized_keys with that user's uid. Nothing
        # secret is readable: the host private key stays 0600.
        os.chmod(work_dir, 0o755)  # noqa: S103
        if root:
            make_traversable(Path(work_dir).parent)

        host_key = os.path.join(work_dir, "ssh_host_ed25519_key")
        try:
            result = subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", host_key],
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"ssh-keygen for the sandbox host key failed: {exc}") from exc
        if result.returncode != 0:
            raise RuntimeError(f"ssh-keygen for the sandbox host key failed: {result.stderr}")
        fields = Path(host_key + ".pub").read_text().split()
        self._host_key_line = f"{fields[0]} {fields[1]}"
        if self._host_ca_key is not None:
            self._certify_host_key(host_key, deadline)
        self._write_authorized_keys()
        if self._trusted_user_ca_keys:
            path = os.path.join(work_dir, "trusted_user_ca_keys")
            with open(path, "w") as f:
                f.write("".join(line + "\n" for line in self._trusted_user_ca_keys if line))
            os.chmod(path, 0o644)

        version = _sshd_version(sshd)
        penalties = version is not None and version >= (9, 8)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port()
            self._write_config(port, host_key, penalties=penalties)
            if self._launch(sshd, port, deadline, last_attempt=attempt == _PORT_ATTEMPTS):
                self._port = port
                return

    def _certify_host_key(self, host_key: str, deadline: float) -> None:
        """``HOST_KEY-cert.pub``: the host key certified by ``host_ca_key``."""
        assert self._host_ca_key is not None
        argv = ["ssh-keygen", "-q", "-s", self._host_ca_key, "-I", "sandbox-sshd", "-h"]
        if self._host_certificate_principals:
            argv += ["-n", ",".join(self._host_certificate_principals)]
        argv += ["-V", "-5m:+1d", host_key + ".pub"]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"ssh-keygen -s for the host certificate failed: {exc}") from exc
        if result.returncode != 0:
            raise RuntimeError(f"ssh-keygen -s for the host certificate failed: {result.stderr}")

    def _write_authorized_keys(self) -> None:
        assert self._work_dir is not None
        path = os.path.join(self._work_dir, "authorized_keys")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in self._authorized_keys if line))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _write_config(self, port: int, host_key: str, *, penalties: bool) -> str:
        assert self._work_dir is not None
        lines = [
            f"Port {port}",
            f"ListenAddress {self.host}",
            f"HostKey {host_key}",
            *([f"HostCertificate {host_key}-cert.pub"] if self._host_ca_key is not None else []),
            *(
                [f"TrustedUserCAKeys {os.path.join(self._work_dir, 'trusted_user_ca_keys')}"]
                if self._trusted_user_ca_keys
                else []
            ),
            f"PidFile {os.path.join(self._work_dir, 'sshd.pid')}",
            f"AuthorizedKeysFile {os.path.join(self._work_dir, 'authorized_keys')}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "AllowAgentForwarding yes",
            "X11Forwarding no",
            "PermitTTY yes",
            "AcceptEnv LANG LC_* RT_*",
            f"MaxSessions {self._max_sessions}",
            "MaxStartups 200:30:400",
            f"LogLevel {self._log_level}",
            "Subsystem sftp internal-sftp",
            "PrintMotd no",
            "PermitUserEnvironment no",
        ]
        if penalties:
            lines.append("PerSourcePenalties no")
        lines.extend(self._extra_config)
        path = os.path.join(self._work_dir, "sshd_config")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o644)
        return path

    def _launch(self, sshd: str, port: int, deadline: float, *, last_attempt: bool) -> bool:
        """Start sshd on ``port`` and wait for its banner; False if the port was taken."""
        assert self._work_dir is not None
        log_path = self.log_path
        log_start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        if self._log_file is None:
            self._log_file = open(log_path, "ab")  # closed in stop()
        config = os.path.join(self._work_dir, "sshd_config")
        try:
            process = subprocess.Popen(
                [sshd, "-D", "-e", "-f", config],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=self._log_file,
                cwd=self._work_dir,
            )
        except OSError as exc:
            raise RuntimeError(f"cannot run {sshd}: {exc}") from exc
        self._process = process
        while True:
            code = process.poll()
            if code is not None:
                log = log_tail(log_path, "sshd", start=log_start)
                if not last_attempt and _PORT_IN_USE.search(log):
                    self._process = None
                    return False
                raise RuntimeError(
                    f"sandbox sshd exited with status {code} during start-up; "
                    f"last lines of its log:\n{log}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"sandbox sshd did not answer an SSH banner on {self.host}:{port} in time; "
                    f"last lines of its log:\n{log_tail(log_path, 'sshd', start=log_start)}"
                )
            if _answers_ssh_banner(self.host, port, timeout=min(1.0, remaining)):
                return True
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _stop_locked(self) -> None:
        process = self._process
        self._process = None
        if process is not None:
            sessions = _children(process.pid) if process.poll() is None else []
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=_TERMINATE_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=_TERMINATE_GRACE_SECONDS)
            self._end_sessions(sessions)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        self._port = None
        self._host_key_line = None

    @staticmethod
    def _end_sessions(sessions: list[_ProcessId]) -> None:
        """SIGTERM per-connection sshd processes left behind by the listener; SIGKILL stragglers.

        A per-connection sshd runs in its own session, so ending the listener does not end
        the logins it accepted.
        """
        for session in sessions:
            _signal(session, signal.SIGTERM)
        end = time.monotonic() + _TERMINATE_GRACE_SECONDS
        while time.monotonic() < end and any(_alive(session) for session in sessions):
            time.sleep(0.05)
        for session in sessions:
            _signal(session, signal.SIGKILL)
