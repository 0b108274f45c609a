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

import asyncssh

from gateway.config import ApiConfig, Config, DatabaseConfig, LogConfig, SshConfig, StateConfig
from gateway.daemon import logs
from gateway.daemon.lifecycle import Gateway
from gateway.lab.postgres import ThrowawayCluster
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.ssh import hostkeys
from keystore import db as keystore_db
from keystore import keys as keyparse
from keystore import orgs, sandboxes, ssh_keys
from keystore.errors import InvalidPublicKey
from keystore.migrate import migrate

DEMO_ORG = "demo"
DEMO_SANDBOX = "sandbox-demo"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _user_keys(key_file: str | None, state: Path) -> tuple[list[str], Path | None]:
    """Public key lines to register, and the private key we made (if we had to make one)."""
    if key_file:
        return [Path(key_file).expanduser().read_text().strip()], None
    found = sorted(Path("~/.ssh").expanduser().glob("*.pub"))
    lines = []
    for path in found:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            lines.append(path.read_text().strip())
    if lines:
        return lines, None
    key = asyncssh.generate_private_key("ssh-ed25519", comment="runtools-demo")
    private = state / "demo_id_ed25519"
    private.write_bytes(key.export_private_key())
    private.chmod(0o600)
    return [key.export_public_key().decode().strip()], private


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
        async with keystore_db.connect(cluster.dsn) as conn:
            await migrate(conn)
        upstream_line = hostkeys.public_line(hostkeys.load_upstream_key(state))
        _say("starting the demo sandbox (OpenSSH sshd on loopback) ...")
        sshd = SandboxSshd(authorized_keys=[upstream_line])
        await asyncio.to_thread(sshd.start)
        lines, made = _user_keys(key_file, state)
        async with keystore_db.connect(cluster.dsn) as conn:
            org = await orgs.create_org(conn, DEMO_ORG, "Demo organization")
            project = await orgs.get_project(conn, org.id, None)
            await sandboxes.add_sandbox(
                conn,
                sandbox_id=DEMO_SANDBOX,
                org_id=org.id,
                project_id=project.id,
                upstream_host=sshd.host,
                upstream_port=sshd.port,
                login_user=sshd.login_user,
                host_keys=[sshd.host_key_line],
            )
            registered = []
            for line in lines:
                try:
                    parsed = keyparse.parse_public_key(line)
                except InvalidPublicKey as exc:
                    _say(f"  skipping a key: {exc}")
                    continue
                await ssh_keys.add_key(
                    conn,
                    org_id=org.id,
                    project_id=project.id,
                    key=parsed,
                    name=parsed.comment or "demo key",
                )
                registered.append(parsed.fingerprint)
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
            cmd += ["-i", str(made), "-o", "IdentitiesOnly=yes"]
        cmd.append(f"{DEMO_SANDBOX}@127.0.0.1")
        _say()
        _say("runtools-gateway demo is up.")
        _say(f"  registered for org '{DEMO_ORG}': " + ", ".join(registered))
        if made is not None:
            _say(f"  no ~/.ssh/*.pub found, so a demo key was made: {made}")
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
