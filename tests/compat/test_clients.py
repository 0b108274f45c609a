"""Each flow runs against ``direct`` and ``gateway``; the gateway's outcome must equal direct's."""

from __future__ import annotations

import asyncio

import asyncssh
import paramiko

from tests.compat.support import End, Record, run


def ssh(end: End, *args: str, input: bytes | None = None) -> tuple[int, bytes, bytes]:
    return run(["ssh", *end.ssh_opts(), "-p", str(end.port), end.dest, *args], input=input)


def test_openssh_exec(end: End, record: Record) -> None:
    """OpenSSH ssh: exec with stdout, stderr and exit status"""
    record(ssh(end, "printf out; printf err >&2; exit 3"))


def test_openssh_stdin_pipe(end: End, record: Record) -> None:
    """OpenSSH ssh: 1 MiB through stdin and back (tar-pipe style)"""
    data = bytes(range(256)) * 4096
    code, out, err = ssh(end, "cat", input=data)
    record((code, out == data, err))


def test_openssh_compression(end: End, record: Record) -> None:
    """OpenSSH ssh -C (zlib@openssh.com)"""
    code, out, err = run(
        ["ssh", *end.ssh_opts(), "-C", "-v", "-p", str(end.port), end.dest, "echo compressed"]
    )
    record((code, out, b"compression: zlib@openssh.com" in err))


def test_scp_both_modes(end: End, record: Record) -> None:
    """OpenSSH scp, SFTP mode and legacy -O mode, up and down"""
    src = end.workdir / "src.bin"
    src.write_bytes(b"x" * 70000)
    results = []
    for mode in ([], ["-O"]):
        base = ["scp", *mode, *end.ssh_opts(), "-P", str(end.port)]
        up = run([*base, str(src), f"{end.dest}:{end.workdir}/up{len(mode)}.bin"])[0]
        down = run([*base, f"{end.dest}:{end.workdir}/up{len(mode)}.bin", str(end.workdir / "d")])
        results.append((up, down[0], (end.workdir / "d").read_bytes() == src.read_bytes()))
    record(results)


def test_sftp_batch(end: End, record: Record) -> None:
    """OpenSSH sftp -b: mkdir, put, symlink, ls"""
    (end.workdir / "f.txt").write_text("hello\n")
    batch = (
        f"cd {end.workdir}\nmkdir sub\nput {end.workdir}/f.txt sub/g.txt\n"
        "symlink sub/g.txt link\nls -1 sub\n"
    )
    code, out, _ = run(
        ["sftp", *end.ssh_opts(), "-P", str(end.port), "-b", "-", end.dest], input=batch.encode()
    )
    link = (end.workdir / "link").readlink()
    record((code, out.replace(str(end.workdir).encode(), b"W"), str(link)))


def test_rsync(end: End, record: Record) -> None:
    """rsync -e ssh, a small tree"""
    tree = end.workdir / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "b.txt").write_text("b")
    rsh = "ssh " + " ".join(end.ssh_opts()) + f" -p {end.port}"
    code, _, err = run(["rsync", "-a", "-e", rsh, f"{tree}/", f"{end.dest}:{end.workdir}/copy/"])
    record((code, err, (end.workdir / "copy" / "a" / "b.txt").read_text()))


def test_openssh_unknown_subsystem(end: End, record: Record) -> None:
    """OpenSSH ssh -s with a subsystem the sandbox lacks: the session fails"""
    code, out, _ = ssh(end, "-s", "no-such-subsystem")
    record((code != 0, out))


def test_asyncssh_sftp_symlink(end: End, record: Record) -> None:
    """asyncssh client: exec, SFTP symlink (target, link order)"""

    async def flow() -> object:
        async with asyncssh.connect(
            "127.0.0.1",
            end.port,
            username=end.login,
            client_keys=[str(end.key.path)],
            known_hosts=None,
        ) as conn:
            r = await conn.run("echo hi; exit 4")
            async with conn.start_sftp_client() as sftp:
                await sftp.symlink("target.txt", f"{end.workdir}/al")
                listing = sorted(await sftp.listdir(str(end.workdir)))
            return (r.exit_status, r.stdout, listing, str((end.workdir / "al").readlink()))

    record(asyncio.run(flow()))


def test_paramiko(end: End, record: Record) -> None:
    """paramiko: exec and SFTP listdir"""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # noqa: S507 (throwaway test hosts)
    client.connect(
        "127.0.0.1",
        end.port,
        username=end.login,
        key_filename=str(end.key.path),
        look_for_keys=False,
        allow_agent=False,
    )
    try:
        _, out, err = client.exec_command("echo para; exit 2")
        status = out.channel.recv_exit_status()
        sftp = client.open_sftp()
        (end.workdir / "p.txt").write_text("p")
        listing = sorted(sftp.listdir(str(end.workdir)))
        record((status, out.read(), err.read(), listing))
    finally:
        client.close()


def test_dropbear_dbclient(end: End, record: Record) -> None:
    """Dropbear dbclient: exec (guessed first kex packet)"""
    key = end.workdir / "db.key"
    run(["dropbearconvert", "openssh", "dropbear", str(end.key.path), str(key)])
    record(
        run(
            [
                "dbclient",
                "-y",
                "-y",
                "-i",
                str(key),
                "-p",
                str(end.port),
                end.dest,
                "echo dropbear; exit 5",
            ]
        )
    )
