"""``runtools-gateway demo``: the whole product on one machine, gone again on Ctrl-C.

A throwaway PostgreSQL, a real OpenSSH sshd as the demo sandbox (trusting the gateway's upstream
key), an organization with your public keys registered, and the gateway itself. It prints the
``ssh`` line to type. Nothing outlives it: every process is stopped and every temp dir removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from gateway.config import ApiConfig, Config, DatabaseConfig, LogConfig, SshConfig, StateConfig
from gateway.daemon import logs
from gateway.daemon.lifecycle import Gateway
from gateway.lab.postgres import ThrowawayCluster
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Upstream, create_tenant, migrate_database
from gateway.lab.user_keys import UserKey, make_key
from gateway.ssh import hostkeys

DEMO_ORG = "demo"
DEMO_SANDBOX = "sandbox-demo"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _user_keys(key_file: str | None, state: Path) -> tuple[list[str], UserKey | None]:
    """Public key lines to register, and the key pair we made (if we had to make one)."""
    if key_file:
        return [Path(key_file).expanduser().read_text().strip()], None
    found = sorted(Path("~/.ssh").expanduser().glob("*.pub"))
    lines = []
    for path in found:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            lines.append(path.read_text().strip())
    if lines:
        return lines, None
    return [], make_key(state, "demo_id_ed25519", comment="runtools-demo")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def run_demo(ssh_port: int = 2222, key_file: str | None = None) -> int:
    logs.configure("warning", "console")
    if not _port_free(ssh_port):
        print(
            f"runtools-gateway demo: port {ssh_port} is in use; pick another with --port",
            file=sys.stderr,
        )
        return 1
    state = Path(tempfile.mkdtemp(prefix="rtgw-demo-"))
    cluster = ThrowawayCluster()
    sshd: SandboxSshd | None = None
    gateway: Gateway | None = None
    try:
        _say("starting a throwaway PostgreSQL ...")
        await asyncio.to_thread(cluster.start)
        await migrate_database(cluster.dsn)
        upstream_line = hostkeys.public_line(hostkeys.load_upstream_key(state))
        _say("starting the demo sandbox (OpenSSH sshd on loopback) ...")
        sshd = SandboxSshd(authorized_keys=[upstream_line])
        await asyncio.to_thread(sshd.start)
        lines, made = _user_keys(key_file, state)
        tenant = await create_tenant(
            cluster.dsn,
            Upstream.of(sshd),
            slug=DEMO_ORG,
            org_name="Demo organization",
            sandbox_id=DEMO_SANDBOX,
            key=made,
            key_lines=lines,
            skip_invalid=True,
        )
        for reason in tenant.skipped:
            _say(f"  skipping a key: {reason}")
        registered = [key.fingerprint for key in tenant.keys]
        if not registered:
            _say("no usable public key found; pass one with --key FILE.pub")
            return 1
        config = Config(
            database=DatabaseConfig(url=cluster.dsn, pool_min_size=1, pool_max_size=4),
            ssh=SshConfig(listen=f"127.0.0.1:{ssh_port}"),
            api=ApiConfig(listen="127.0.0.1:0"),
            state=StateConfig(dir=str(state)),
            log=LogConfig(level="warning", format="console"),
        )
        gateway = Gateway(config)
        await gateway.start()
        known = state / "known_hosts"
        known.write_text(
            "".join(
                f"[127.0.0.1]:{ssh_port} {p.read_text().split()[0]} {p.read_text().split()[1]}\n"
                for p in sorted(state.glob("ssh_host_*_key.pub"))
            )
        )
        cmd = ["ssh", "-p", str(ssh_port), "-o", f"UserKnownHostsFile={known}"]
        if made is not None:
            cmd += ["-i", str(made.path), "-o", "IdentitiesOnly=yes"]
        cmd.append(f"{DEMO_SANDBOX}@127.0.0.1")
        _say()
        _say("runtools-gateway demo is up.")
        _say(f"  registered for org '{DEMO_ORG}': " + ", ".join(registered))
        if made is not None:
            _say(f"  no ~/.ssh/*.pub found, so a demo key was made: {made.path}")
        _say("Connect with:")
        _say("  " + shlex.join(cmd))
        _say("Also try scp, sftp and rsync with the same options. Press Ctrl-C to stop.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        _say("\nstopping ...")
        return 0
    finally:
        if gateway is not None:
            await gateway.shutdown(drain_seconds=1.0)
        if sshd is not None:
            await asyncio.to_thread(sshd.stop)
        await asyncio.to_thread(cluster.stop)
        shutil.rmtree(state, ignore_errors=True)
        _say("demo stopped; nothing left behind.")
