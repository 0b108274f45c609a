"""The lab parts used by the integration fixtures and ``runtools-gateway demo``, tested for real:
a throwaway PostgreSQL cluster and an OpenSSH sshd standing in for a sandbox."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest

import gateway.lab.postgres
from gateway.lab.postgres import ThrowawayCluster
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.user_keys import make_key

# The cluster and the sshd keep their temp dirs in the system temp dir (the default), not in
# tmp_path: as root, `postgres` and `rtsandbox` must traverse the parents, and every pytest run
# resets /tmp/pytest-of-root to 0700, which would cut them off mid-test when runs overlap.


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def _keygen(path: Path) -> str:
    return make_key(path.parent, path.name, comment="lab-test").public_line


def _ssh(
    sshd: SandboxSshd, key: Path, known_hosts: Path, command: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_line}\n")
    return subprocess.run(
        [
            "ssh",
            "-F", "/dev/null",
            "-i", str(key),
            "-p", str(sshd.port),
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=10",
            f"{sshd.login_user}@127.0.0.1",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


# -- ThrowawayCluster -------------------------------------------------------------------------


async def test_throwaway_cluster_serves_and_cleans_up() -> None:
    cluster = ThrowawayCluster()
    try:
        cluster.start()
        cluster.start()  # already running: no-op
        port = cluster.port
        work_dir = cluster.work_dir
        assert work_dir is not None and os.path.isdir(work_dir)
        assert cluster.dsn == f"postgresql://postgres@127.0.0.1:{port}/runtools"

        conn = await asyncpg.connect(cluster.dsn, timeout=10)
        try:
            assert await conn.fetchval("select 1") == 1
            assert await conn.fetchval("select current_database()") == "runtools"
        finally:
            await conn.close()
    finally:
        cluster.stop()

    assert not os.path.exists(work_dir)
    assert not _accepts(port)
    assert cluster.work_dir is None
    with pytest.raises(RuntimeError):
        _ = cluster.dsn
    cluster.stop()  # twice is fine


def test_throwaway_cluster_stop_before_start_is_harmless() -> None:
    cluster = ThrowawayCluster()
    cluster.stop()
    cluster.stop()


def test_throwaway_cluster_retries_when_port_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        real_free_port = gateway.lab.postgres.free_port
        ports = iter([taken_port])
        monkeypatch.setattr(
            gateway.lab.postgres, "free_port", lambda: next(ports, None) or real_free_port()
        )

        with ThrowawayCluster() as cluster:
            assert cluster.port != taken_port
            out = subprocess.run(
                ["psql", cluster.dsn, "-Atc", "select 41 + 1"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            assert out.stdout.strip() == "42"


# -- SandboxSshd ------------------------------------------------------------------------------


def test_sandbox_sshd_runs_a_real_openssh_login(tmp_path: Path) -> None:
    key = tmp_path / "id"
    public = _keygen(key)
    sshd = SandboxSshd(authorized_keys=[public])
    try:
        sshd.start()
        pid = sshd.pid
        assert pid is not None
        assert sshd.host == "127.0.0.1"
        assert sshd.host_key_line.startswith("ssh-ed25519 AAAA")
        assert len(sshd.host_key_line.split()) == 2
        if os.geteuid() == 0:
            assert sshd.login_user == "rtsandbox"

        result = _ssh(sshd, key, tmp_path / "known_hosts", "echo hello; exit 3")
        assert result.returncode == 3, (result.stderr, Path(sshd.log_path).read_text())
        assert result.stdout.strip() == "hello"
        work_dir = sshd.work_dir
        assert work_dir is not None
    finally:
        sshd.stop()

    assert sshd.pid is None
    assert _process_gone(pid)
    assert not os.path.exists(work_dir)
    sshd.stop()  # twice is fine


def test_sandbox_sshd_rereads_authorized_keys(tmp_path: Path) -> None:
    trusted, other = tmp_path / "trusted", tmp_path / "other"
    trusted_public, other_public = _keygen(trusted), _keygen(other)
    known_hosts = tmp_path / "known_hosts"
    with SandboxSshd(authorized_keys=[trusted_public]) as sshd:
        refused = _ssh(sshd, other, known_hosts, "true")
        assert refused.returncode == 255
        assert "Permission denied" in refused.stderr

        sshd.set_authorized_keys([other_public])
        assert _ssh(sshd, other, known_hosts, "echo in").stdout.strip() == "in"
        assert _ssh(sshd, trusted, known_hosts, "true").returncode == 255


def test_sandbox_sshd_stop_ends_open_sessions(tmp_path: Path) -> None:
    key = tmp_path / "id"
    public = _keygen(key)
    known_hosts = tmp_path / "known_hosts"
    with SandboxSshd(authorized_keys=[public]) as sshd:
        known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_line}\n")
        client = subprocess.Popen(
            [
                "ssh", "-F", "/dev/null", "-i", str(key), "-p", str(sshd.port),
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
                f"{sshd.login_user}@127.0.0.1", "echo up; sleep 60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "up"
            started = time.monotonic()
            sshd.stop()
            client.wait(timeout=15)
            assert time.monotonic() - started < 15
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
