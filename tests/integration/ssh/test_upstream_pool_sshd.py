"""The upstream pool against a real OpenSSH sshd: shared connections carry real sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.config import UpstreamConfig
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.ssh import hostkeys
from gateway.upstream import connect as upstream
from gateway.upstream.pool import UpstreamPool


async def test_pooled_connection_runs_concurrent_sessions(
    sandbox_sshd: SandboxSshd, state_dir: Path
) -> None:
    key = hostkeys.load_upstream_key(state_dir)
    target = upstream.Target(
        sandbox_id="sandbox-pool",
        host=sandbox_sshd.host,
        port=sandbox_sshd.port,
        user=sandbox_sshd.login_user,
        host_keys=(sandbox_sshd.host_key_line,),
    )

    async def connect(t: upstream.Target) -> upstream.asyncssh.SSHClientConnection:
        return await upstream.connect(t, client_key=key, config=UpstreamConfig())

    pool = UpstreamPool(connect, max_sessions=4)  # type: ignore[arg-type]
    pool.warm(target)

    async def one(i: int) -> bytes:
        lease = await pool.acquire(target)
        try:
            conn = lease.conn
            result = await conn.run(f"echo session-{i}", encoding=None)  # type: ignore[attr-defined]
            assert result.exit_status == 0
            return bytes(result.stdout)
        finally:
            lease.release()

    outputs = await asyncio.gather(*(one(i) for i in range(6)))
    assert outputs == [f"session-{i}\n".encode() for i in range(6)]
    assert 1 <= pool.stats()["connections"] <= 2  # 6 sessions, 4 per connection
    await pool.close()
