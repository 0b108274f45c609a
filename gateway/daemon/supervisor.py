"""One worker process per core: a small supervisor that starts, watches and restarts them.

``process.workers = N`` (or ``"auto"``: one per usable core) makes ``runtools-gateway serve`` a
supervisor. It starts N copies of itself (``python -m gateway serve`` with
``RTGW_WORKER_INDEX``); each is a complete gateway with its own database pool and audit writer.
They share the SSH port: with ``SO_REUSEPORT`` (each worker binds; the kernel spreads new
connections across them), or, under socket activation, by inheriting the one socket systemd
passed to the supervisor.

Only the supervisor talks to systemd's ``NOTIFY_SOCKET``. Each worker gets a private notify
socket of its own instead, and speaks the same sd_notify protocol to the supervisor, which
speaks for the group: READY=1 once every worker is ready, RELOADING=1 ... READY=1 around a
SIGHUP forwarded to all workers, STOPPING=1 when SIGTERM is forwarded, WATCHDOG=1 while its own
loop runs. Workers send WATCHDOG=1 too: one silent for ``process.worker_watchdog_seconds`` is
killed and, like a crashed one, restarted (with backoff when it keeps failing).

Worker 0 also serves the HTTP listener (API, /metrics, /readyz); metrics from all workers are
summed through ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from gateway.config import Config
from gateway.daemon import systemd
from gateway.daemon.sockets import INHERITED_FD_ENV, WORKER_INDEX_ENV, inherited_listen_socket

log = structlog.get_logger("gateway.supervisor")

_PRIVATE_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    INHERITED_FD_ENV,
    WORKER_INDEX_ENV,
)


@dataclass
class Worker:
    index: int
    notify_path: Path
    sock: socket.socket
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    reload_pending: bool = False
    started_at: float = 0.0
    last_ping: float = 0.0
    failures: int = 0
    status: str = ""
    restarts: int = 0
    history: list[int] = field(default_factory=list)  # pids, oldest first


class Supervisor:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.count = config.process.worker_count()
        self.notifier = systemd.Notifier()
        self.workers: list[Worker] = []
        self._stopping = False
        self._stop = asyncio.Event()
        self._ready_sent = False
        self._reloading = False
        self._dir = Path(tempfile.mkdtemp(prefix="rtgw-supervisor-"))
        self._metrics_dir = self._dir / "metrics"
        self._listen_sock: socket.socket | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._metrics_dir.mkdir()
        self._listen_sock = inherited_listen_socket()
        if self._listen_sock is not None:
            self._listen_sock.set_inheritable(True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        self.notifier.status(f"starting {self.count} workers")
        log.info(
            "supervisor_starting",
            workers=self.count,
            pid=os.getpid(),
            socket_activated=self._listen_sock is not None,
        )
        monitors = []
        for index in range(self.count):
            path = self._dir / f"notify-{index}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.bind(str(path))
            sock.setblocking(False)
            worker = Worker(index, path, sock)
            loop.add_reader(sock.fileno(), self._on_notify, worker)
            self.workers.append(worker)
            await self._spawn(worker)
            monitors.append(loop.create_task(self._monitor(worker)))
        watchdog = loop.create_task(self._watchdog())
        try:
            await self._stop.wait()
            await self._shutdown()
        finally:
            watchdog.cancel()
            for task in monitors:
                task.cancel()
            for worker in self.workers:
                loop.remove_reader(worker.sock.fileno())
                worker.sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            self.notifier.close()
        return 0

    def _worker_env(self, worker: Worker) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        env[WORKER_INDEX_ENV] = str(worker.index)
        env["NOTIFY_SOCKET"] = str(worker.notify_path)
        env["WATCHDOG_USEC"] = str(int(self.config.process.worker_watchdog_seconds * 1_000_000))
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir)
        if self._listen_sock is not None:
            env[INHERITED_FD_ENV] = str(self._listen_sock.fileno())
        return env

    async def _spawn(self, worker: Worker) -> None:
        args = [sys.executable, "-m", "gateway"]
        if self.config_path:
            args += ["--config", self.config_path]
        args.append("serve")
        pass_fds = (self._listen_sock.fileno(),) if self._listen_sock is not None else ()
        worker.ready = False
        worker.reload_pending = False
        worker.proc = await asyncio.create_subprocess_exec(
            *args, env=self._worker_env(worker), pass_fds=pass_fds
        )
        worker.started_at = worker.last_ping = time.monotonic()
        worker.history.append(worker.proc.pid)
        log.info("worker_started", worker=worker.index, worker_pid=worker.proc.pid)

    async def _monitor(self, worker: Worker) -> None:
        """Restart the worker whenever it exits, unless we are stopping."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            pid = worker.proc.pid
            self._mark_dead(pid)
            if self._stopping:
                return
            ran = time.monotonic() - worker.started_at
            worker.failures = worker.failures + 1 if ran < 10 else 1
            delay = min(30.0, 0.5 * 2 ** (worker.failures - 1))
            log.error(
                "worker_exited",
                worker=worker.index,
                worker_pid=pid,
                code=code,
                ran_seconds=round(ran, 1),
                restart_in_seconds=delay,
            )
            worker.ready = False
            self.notifier.status(self._status())
            await asyncio.sleep(delay)
            if self._stopping:
                return
            worker.restarts += 1
            await self._spawn(worker)

    def _mark_dead(self, pid: int) -> None:
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]

    def _on_notify(self, worker: Worker) -> None:
        try:
            data = worker.sock.recv(4096)
        except OSError:
            return
        for line in data.decode(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key == "READY" and value == "1":
                worker.ready = True
                worker.reload_pending = False
            elif key == "RELOADING" and value == "1":
                worker.ready = False
            elif key == "WATCHDOG" and value == "1":
                worker.last_ping = time.monotonic()
            elif key == "STATUS":
                worker.status = value
        worker.last_ping = time.monotonic()
        self._group_state_changed()

    def _group_state_changed(self) -> None:
        if self._stopping:
            return
        all_ready = all(w.ready for w in self.workers) and len(self.workers) == self.count
        if all_ready and not self._ready_sent:
            self._ready_sent = True
            log.info("workers_ready", workers=self.count)
            self.notifier.ready(self._status())
        elif self._reloading and not any(w.reload_pending for w in self.workers):
            self._reloading = False
            log.info("workers_reloaded", workers=self.count)
            self.notifier.ready(self._status())

    def _status(self) -> str:
        ready = sum(1 for w in self.workers if w.ready)
        return f"{ready} of {self.count} workers serving SSH"

    def _reload(self) -> None:
        if self._stopping:
            return
        self.notifier.reloading(f"reloading {self.count} workers")
        self._reloading = True
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                worker.reload_pending = True
                worker.proc.send_signal(signal.SIGHUP)
        log.info("reload_forwarded", workers=self.count)
        asyncio.get_running_loop().call_later(30.0, self._reload_timeout)
        self._group_state_changed()

    def _reload_timeout(self) -> None:
        if self._reloading:
            pending = [w.index for w in self.workers if w.reload_pending]
            log.warning("reload_timeout", workers=pending)
            for worker in self.workers:
                worker.reload_pending = False
            self._group_state_changed()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        limit = self.config.process.worker_watchdog_seconds
        last = 0.0
        while True:
            now = time.monotonic()
            if interval and now - last >= interval:
                self.notifier.watchdog()
                last = now
            for worker in self.workers:
                proc = worker.proc
                alive = proc is not None and proc.returncode is None
                if alive and now - worker.last_ping > limit and not self._stopping:
                    assert proc is not None
                    log.error("worker_hung", worker=worker.index, worker_pid=proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    worker.last_ping = now
            await asyncio.sleep(min(1.0, interval or 1.0))

    async def _shutdown(self) -> None:
        self._stopping = True
        drain = self.config.ssh.drain_timeout_seconds
        self.notifier.stopping(f"draining {self.count} workers for at most {drain:g} s")
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        log.info("supervisor_stopping", workers=len(live))
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in live]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=drain + 15.0)
            if pending:
                log.error("workers_killed", count=len(pending))
                for proc in live:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.wait(waits, timeout=5.0)
        if self._listen_sock is not None:
            self._listen_sock.close()
        log.info("supervisor_stopped")
