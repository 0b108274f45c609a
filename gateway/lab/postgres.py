"""A throwaway PostgreSQL cluster: ``initdb`` into a temp dir, serve on a loopback port, delete.

Used by the integration tests, the bench and ``runtools-gateway demo``. Nothing here is meant
for production data: the cluster trusts every local connection and runs with ``fsync=off``.

    with ThrowawayCluster() as cluster:
        pool = await keystore.db.create_pool(cluster.dsn)

For failover tests, :meth:`ThrowawayCluster.standby` makes a streaming replica of a running
cluster (``pg_basebackup -R``) in a temp dir of its own; :meth:`ThrowawayCluster.stop_server`
stops a server but keeps its files, and :meth:`ThrowawayCluster.promote` turns a standby into
a primary:

    replica = primary.standby()
    primary.stop_server("fast")
    replica.promote()

PostgreSQL refuses to run as root, so when this process is root every ``initdb``/``pg_ctl``/
``createdb``/``pg_basebackup`` runs as the ``postgres`` OS user (``runuser -u postgres --``)
and the temp dir is handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from gateway.lab.host import free_port, log_tail, make_traversable
from keystore.errors import Unavailable

__all__ = ["ThrowawayCluster"]

DATABASE = "runtools"
_SUPERUSER = "postgres"
_OS_USER = "postgres"
_PORT_ATTEMPTS = 3
_STOP_TIMEOUT_SECONDS = 10.0
# A Unix socket path (dir + "/.s.PGSQL.NNNNN") must fit in sockaddr_un.sun_path (108 bytes).
_MAX_SOCKET_DIR_LEN = 90
_PORT_IN_USE = re.compile(r"address already in use|could not create any TCP/IP sockets", re.I)


def _find_bindir() -> str:
    """Return the directory holding ``initdb`` and ``pg_ctl``; raise ``Unavailable`` if none."""

    def usable(bindir: str) -> bool:
        return all(os.access(os.path.join(bindir, name), os.X_OK) for name in ("initdb", "pg_ctl"))

    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and usable(out.stdout.strip()):
            return out.stdout.strip()

    def version_key(bindir: str) -> tuple[int, ...]:
        version = Path(bindir).parent.name
        return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True):
        if usable(bindir):
            return bindir

    initdb = shutil.which("initdb")
    if initdb is not None and usable(os.path.dirname(initdb)):
        return os.path.dirname(initdb)
    raise Unavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: tried `pg_config --bindir`, "
        "/usr/lib/postgresql/*/bin and PATH; install the postgresql server package"
    )


class ThrowawayCluster:
    """A private PostgreSQL cluster in a temp dir, with a ``runtools`` database.

    ``start()`` runs ``initdb``, starts the server on a free 127.0.0.1 port and creates the
    database; ``stop()`` stops it (``-m immediate``) and deletes the temp dir. The cluster trusts
    every connection (``-A trust``), so :attr:`dsn` needs no password.

    :param base_dir: where to create the temp dir (default: the system temp dir). When running as
        root, parents of the temp dir get the others-search bit so ``postgres`` can reach it;
        they must stay that way while the cluster runs (pytest's ``tmp_path`` does not: each
        pytest run resets ``/tmp/pytest-of-root`` to 0700).
    """

    def __init__(self, *, base_dir: str | None = None) -> None:
        self._base_dir = base_dir
        self._lock = threading.Lock()
        self._work_dir: str | None = None
        self._bindir: str | None = None
        self._port: int | None = None
        self._running = False
        self._as_postgres = os.geteuid() == 0

    # -- public API -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/runtools``; only valid after ``start()``."""
        if not self._running or self._port is None:
            raise RuntimeError("ThrowawayCluster is not running; call start() first")
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self._port}/{DATABASE}"

    @property
    def port(self) -> int:
        """The TCP port the server listens on (127.0.0.1); only valid after ``start()``."""
        if not self._running or self._port is None:
            raise RuntimeError("ThrowawayCluster is not running; call start() first")
        return self._port

    @property
    def work_dir(self) -> str | None:
        """The temp dir holding the data dir and the server log; None when stopped."""
        return self._work_dir

    @property
    def data_dir(self) -> str | None:
        """The cluster's data directory; None when stopped."""
        return None if self._work_dir is None else os.path.join(self._work_dir, "data")

    @property
    def log_path(self) -> str | None:
        """The server log written by ``pg_ctl -l``; None when stopped."""
        return None if self._work_dir is None else os.path.join(self._work_dir, "postgres.log")

    @property
    def running(self) -> bool:
        return self._running

    def start(self, timeout_seconds: float = 30.0) -> None:
        """Create and start the cluster and its ``runtools`` database.

        Does nothing if already running. On failure everything created so far is removed and
        ``Unavailable`` is raised, with the tail of the server log where there is one.
        """
        with self._lock:
            if self._running:
                return
            deadline = time.monotonic() + timeout_seconds
            try:
                self._start(deadline)
            except BaseException:
                self._stop_locked()
                raise
            self._running = True

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m immediate``) and delete the temp dir.

        Safe to call more than once, before ``start()`` and after a failed ``start()``.
        """
        with self._lock:
            self._stop_locked()

    def standby(self, timeout_seconds: float = 60.0) -> ThrowawayCluster:
        """A new cluster streaming from this running one: a hot standby on its own port.

        ``pg_basebackup -R -X stream`` copies this cluster into a new temp dir (``-R`` writes
        ``standby.signal`` and ``primary_conninfo``), then the copy is started like
        :meth:`start` does. It answers read-only queries until :meth:`promote`; ``stop()``
        removes it like any other. Raises ``Unavailable`` on failure.
        """
        primary_port = self.port  # raises if this cluster is not running
        replica = ThrowawayCluster(base_dir=self._base_dir)
        with replica._lock:
            deadline = time.monotonic() + timeout_seconds
            try:
                replica._start_standby(primary_port, deadline)
            except BaseException:
                replica._stop_locked()
                raise
            replica._running = True
        return replica

    def promote(self, timeout_seconds: float = 30.0) -> None:
        """Turn this standby into a primary (``pg_ctl promote -w``): returns once it accepts
        writes. Raises ``Unavailable`` on failure (e.g. it is not a standby)."""
        with self._lock:
            if not self._running or self._bindir is None or self.data_dir is None:
                raise RuntimeError("ThrowawayCluster is not running; call start() first")
            wait = max(1, int(timeout_seconds))
            self._run(
                "pg_ctl promote",
                [
                    os.path.join(self._bindir, "pg_ctl"),
                    "promote",
                    "-w",
                    "-t", str(wait),
                    "-D", self.data_dir,
                ],
                time.monotonic() + timeout_seconds,
                grace=5.0,
            )  # fmt: skip

    def stop_server(self, mode: str = "fast", timeout_seconds: float = 30.0) -> None:
        """Stop the server (``pg_ctl stop -m MODE``: smart, fast or immediate) and keep its
        files; :attr:`dsn` and :attr:`port` are invalid afterwards. ``stop()`` still removes
        the temp dir. Does nothing if the server is not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        with self._lock:
            if not self._running or self._bindir is None or self.data_dir is None:
                return
            self._running = False
            self._run(
                "pg_ctl stop",
                [
                    os.path.join(self._bindir, "pg_ctl"),
                    "stop",
                    "-D", self.data_dir,
                    "-m", mode,
                    "-w",
                    "-t", str(max(1, int(timeout_seconds))),
                ],
                time.monotonic() + timeout_seconds,
                grace=5.0,
            )  # fmt: skip

    def __enter__(self) -> ThrowawayCluster:
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
        state = f"port={self._port}" if self._running else "stopped"
        return f"<ThrowawayCluster {state} dir={self._work_dir!r}>"

    # -- internals --------------------------------------------------------------------------

    def _start(self, deadline: float) -> None:
        work_dir = self._make_work_dir()
        assert self._bindir is not None
        data_dir = os.path.join(work_dir, "data")
        self._run(
            "initdb",
            [
                os.path.join(self._bindir, "initdb"),
                "-D", data_dir,
                "-A", "trust",
                "-U", _SUPERUSER,
                "--no-sync",
                "-E", "UTF8",
                # The caller's locale may not be installed; the throwaway cluster needs none.
                "--locale=C",
            ],
            deadline,
        )  # fmt: skip

        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port()
            if self._pg_ctl_start(port, deadline, last_attempt=attempt == _PORT_ATTEMPTS):
                self._port = port
                break

        assert self._port is not None
        self._run(
            "createdb",
            [
                os.path.join(self._bindir, "createdb"),
                "-h", "127.0.0.1",
                "-p", str(self._port),
                "-U", _SUPERUSER,
                DATABASE,
            ],
            deadline,
        )  # fmt: skip

    def _make_work_dir(self) -> str:
        """Find the server binaries and create the temp dir (owned by ``postgres`` when root)."""
        self._bindir = _find_bindir()
        pw: pwd.struct_passwd | None = None
        if self._as_postgres:
            if shutil.which("runuser") is None:
                raise Unavailable("running as root but `runuser` is not installed")
            try:
                pw = pwd.getpwnam(_OS_USER)
            except KeyError:
                raise Unavailable(
                    f"running as root but there is no {_OS_USER!r} OS user to run PostgreSQL as"
                ) from None

        work_dir = tempfile.mkdtemp(prefix="rtgw-pg-", dir=self._base_dir)
        self._work_dir = work_dir
        if pw is not None:
            os.chown(work_dir, pw.pw_uid, pw.pw_gid)
            os.chmod(work_dir, 0o700)
            make_traversable(Path(work_dir).parent)

        return work_dir

    def _start_standby(self, primary_port: int, deadline: float) -> None:
        work_dir = self._make_work_dir()
        assert self._bindir is not None
        data_dir = os.path.join(work_dir, "data")
        self._run(
            "pg_basebackup",
            [
                os.path.join(self._bindir, "pg_basebackup"),
                "-h", "127.0.0.1",
                "-p", str(primary_port),
                "-U", _SUPERUSER,
                "-D", data_dir,
                "-R",  # standby.signal + primary_conninfo: start as a streaming replica
                "-X", "stream",
                "-c", "fast",
                "--no-sync",
            ],
            deadline,
        )  # fmt: skip
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port()
            if self._pg_ctl_start(port, deadline, last_attempt=attempt == _PORT_ATTEMPTS):
                self._port = port
                break

    def _pg_ctl_start(self, port: int, deadline: float, *, last_attempt: bool) -> bool:
        """Start the server on ``port``; False if the port was taken (and retrying makes sense)."""
        assert self._bindir is not None and self.data_dir is not None and self.log_path is not None
        data_dir = self.data_dir
        socket_dir = data_dir if len(data_dir) <= _MAX_SOCKET_DIR_LEN else ""
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={port}",
                f"-c unix_socket_directories={shlex.quote(socket_dir)}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        wait = max(1, int(deadline - time.monotonic()))
        argv = [
            os.path.join(self._bindir, "pg_ctl"),
            "start",
            "-w",
            "-t", str(wait),
            "-D", data_dir,
            "-l", self.log_path,
            "-o", options,
        ]  # fmt: skip
        try:
            self._run("pg_ctl start", argv, deadline, grace=5.0)
        except Unavailable:
            if not last_attempt and _PORT_IN_USE.search(
                log_tail(self.log_path, "server", start=log_start)
            ):
                self._kill_leftover_postmaster()
                return False
            raise
        return True

    def _run(
        self, what: str, argv: list[str], deadline: float, *, grace: float = 0.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool (as ``postgres`` when root); raise ``Unavailable`` on failure."""
        if self._as_postgres:
            argv = ["runuser", "-u", _OS_USER, "--", *argv]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable(f"throwaway PostgreSQL: timed out before {what}{self._log_suffix()}")
        # Settings from the caller's environment (PGHOST, PGDATA, ...) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = str(max(2, int(remaining)))
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=remaining + grace,
                env=env,
                cwd=self._work_dir,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except FileNotFoundError as exc:
            raise Unavailable(f"throwaway PostgreSQL: cannot run {what}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(
                f"throwaway PostgreSQL: {what} did not finish within {remaining + grace:.1f}s"
                f"{self._log_suffix()}"
            ) from exc
        if result.returncode != 0:
            output = (result.stderr.strip() or result.stdout.strip() or "(no output)")[-2000:]
            raise Unavailable(
                f"throwaway PostgreSQL: {what} failed (exit {result.returncode}): {output}"
                f"{self._log_suffix()}"
            )
        return result

    def _log_suffix(self) -> str:
        log_path = self.log_path
        if log_path is None or not os.path.exists(log_path):
            return ""
        return f"\n--- last lines of the server log ---\n{log_tail(log_path, 'server')}"

    def _postmaster_pid(self) -> int | None:
        data_dir = self.data_dir
        if data_dir is None:
            return None
        try:
            first = Path(data_dir, "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (OSError, IndexError, ValueError):
            return None

    def _kill_leftover_postmaster(self) -> None:
        """SIGKILL the postmaster named in ``postmaster.pid`` if it is still alive."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def _stop_locked(self) -> None:
        work_dir = self._work_dir
        self._running = False
        if work_dir is None:
            return
        if self._bindir is not None and self._postmaster_pid() is not None:
            try:
                self._run(
                    "pg_ctl stop",
                    [
                        os.path.join(self._bindir, "pg_ctl"),
                        "stop",
                        "-D", os.path.join(work_dir, "data"),
                        "-m", "immediate",
                        "-w",
                        "-t", str(int(_STOP_TIMEOUT_SECONDS)),
                    ],
                    time.monotonic() + _STOP_TIMEOUT_SECONDS,
                    grace=5.0,
                )  # fmt: skip
            except Unavailable:
                self._kill_leftover_postmaster()
        shutil.rmtree(work_dir, ignore_errors=True)
        self._work_dir = None
        self._port = None
