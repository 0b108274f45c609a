"""Bring up everything the benchmark compares, on this machine, and take it down again.

* a throwaway PostgreSQL (``gateway.lab.postgres.ThrowawayCluster``) with one org, one sandbox and
  the benchmark user's key registered;
* one OpenSSH ``sshd`` (``gateway.lab.sandbox_sshd.SandboxSshd``) that plays the sandbox, trusting
  both the gateway's upstream key and the benchmark user's key, logged into as its dedicated
  non-root ``/bin/sh`` user (so bash start-up is not measured). The same sshd is the jump host
  of the bastion path (``ssh -J``);
* the gateway as a real subprocess (``gateway.lab.process.GatewayProcess``: ``python -m gateway
  serve``, as in the integration tests).

The org, sandbox and key are seeded by ``gateway.lab.seed``, like the demo's and the tests'.

Every ``ssh`` reads one generated ``ssh_config`` (``-F``), which pins cipher and key exchange for
every hop, the ``-J`` jump included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.lab.postgres import ThrowawayCluster
from gateway.lab.process import GatewayProcess
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, Upstream, create_tenant, migrate_database
from gateway.lab.user_keys import UserKey, make_key
from gateway.ssh import hostkeys

CIPHER = "aes128-gcm@openssh.com"
KEX = "curve25519-sha256"
SANDBOX = "sandbox-bench"
# A second sandbox of the same org on the same sshd: its own shared upstream connection, for
# "a neighbour's bulk transfer on another sandbox" (bench/flows.py).
SANDBOX2 = "sandbox-bench-2"
# upstream.pool_idle_seconds for the bench lab (default 60 s): short, so "first session after
# idle" waits seconds, not a minute. The smoke profile passes 1 s.
POOL_IDLE_SECONDS = 5.0


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Lab:
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rtgw-bench-")))
    cluster: ThrowawayCluster | None = None
    sshd: SandboxSshd | None = None
    gateway: GatewayProcess | None = None
    key_path: Path | None = None
    ssh_config: Path | None = None
    pool_idle_seconds: float = POOL_IDLE_SECONDS
    # process.workers for the gateway (RTGW_PROCESS_WORKERS): "1" (one process, the default),
    # an integer, or "auto" (one worker per usable core, behind a supervisor).
    workers: str = "1"

    # --- bring-up ---

    def start(self, *, log_level: str = "debug") -> Lab:
        os.chmod(self.workdir, 0o755)  # noqa: S103 - the sandbox user reads its keys here
        raise_nofile()
        state = self.workdir / "state"
        upstream_line = hostkeys.public_line(hostkeys.load_upstream_key(state))
        user_key = make_key(self.workdir, "id_bench", comment="bench")
        self.key_path = user_key.path
        self.cluster = ThrowawayCluster()
        self.cluster.start()
        self.sshd = SandboxSshd(
            authorized_keys=[upstream_line, user_key.public_line],
            max_sessions=64,
            extra_config=["MaxStartups 1000:30:2000"],
        )
        self.sshd.start()
        tenant = asyncio.run(self._seed(self.cluster.dsn, Upstream.of(self.sshd), user_key))
        tenant.add_sandbox(Upstream.of(self.sshd), SANDBOX2)
        self.gateway = GatewayProcess(
            database_url=self.cluster.dsn,
            state_dir=state,
            env_extra={
                "RTGW_LOG_LEVEL": log_level,
                "RTGW_SSH_MAX_UNAUTHENTICATED": "1000",
                "RTGW_DATABASE_POOL_MAX_SIZE": "10",
                "RTGW_UPSTREAM_POOL_IDLE_SECONDS": f"{self.pool_idle_seconds:g}",
                "RTGW_PROCESS_WORKERS": self.workers,
            },
        ).start()
        self.wait_for_workers()
        self._write_ssh_config()
        return self

    def wait_for_workers(self, timeout: float = 30.0) -> None:
        """With several workers, the first banner comes from whichever bound first: wait for
        the supervisor's ``workers_ready`` (every worker serving SSH), so the kernel spreads
        the bench's connections over all of them."""
        assert self.gateway is not None
        if self.workers == "1":
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b'"workers_ready"' in self.gateway.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise TimeoutError(f"gateway workers not ready within {timeout:g} s")

    def gateway_pids(self) -> list[int]:
        """The gateway process and its descendants (the workers under a supervisor)."""
        out, todo = [], [self.gateway_pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return out

    @staticmethod
    async def _seed(dsn: str, upstream: Upstream, user_key: UserKey) -> Tenant:
        await migrate_database(dsn)
        return await create_tenant(
            dsn,
            upstream,
            slug="bench",
            org_name="Benchmark org",
            sandbox_id=SANDBOX,
            key=user_key,
            key_name="bench",
        )

    def _write_ssh_config(self) -> None:
        assert self.sshd is not None and self.gateway is not None and self.key_path
        known = self.workdir / "known_hosts"
        jump_line = f"[localhost]:{self.sshd.port} {self.sshd.host_key_line}"
        known.write_text(
            f"{self.sshd.known_hosts_line}\n{jump_line}\n{self.gateway.known_hosts_line()}"
        )
        self.ssh_config = self.workdir / "ssh_config"
        self.ssh_config.write_text(
            "\n".join(
                [
                    "Host *",
                    f"  Ciphers {CIPHER}",
                    f"  KexAlgorithms {KEX}",
                    "  HostKeyAlgorithms ssh-ed25519",
                    f"  UserKnownHostsFile {known}",
                    "  StrictHostKeyChecking yes",
                    f"  IdentityFile {self.key_path}",
                    "  IdentitiesOnly yes",
                    "  IdentityAgent none",
                    "  BatchMode yes",
                    "  Compression no",
                    "  ControlMaster no",
                    "  ControlPath none",
                    "  ServerAliveInterval 0",
                    "  ConnectTimeout 20",
                    "  LogLevel ERROR",
                    "",
                ]
            )
        )

    # --- the three paths ---

    def ssh_cmd(self, path: str, *remote: str) -> list[str]:
        """``ssh`` argv for ``direct`` | ``bastion`` | ``gateway`` | ``gateway2`` (the second
        sandbox), running ``remote``."""
        assert self.sshd is not None and self.gateway is not None
        base = ["ssh", "-F", str(self.ssh_config)]
        user, port = self.sshd.login_user, self.sshd.port
        if path == "bastion":
            jump = f"{user}@localhost:{port}"  # another name, or ssh sees a jump loop
            return [*base, "-J", jump, "-p", str(port), f"{user}@127.0.0.1", *remote]
        port, login = self.target(path)
        return [*base, "-p", str(port), f"{login}@127.0.0.1", *remote]

    def target(self, path: str) -> tuple[int, str]:
        """(port, login name) on 127.0.0.1 for ``direct`` | ``gateway`` | ``gateway2``."""
        assert self.sshd is not None and self.gateway is not None
        if path == "direct":
            return self.sshd.port, self.sshd.login_user
        if path == "gateway":
            return self.gateway.ssh_port, SANDBOX
        if path == "gateway2":
            return self.gateway.ssh_port, SANDBOX2
        raise ValueError(path)

    def client_options(self, path: str) -> dict[str, Any]:
        """asyncssh client options for ``direct`` | ``gateway`` | ``gateway2``."""
        port, login = self.target(path)
        return {**self.gateway_client_options(), "port": port, "username": login}

    def restart_gateway(self) -> None:
        """A fresh gateway process (same port, keys, state): memory figures start clean."""
        assert self.gateway is not None
        self.gateway.restart()

    @property
    def gateway_pid(self) -> int:
        assert self.gateway is not None
        return self.gateway.pid

    def gateway_client_options(self) -> dict[str, Any]:
        """asyncssh client options for connecting to the gateway as the benchmark user."""
        assert self.gateway is not None and self.key_path is not None
        return {
            "host": "127.0.0.1",
            "port": self.gateway.ssh_port,
            "username": SANDBOX,
            "client_keys": [str(self.key_path)],
            "known_hosts": str(self.workdir / "known_hosts"),
            "agent_path": None,
            "encryption_algs": [CIPHER],
            "kex_algs": [KEX],
            "config": None,
        }

    # --- tear-down ---

    def stop(self) -> None:
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                self.gateway.stop()
        if self.sshd is not None:
            with contextlib.suppress(Exception):
                self.sshd.stop()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
