"""The core path, as a user lives it: real ssh/scp/sftp/rsync through the gateway to a real sshd."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.lab.process import GatewayProcess, free_port
from gateway.lab.sandbox_sshd import SandboxSshd
from gateway.lab.seed import Tenant, Upstream, unique
from gateway.lab.user_keys import make_key
from tests.integration.support import GatewayFactory, SshClient, TcpRelay, client_for


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- sessions -----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exec_exit_code_reaches_the_user(ssh_client: SshClient, tenant: Tenant, code: int) -> None:
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, f"echo ran; exit {code}")
    assert r.returncode == code, r.stderr
    assert r.stdout == b"ran\n"


def test_stderr_is_kept_apart_from_stdout(ssh_client: SshClient, tenant: Tenant) -> None:
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "echo to-out; echo to-err >&2")
    assert r.returncode == 0
    assert r.stdout == b"to-out\n"
    assert r.stderr == b"to-err\n"


def test_death_by_signal_is_reported_like_plain_openssh(
    ssh_client: SshClient, tenant: Tenant, sandbox_sshd: SandboxSshd, workdir: Path
) -> None:
    through = ssh_client.ssh(tenant.key, tenant.sandbox_id, "kill -TERM $$")
    # The same command straight to the sandbox, with the gateway's own upstream identity.
    known = workdir / "known_sandbox"
    known.write_text(f"[127.0.0.1]:{sandbox_sshd.port} {sandbox_sshd.host_key_line}\n")
    direct = subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={known}",
            "-i",
            str(workdir / "state" / "upstream_ed25519_key"),
            "-p",
            str(sandbox_sshd.port),
            f"{sandbox_sshd.login_user}@127.0.0.1",
            "kill -TERM $$",
        ],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert direct.returncode == 255
    assert through.returncode == direct.returncode
    assert through.stdout == b""


def test_pty_shell_runs_interactively(ssh_client: SshClient, tenant: Tenant) -> None:
    r = ssh_client.ssh(
        tenant.key,
        tenant.sandbox_id,
        options=["-tt"],
        input=b"tty; echo term=$TERM; echo sum=$((6*7)); exit 7\n",
    )
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 7, r.stderr
    assert re.search(r"/dev/pts/\d+", out), out
    assert "sum=42" in out


def test_environment_variables_are_passed(ssh_client: SshClient, tenant: Tenant) -> None:
    env = dict(os.environ, RT_GREETING="hello-from-client")
    cmd = [
        "ssh",
        *ssh_client.base(tenant.key),
        "-p",
        str(ssh_client.port),
        "-o",
        "SendEnv=RT_GREETING",
        f"{tenant.sandbox_id}@127.0.0.1",
        "echo $RT_GREETING",
    ]
    r = subprocess.run(cmd, capture_output=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello-from-client\n"


def test_50_mb_through_stdin_arrives_intact(ssh_client: SshClient, tenant: Tenant) -> None:
    data = os.urandom(50 * 1024 * 1024)
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "sha256sum", input=data, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == sha256(data)


def test_stdin_eof_is_relayed_and_output_after_it_still_arrives(
    ssh_client: SshClient, tenant: Tenant
) -> None:
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "wc -c; echo after-eof", input=b"x" * 1000)
    assert r.returncode == 0
    assert r.stdout.split() == [b"1000", b"after-eof"]


def test_large_output_arrives_before_the_exit_status(ssh_client: SshClient, tenant: Tenant) -> None:
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "head -c 20000000 /dev/zero; exit 3")
    assert r.returncode == 3
    assert len(r.stdout) == 20_000_000


# --- files ----------------------------------------------------------------------------------


def test_sftp_put_and_get_keep_checksums(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    remote = f"/tmp/{unique('sftp')}.bin"
    back = tmp_path / "down.bin"
    r = ssh_client.sftp(
        tenant.key, tenant.sandbox_id, f"put {src} {remote}\nget {remote} {back}\nrm {remote}\n"
    )
    assert r.returncode == 0, r.stderr
    assert sha256(back.read_bytes()) == sha256(data)


@pytest.mark.parametrize("mode", [[], ["-O"]], ids=["scp-over-sftp", "scp-legacy"])
def test_scp_both_ways_keeps_checksums(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path, mode: list[str]
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    src = tmp_path / "a.bin"
    src.write_bytes(data)
    remote = f"/tmp/{unique('scp')}.bin"
    up = ssh_client.scp(tenant.key, *mode, str(src), f"{tenant.sandbox_id}@127.0.0.1:{remote}")
    assert up.returncode == 0, up.stderr
    back = tmp_path / "b.bin"
    down = ssh_client.scp(tenant.key, *mode, f"{tenant.sandbox_id}@127.0.0.1:{remote}", str(back))
    assert down.returncode == 0, down.stderr
    assert sha256(back.read_bytes()) == sha256(data)


def test_rsync_over_the_gateway(ssh_client: SshClient, tenant: Tenant, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    remote = f"/tmp/{unique('rsync')}/"
    rsh = ssh_client.ssh_command_for_rsync(tenant.key)
    up = subprocess.run(
        ["rsync", "-a", "-e", rsh, f"{src}/", f"{tenant.sandbox_id}@127.0.0.1:{remote}"],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back"
    down = subprocess.run(
        ["rsync", "-a", "-e", rsh, f"{tenant.sandbox_id}@127.0.0.1:{remote}", f"{back}/"],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert down.returncode == 0, down.stderr
    assert (back / "a.txt").read_text() == "alpha\n"
    assert (back / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()


# --- multiplexing and forwarding ------------------------------------------------------------


def test_controlmaster_runs_three_sessions_over_one_connection(
    ssh_client: SshClient, tenant: Tenant, gateway: GatewayProcess, tmp_path: Path
) -> None:
    control = tmp_path / "cm.sock"
    opts = ["-o", f"ControlPath={control}"]
    master = subprocess.run(
        [
            "ssh",
            *ssh_client.base(tenant.key),
            "-p",
            str(ssh_client.port),
            *opts,
            "-o",
            "ControlMaster=yes",
            "-o",
            "ControlPersist=60",
            "-N",
            "-f",
            f"{tenant.sandbox_id}@127.0.0.1",
        ],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert master.returncode == 0, master.stderr
    try:
        procs = [
            subprocess.Popen(
                [
                    "ssh",
                    *ssh_client.base(tenant.key),
                    "-p",
                    str(ssh_client.port),
                    *opts,
                    f"{tenant.sandbox_id}@127.0.0.1",
                    f"sleep 1; echo session-{i}; exit {i}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            for i in range(3)
        ]
        results = [(p.communicate(timeout=30), p.returncode) for p in procs]
        for i, ((out, err), code) in enumerate(results):
            assert out == f"session-{i}\n".encode(), err
            assert code == i
        logins = [
            line
            for line in gateway.log_path.read_text().splitlines()
            if '"auth_ok"' in line and tenant.sandbox_id in line
        ]
        assert len(logins) == 1
    finally:
        subprocess.run(
            [
                "ssh",
                *ssh_client.base(tenant.key),
                "-p",
                str(ssh_client.port),
                *opts,
                "-O",
                "exit",
                f"{tenant.sandbox_id}@127.0.0.1",
            ],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )


def test_stdio_forwarding_opens_tcp_from_inside_the_sandbox(
    ssh_client: SshClient, tenant: Tenant, sandbox_sshd: SandboxSshd
) -> None:
    # ssh -W is a direct-tcpip channel: here to the sandbox's own sshd, which greets first.
    r = ssh_client.ssh(
        tenant.key,
        tenant.sandbox_id,
        options=["-W", f"127.0.0.1:{sandbox_sshd.port}"],
        input=b"",
        timeout=30,
    )
    assert r.stdout.startswith(b"SSH-2.0-OpenSSH"), (r.returncode, r.stderr)


def test_local_port_forwarding_reaches_a_service_in_the_sandbox(
    ssh_client: SshClient, tenant: Tenant, sandbox_sshd: SandboxSshd
) -> None:
    local = free_port()
    proc = subprocess.Popen(
        [
            "ssh",
            *ssh_client.base(tenant.key),
            "-p",
            str(ssh_client.port),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            f"127.0.0.1:{local}:127.0.0.1:{sandbox_sshd.port}",
            f"{tenant.sandbox_id}@127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        banner = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not banner:
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=2) as s:
                    s.settimeout(5)
                    banner = s.recv(64)
            except OSError:
                time.sleep(0.1)
        assert banner.startswith(b"SSH-2.0-OpenSSH")
    finally:
        proc.terminate()
        proc.wait(10)


# --- who gets in ------------------------------------------------------------------------------


def test_key_from_other_org_is_refused(
    ssh_client: SshClient, make_tenant, gateway: GatewayProcess
) -> None:
    mine, theirs = make_tenant(), make_tenant()
    r = ssh_client.ssh(theirs.key, mine.sandbox_id, "echo should-not-run")
    assert r.returncode == 255
    assert b"should-not-run" not in r.stdout
    assert b"Permission denied" in r.stderr
    # ... while the same key opens its own org's sandbox.
    assert ssh_client.ssh(theirs.key, theirs.sandbox_id, "true").returncode == 0


def test_unknown_sandbox_is_refused_with_the_same_message_as_a_wrong_key(
    ssh_client: SshClient, make_tenant
) -> None:
    mine, theirs = make_tenant(), make_tenant()

    def interactive(key: object, login: str) -> subprocess.CompletedProcess[bytes]:
        # Not BatchMode: the hint comes with the keyboard-interactive attempt a client makes
        # once all its keys were refused (batch clients skip it).
        cmd = ["ssh", *ssh_client.base(key, batch=False), "-p", str(ssh_client.port)]
        return subprocess.run(
            [*cmd, f"{login}@127.0.0.1", "true"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )

    wrong_key = interactive(theirs.key, mine.sandbox_id)
    unknown = interactive(mine.key, unique("sandbox"))
    assert wrong_key.returncode == unknown.returncode == 255

    def normalise(stderr: bytes) -> str:
        return re.sub(r"sandbox-[a-z0-9-]+", "SANDBOX", stderr.decode())

    assert normalise(wrong_key.stderr) == normalise(unknown.stderr)
    assert "runtools ssh-key add" in unknown.stderr.decode()


def test_a_login_that_succeeds_after_an_unregistered_key_shows_no_hint(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path
) -> None:
    stranger = make_key(tmp_path, unique("stranger"))
    cmd = ["ssh", *ssh_client.base([stranger, tenant.key], batch=False), "-p", str(ssh_client.port)]
    r = subprocess.run(
        [*cmd, f"{tenant.sandbox_id}@127.0.0.1", "echo in"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"in\n"
    assert b"runtools" not in r.stderr


def test_revoked_key_is_refused_at_once(ssh_client: SshClient, tenant: Tenant) -> None:
    assert ssh_client.ssh(tenant.key, tenant.sandbox_id, "true").returncode == 0
    tenant.revoke(tenant.key_id)
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "echo still-in")
    assert r.returncode == 255
    assert b"still-in" not in r.stdout


def test_any_one_registered_key_among_several_offered_opens_the_sandbox(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path
) -> None:
    strangers = [make_key(tmp_path, unique("stranger")) for _ in range(3)]
    r = ssh_client.ssh([*strangers, tenant.key], tenant.sandbox_id, "echo in")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"in\n"


def test_too_many_refused_keys_end_the_connection(
    ssh_client: SshClient, tenant: Tenant, tmp_path: Path
) -> None:
    strangers = [make_key(tmp_path, unique("stranger")) for _ in range(7)]
    r = ssh_client.ssh([*strangers, tenant.key], tenant.sandbox_id, "echo in")
    assert r.returncode == 255
    assert b"too many keys refused" in r.stderr


def test_bad_login_name_is_refused_without_a_database_query(
    database_url: str, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    # A gateway whose database goes away after start: a well-formed login then hits the
    # database and is refused as "keystore unavailable"; a malformed one never gets that far.
    relay = TcpRelay.to_url(database_url)
    relay.start()
    proc = gateway_factory(database_url=relay.url, state_dir=tmp_path / "state")
    try:
        key = make_key(tmp_path, "k")
        client = client_for(proc, tmp_path)
        relay.stop()
        for bad in [
            "root",
            "Sandbox-abc",
            "sandbox-",
            "sandbox-ABC",
            "sandbox-a_b",
            "sandbox-" + "a" * 64,
        ]:
            r = client.ssh(key, bad, "true")
            assert r.returncode == 255
            assert b"is not a sandbox login" in r.stderr, (bad, r.stderr)
        r = client.ssh(key, "sandbox-well-formed", "true")
        assert r.returncode == 255
        assert b"cannot check keys right now" in r.stderr  # fails closed
    finally:
        proc.stop()
        relay.stop()


# --- failures after auth ------------------------------------------------------------------------


def test_stopped_sandbox_says_so_on_stderr_and_exits_nonzero(
    ssh_client: SshClient, tenant: Tenant
) -> None:
    tenant.set_status("stopped")
    r = ssh_client.ssh(tenant.key, tenant.sandbox_id, "echo hi")
    assert r.returncode == 255
    assert r.stdout == b""
    assert f"{tenant.sandbox_id} is stopped".encode() in r.stderr
    assert b"runtools sandbox start" in r.stderr


def test_upstream_host_key_mismatch_is_refused(
    ssh_client: SshClient,
    tenant: Tenant,
    sandbox_upstream: Upstream,
    tmp_path: Path,
    gateway: GatewayProcess,
) -> None:
    impostor = make_key(tmp_path, "impostor").public_line.rsplit(" ", 1)[0]
    sid = tenant.add_sandbox(replace(sandbox_upstream, host_keys=(impostor,)))
    r = ssh_client.ssh(tenant.key, sid, "echo should-not-run")
    assert r.returncode == 255
    assert r.stdout == b""
    assert b"unexpected host key" in r.stderr
    log = gateway.log_path.read_text()
    assert any(
        '"upstream_host_key_mismatch"' in line and '"error"' in line and sid in line
        for line in log.splitlines()
    )


def test_upstream_down_answers_within_the_timeout(
    ssh_client: SshClient, tenant: Tenant, sandbox_upstream: Upstream
) -> None:
    sid = tenant.add_sandbox(replace(sandbox_upstream, host="127.0.0.1", port=free_port()))
    t0 = time.monotonic()
    r = ssh_client.ssh(tenant.key, sid, "echo hi")
    elapsed = time.monotonic() - t0
    assert r.returncode == 255
    assert r.stdout == b""
    # Said as it happened: refused at once, not "did not answer within 3 s" after 1 s.
    assert b"could not be reached (its SSH port refused the connection)" in r.stderr
    assert elapsed < 10


def test_unresponsive_upstream_answers_within_the_configured_timeout(
    ssh_client: SshClient, tenant: Tenant, sandbox_upstream: Upstream
) -> None:
    # A listener that accepts TCP but never speaks SSH: the gateway's 3 s test timeout applies.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        sid = tenant.add_sandbox(replace(sandbox_upstream, host="127.0.0.1", port=port))
        t0 = time.monotonic()
        r = ssh_client.ssh(tenant.key, sid, "echo hi")
        elapsed = time.monotonic() - t0
    finally:
        silent.close()
    assert r.returncode == 255
    assert b"could not be reached (no answer within 3 s)" in r.stderr
    assert 2.5 < elapsed < 10
