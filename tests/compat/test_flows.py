"""More flows, each against ``direct`` and ``gateway``: pty resizes in tmux, ControlMaster,
-L/-D/-W, git, PuTTY, lftp, editor-like clients, large environments."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path

import asyncssh

from gateway.lab.process import free_port
from tests.compat.support import (
    End,
    Record,
    connect_when_listening,
    echo_server,
    echo_through,
    read_until,
    run,
    socks5_connect,
    stop,
    wait_for,
)

PAYLOAD = os.urandom(100_000)


# --- OpenSSH: terminals -------------------------------------------------------------------------


class Tmux:
    """A detached tmux session running one command, sized like a terminal window."""

    def __init__(self, command: list[str], cols: int, rows: int) -> None:
        self.name = f"compat-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            [
                "tmux",
                "new-session",
                "-d",
                "-s",
                self.name,
                "-x",
                str(cols),
                "-y",
                str(rows),
                shlex.join(command),
            ],
            check=True,
            timeout=10,
        )

    def resize(self, cols: int, rows: int) -> None:
        subprocess.run(
            ["tmux", "resize-window", "-t", self.name, "-x", str(cols), "-y", str(rows)],
            check=True,
            timeout=10,
        )

    def type(self, text: str) -> None:
        subprocess.run(
            ["tmux", "send-keys", "-t", self.name, text, "Enter"], check=True, timeout=10
        )

    def screen(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True
        ).stdout

    def alive(self) -> bool:
        return (
            subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode
            == 0
        )

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True, timeout=10)


def size_seen(tmux: Tmux, out: Path, expected: str) -> str:
    """Ask the shell for ``stty size`` (into ``out``) until it says ``expected`` (bounded)."""

    def asked() -> bool:
        out.unlink(missing_ok=True)
        tmux.type(f"stty size > {out}.t && mv {out}.t {out}")
        wait_for(out.exists, 2, 0.02)
        return out.exists() and out.read_text().strip() == expected

    wait_for(asked, 8, 0)
    return out.read_text().strip() if out.exists() else "nothing"


def test_openssh_pty_tmux_resizes(end: End, record: Record) -> None:
    """OpenSSH ssh -tt in tmux: shell on a pty, two window resizes seen by `stty size` inside"""
    tmux = Tmux(end.ssh_argv("-tt"), 80, 24)
    try:
        assert wait_for(lambda: "$" in tmux.screen(), 15), tmux.screen()
        out = end.workdir / "size"
        sizes = [size_seen(tmux, out, "24 80")]
        for cols, rows in ((120, 40), (90, 30)):
            tmux.resize(cols, rows)
            sizes.append(size_seen(tmux, out, f"{rows} {cols}"))
        tmux.type("exit 7")
        gone = wait_for(lambda: not tmux.alive(), 10)
        record((sizes, gone))
    finally:
        tmux.kill()


def test_openssh_resize_right_after_shell_request(end: End, record: Record) -> None:
    """OpenSSH ssh -tt in tmux: window resized the moment the command request is sent"""
    log = end.workdir / "ssh.log"
    out = end.workdir / "size"
    command = f"sleep 1; stty size > {out}"
    tmux = Tmux([*end.ssh_argv("-tt", "-vv", "-E", str(log)), command], 80, 24)
    try:
        sent = wait_for(lambda: log.exists() and b"Sending command" in log.read_bytes(), 15, 0.002)
        tmux.resize(132, 43)  # through the gateway: before its upstream session exists
        wait_for(lambda: not tmux.alive(), 10)
        record((sent, out.read_text().strip() if out.exists() else "nothing"))
    finally:
        tmux.kill()


def test_asyncssh_window_change_before_upstream(end: End, record: Record) -> None:
    """asyncssh client: window-change sent right after the shell request is applied"""

    async def flow() -> object:
        async with asyncssh.connect(
            "127.0.0.1",
            end.port,
            username=end.login,
            client_keys=[str(end.key.path)],
            known_hosts=None,
        ) as conn:
            proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
            proc.change_terminal_size(132, 43)  # same tick as the shell request's reply
            proc.stdin.write("sleep 0.3; echo size=$(stty size); exit 3\n")
            result = await asyncio.wait_for(proc.wait(), 15)
            sizes = re.findall(r"size=(\d+ \d+)", str(result.stdout))
            return (result.exit_status, sizes)

    record(asyncio.run(flow()))


# --- OpenSSH: multiplexing and forwarding -------------------------------------------------------


def test_openssh_controlmaster(end: End, record: Record) -> None:
    """OpenSSH ControlMaster: master, then 3 sessions through the control socket, exit codes"""
    control = ["-o", f"ControlPath={end.workdir}/cm.sock"]
    master = run(
        end.ssh_argv(*control, "-o", "ControlMaster=yes", "-o", "ControlPersist=30", "-N", "-f")
    )
    try:
        procs = [
            subprocess.Popen(
                [*end.ssh_argv(*control, "-o", "ControlMaster=no"), f"echo s{i}; exit {i}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            for i in range(3)
        ]
        sessions = [(p.communicate(timeout=20), p.returncode) for p in procs]
        check = run(end.ssh_argv(*control, "-O", "check"))[0]
    finally:
        run(end.ssh_argv(*control, "-O", "exit"))
    record((master[0], sessions, check))


def test_openssh_local_forward(end: End, record: Record) -> None:
    """OpenSSH ssh -L to a TCP echo server inside the sandbox: 100 kB both ways, twice"""
    local = free_port()
    with echo_server() as port:
        proc = subprocess.Popen(
            end.ssh_argv("-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local}:127.0.0.1:{port}"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            echoed = [echo_through(connect_when_listening(local), PAYLOAD) for _ in range(2)]
        finally:
            stop(proc)
    record(echoed)


def test_openssh_dynamic_forward(end: End, record: Record) -> None:
    """OpenSSH ssh -D: SOCKS5 CONNECT to a server inside the sandbox, and to a closed port"""
    local, closed = free_port(), free_port()
    with echo_server() as port:
        proc = subprocess.Popen(
            end.ssh_argv("-N", "-D", f"127.0.0.1:{local}"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            echoed = echo_through(socks5_connect(local, "127.0.0.1", port), PAYLOAD)
            try:
                socks5_connect(local, "127.0.0.1", closed).close()
                refused = "connected"
            except OSError as exc:  # OpenSSH closes the SOCKS socket without a reply
                refused = str(exc)
        finally:
            stop(proc)
        _, err = proc.communicate(timeout=5)
    record((echoed, refused, err.decode().replace(str(closed), "PORT").splitlines()))


def test_openssh_stdio_forward(end: End, record: Record) -> None:
    """OpenSSH ssh -W: bytes to a server inside the sandbox and back; a closed port's error"""
    closed = free_port()
    with echo_server() as port:
        code, out, err = run(end.ssh_argv("-W", f"127.0.0.1:{port}"), input=PAYLOAD)
    failed = run(end.ssh_argv("-W", f"127.0.0.1:{closed}"), input=b"")
    record((code, out == PAYLOAD, err, failed[0], failed[2].replace(str(closed).encode(), b"P")))


# --- git ---------------------------------------------------------------------------------------


def test_git_clone_push(end: End, record: Record) -> None:
    """git over ssh: clone an empty bare repo in the sandbox home, commit, push, clone again"""
    repo = f"compat-{uuid.uuid4().hex[:8]}.git"
    assert run([*end.ssh_argv(), f"git init -q --bare {repo}"])[0] == 0
    env = dict(os.environ, GIT_SSH_COMMAND=shlex.join(["ssh", *end.ssh_opts()]))
    env.update(GIT_AUTHOR_NAME="c", GIT_AUTHOR_EMAIL="c@x", GIT_COMMITTER_NAME="c")
    env["GIT_COMMITTER_EMAIL"] = "c@x"
    url = f"ssh://{end.dest}:{end.port}/~/{repo}"
    one, two = end.workdir / "one", end.workdir / "two"
    try:
        steps = [run(["git", "clone", "-q", url, str(one)], env=env)[0]]
        (one / "hello.txt").write_text("hello\n")
        steps.append(run(["git", "-C", str(one), "add", "hello.txt"], env=env)[0])
        steps.append(run(["git", "-C", str(one), "commit", "-qm", "first"], env=env)[0])
        steps.append(run(["git", "-C", str(one), "push", "-q", "origin", "HEAD:main"], env=env)[0])
        steps.append(run(["git", "clone", "-q", "-b", "main", url, str(two)], env=env)[0])
        refs = run(["git", "ls-remote", url], env=env)
        names = [line.split()[1] for line in refs[1].decode().splitlines()]
        content = (two / "hello.txt").read_text() if (two / "hello.txt").exists() else None
    finally:
        run([*end.ssh_argv(), f"rm -rf {repo}"])
    record((steps, refs[0], names, content))


# --- PuTTY -------------------------------------------------------------------------------------


def putty_opts(end: End) -> list[str]:
    opts = ["-batch", "-P", str(end.port), "-i", str(end.ppk())]
    for fingerprint in end.host_key_fingerprints():
        opts += ["-hostkey", fingerprint]
    return opts


def test_putty_plink(end: End, record: Record) -> None:
    """PuTTY plink -batch, host key pinned with -hostkey: exec, stdout, stderr, exit status"""
    code, out, err = run(
        ["plink", "-ssh", *putty_opts(end), end.dest, "echo p; echo e >&2; exit 6"]
    )
    record((code, out, err.replace(end.login.encode(), b"USER")))


def listing_names(text: str) -> list[str]:
    """File names from an `ls -l`-style listing (dates and owners differ from run to run)."""
    return sorted(
        line.split()[-1] for line in text.splitlines() if re.match(r"^[-dl][rwxsStT-]{9}", line)
    )


def test_putty_psftp(end: End, record: Record) -> None:
    """PuTTY psftp -b: cd, put, get, ls"""
    (end.workdir / "local.txt").write_text("psftp\n")
    batch = end.workdir / "psftp.batch"
    batch.write_text(
        f"cd {end.workdir}\nlcd {end.workdir}\nmkdir d\nput local.txt d/remote.txt\n"
        "get d/remote.txt back.txt\nls d\n"
    )
    code, out, err = run(["psftp", *putty_opts(end), "-b", str(batch), end.dest])
    back = (end.workdir / "back.txt").read_text() if (end.workdir / "back.txt").exists() else None
    record((code, listing_names(out.decode()), back, err.replace(end.login.encode(), b"USER")))


# --- lftp ---------------------------------------------------------------------------------------


def test_lftp_sftp(end: End, record: Record) -> None:
    """lftp over sftp:// with ssh as connect-program: ls, put, get"""
    (end.workdir / "l.txt").write_text("lftp\n")
    program = shlex.join(["ssh", "-a", "-x", *end.ssh_opts()])
    script = (
        f'set sftp:connect-program "{program}"; set net:max-retries 1; set cmd:fail-exit yes; '
        f"cd {end.workdir}; put {end.workdir}/l.txt -o up.txt; "
        f"get up.txt -o {end.workdir}/down.txt; cls -1; bye"
    )
    code, out, err = run(
        ["lftp", "-e", script, f"sftp://{end.login}:@127.0.0.1:{end.port}"], timeout=30
    )
    down = end.workdir / "down.txt"
    record((code, sorted(out.decode().split()), down.read_text() if down.exists() else None, err))


# --- editor-like clients -------------------------------------------------------------------------


def test_vscode_remote_ssh(end: End, record: Record) -> None:
    """VS Code Remote-SSH style: ssh -T -D, a bash script on stdin, SOCKS CONNECT meanwhile"""
    local = free_port()
    script = (
        b'echo "listeningOn==$((40 + 2))=="\n'
        b'while read -r line; do [ "$line" = quit ] && { echo bye; exit 0; }; '
        b'echo "ack $line"; done\n'
    )
    with echo_server() as port:
        proc = subprocess.Popen(
            [*end.ssh_argv("-T", "-D", f"127.0.0.1:{local}"), "bash"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(script)
            proc.stdin.flush()
            marker = read_until(proc, b"==42==", 15)
            echoed = echo_through(socks5_connect(local, "127.0.0.1", port), PAYLOAD)
            rest, err = proc.communicate(b"one\nquit\n", timeout=15)
        finally:
            stop(proc)
    record((proc.returncode, marker + rest, echoed, err))


def test_jetbrains_gateway(end: End, record: Record) -> None:
    """JetBrains Gateway style: one connection doing exec, SFTP and direct-tcpip at once"""
    (end.workdir / "j.txt").write_text("jet")

    async def flow(port: int) -> object:
        async with asyncssh.connect(
            "127.0.0.1",
            end.port,
            username=end.login,
            client_keys=[str(end.key.path)],
            known_hosts=None,
        ) as conn:

            async def exec_() -> object:
                r = await conn.run("sleep 0.5; echo jb; exit 9")
                return (r.exit_status, r.stdout)

            async def sftp() -> object:
                async with conn.start_sftp_client() as client:
                    await client.put(str(end.workdir / "j.txt"), f"{end.workdir}/k.txt")
                    return sorted(await client.listdir(str(end.workdir)))

            async def tcp() -> object:
                reader, writer = await conn.open_connection("127.0.0.1", port)
                writer.write(PAYLOAD)
                got = await reader.readexactly(len(PAYLOAD))
                writer.close()
                return got == PAYLOAD

            return await asyncio.wait_for(asyncio.gather(exec_(), sftp(), tcp()), 20)

    with echo_server() as port:
        record(asyncio.run(flow(port)))


# --- environment ---------------------------------------------------------------------------------

ENV_BOUND = "refused visibly beyond 128 variables / 128 KiB"


def refused_visibly(outcome: object) -> bool:
    code, out, err = outcome  # type: ignore[misc]
    return code == 255 and out == "" and "environment is too large" in err


def env_flow(end: End, variables: dict[str, str]) -> tuple[int, str, str]:
    env = dict(os.environ, **variables)
    script = 'printf "%s %s\\n" "$(printenv RT_BIG | wc -c)" "$(env | grep -c ^RT_V)"'
    code, out, err = run([*end.ssh_argv("-o", "SendEnv=RT_*"), script], env=env)
    return code, out.decode(), err.decode()


def test_env_40000_byte_variable(end: End, record: Record) -> None:
    """OpenSSH SendEnv: one 40,000-byte variable arrives whole"""
    record(env_flow(end, {"RT_BIG": "x" * 40_000}), differs_as=ENV_BOUND, accepted=refused_visibly)


def test_env_200_variables(end: End, record: Record) -> None:
    """OpenSSH SendEnv: 200 variables (direct sshd keeps the first 129, silently)"""
    many = {f"RT_V{i:03}": str(i) for i in range(200)}
    record(env_flow(end, many), differs_as=ENV_BOUND, accepted=refused_visibly)


def test_env_over_128_kib(end: End, record: Record) -> None:
    """OpenSSH SendEnv: four 40,000-byte variables (160 kB)"""
    big = {f"RT_V{i}": "y" * 40_000 for i in range(4)}
    record(env_flow(end, big), differs_as=ENV_BOUND, accepted=refused_visibly)
