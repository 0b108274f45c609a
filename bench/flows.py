"""Round-trip-bound flows, gateway vs plain OpenSSH direct (issue 14); used by ``bench/run.py``.

* echo round trip: an asyncssh client writes 1 byte to a remote ``cat`` and waits for it, many
  times, on one channel (the client's own cost is the same on both paths);
* a small-file tree (many files of a few KiB, random bytes) moved both ways with ``scp`` (SFTP
  mode, OpenSSH 9's default), ``scp -O`` (the legacy protocol), ``sftp -r``, ``rsync -az`` and
  ``tar`` piped over ``ssh``;
* interactive echo (one byte every 2 ms) while another client pushes bulk data through the same
  gateway process, to the same sandbox and to another one;
* the first session on a connection that has been idle longer than the gateway's
  ``upstream.pool_idle_seconds`` (the shared upstream connection has closed meanwhile);
* auth decision time under bursts of 32 concurrent logins, from the gateway's
  ``rtgw_auth_decision_seconds`` histogram on ``/metrics`` and its ``auth_lookup`` log lines.

The sandbox sshd runs on this machine, so the bench (root) creates and deletes the remote
directories itself.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from bench.lab import Lab

# --- echo round trips ---


async def _echo(conn: asyncssh.SSHClientConnection, count: int, gap: float) -> list[float]:
    proc = await conn.create_process("cat", encoding=None)
    samples = []
    try:
        for i in range(count + 20):  # the first 20 are warm-up
            t0 = time.perf_counter()
            proc.stdin.write(b"x")
            await proc.stdout.readexactly(1)
            if i >= 20:
                samples.append(time.perf_counter() - t0)
            if gap:
                await asyncio.sleep(gap)
    finally:
        proc.stdin.write_eof()
        proc.close()
    return samples


async def _echo_on(options: dict[str, Any], count: int, gap: float) -> list[float]:
    async with asyncssh.connect(**options) as conn:
        return await _echo(conn, count, gap)


def echo_rtt(lab: Lab, path: str, count: int, gap: float = 0.0) -> list[float]:
    """Seconds per 1-byte echo through a remote ``cat`` on one channel."""
    return asyncio.run(_echo_on(lab.client_options(path), count, gap))


def echo_rtt_openssh(lab: Lab, path: str, count: int) -> list[float]:
    """Seconds per 1-byte echo through ``ssh … cat`` driven over its stdin/stdout pipes: the
    OpenSSH client on every path, so ``direct``, ``bastion`` (``-J``, OpenSSH's own proxy hop)
    and ``gateway`` compare like for like. The first 20 echoes (the login among them) are
    warm-up."""
    proc = subprocess.Popen(
        lab.ssh_cmd(path, "cat"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stdout is not None
    samples = []
    try:
        fd_in, fd_out = proc.stdin.fileno(), proc.stdout.fileno()
        for i in range(count + 20):
            t0 = time.perf_counter()
            os.write(fd_in, b"x")
            if os.read(fd_out, 1) != b"x":
                raise RuntimeError(f"ssh via {path} stopped echoing (exit {proc.poll()})")
            if i >= 20:
                samples.append(time.perf_counter() - t0)
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return samples


def bulk_neighbour(lab: Lab, path: str) -> subprocess.Popen[bytes]:
    """An ``ssh … 'cat > /dev/null' < /dev/zero`` that runs until killed."""
    zero = open("/dev/zero", "rb")
    try:
        return subprocess.Popen(
            lab.ssh_cmd(path, "cat > /dev/null"),
            stdin=zero,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        zero.close()


def _rchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def echo_beside_bulk(
    lab: Lab, echo_path: str, bulk_path: str, count: int
) -> tuple[list[float], float]:
    """Echo samples (one every 2 ms) on ``echo_path`` while an ``ssh`` on ``bulk_path`` uploads
    from ``/dev/zero``; and the neighbour's rate meanwhile in MB/s (its ``rchar``, i.e. what it
    read from stdin and the socket: a rough figure, to show the bulk stream kept moving)."""
    bulk = bulk_neighbour(lab, bulk_path)
    try:
        time.sleep(1.0)  # let the bulk stream reach full speed
        if bulk.poll() is not None:
            raise RuntimeError(f"bulk neighbour via {bulk_path} exited {bulk.returncode}")
        r0, t0 = _rchar(bulk.pid), time.monotonic()
        samples = echo_rtt(lab, echo_path, count, gap=0.002)
        rate = (_rchar(bulk.pid) - r0) / (time.monotonic() - t0) / 1e6
        if bulk.poll() is not None:
            raise RuntimeError(f"bulk neighbour via {bulk_path} exited {bulk.returncode}")
    finally:
        bulk.send_signal(signal.SIGKILL)
        bulk.wait()
    return samples, rate


# --- first session after idle ---


async def _after_idle(
    lab: Lab, paths: tuple[str, ...], wait: float, rounds: int
) -> list[dict[str, float]]:
    conns = {p: await asyncssh.connect(**lab.client_options(p)) for p in paths}
    try:
        for conn in conns.values():  # one session each first: every pool and cache is warm
            await conn.run("true", check=True)
        out = []
        for _ in range(rounds):
            await asyncio.sleep(wait)
            times = {}
            for path, conn in conns.items():
                t0 = time.perf_counter()
                await conn.run("true", check=True)
                times[path] = time.perf_counter() - t0
            out.append(times)
        return out
    finally:
        for conn in conns.values():
            conn.close()


def first_session_after_idle(lab: Lab, wait: float, rounds: int = 1) -> list[dict[str, float]]:
    """Seconds for ``true`` on an already authenticated connection idle for ``wait`` s, once
    per round (each round waits again), per path."""
    return asyncio.run(_after_idle(lab, ("direct", "gateway"), wait, rounds))


# --- small-file tree ---


def make_tree(root: Path, files: int, total_bytes: int, seed: int = 14) -> None:
    """``files`` files of random bytes (sizes 0.25x..1.75x the mean), 100 per directory."""
    rng = random.Random(seed)
    mean = total_bytes // files
    for i in range(files):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(mean // 4, mean * 7 // 4)
        (d / f"f{i:05d}.bin").write_bytes(rng.randbytes(size))


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


@dataclass
class TreeLab:
    """A local tree, a remote tree (readable by the sandbox user) and scratch destinations."""

    lab: Lab
    files: int
    total_bytes: int

    def __post_init__(self) -> None:
        base = self.lab.workdir
        self.local_src = base / "tree-local"
        self.remote = base / "tree-remote"
        self.remote.mkdir(exist_ok=True)
        os.chmod(self.remote, 0o1777)  # noqa: S103 - the sandbox user writes uploads here
        self.remote_src = self.remote / "src"
        make_tree(self.local_src, self.files, self.total_bytes)
        shutil.copytree(self.local_src, self.remote_src)
        self.local_dst = base / "tree-down"
        self.remote_dst = self.remote / "up"

    def clean(self) -> None:
        shutil.rmtree(self.local_dst, ignore_errors=True)
        shutil.rmtree(self.remote_dst, ignore_errors=True)

    def command(self, flow: str, direction: str, path: str) -> list[str]:
        lab = self.lab
        port, login = lab.target(path)
        cfg = str(lab.ssh_config)
        host = f"{login}@127.0.0.1"
        up = direction == "up"
        src, dst = (
            (str(self.local_src), f"{host}:{self.remote_dst}")
            if up
            else (f"{host}:{self.remote_src}", str(self.local_dst))
        )
        if flow in ("scp", "scp -O"):
            extra = ["-O"] if flow == "scp -O" else []
            return ["scp", "-F", cfg, "-P", str(port), "-q", *extra, "-r", src, dst]
        if flow == "sftp -r":
            op = (
                f"put -r {self.local_src} {self.remote_dst}"
                if up
                else f"get -r {self.remote_src} {self.local_dst}"
            )
            return ["sh", "-c", f"echo {shlex.quote(op)} | sftp -q -F {cfg} -P {port} -b - {host}"]
        if flow == "rsync -az":
            rsh = f"ssh -F {cfg} -p {port}"
            return ["rsync", "-az", "-e", rsh, src.rstrip("/") + "/", dst.rstrip("/") + "/"]
        if flow == "tar":
            ssh = shlex.join(["ssh", "-F", cfg, "-p", str(port), host])
            if up:
                remote = f"mkdir -p {self.remote_dst} && tar -C {self.remote_dst} -xf -"
                line = f"tar -C {self.local_src} -cf - . | {ssh} {shlex.quote(remote)}"
            else:
                remote = f"tar -C {self.remote_src} -cf - ."
                line = (
                    f"mkdir -p {self.local_dst} && {ssh} {shlex.quote(remote)}"
                    f" | tar -C {self.local_dst} -xf -"
                )
            return ["bash", "-o", "pipefail", "-c", line]
        raise ValueError(flow)

    def run(self, flow: str, direction: str, path: str) -> float:
        """Seconds for one transfer of the whole tree; checks every file arrived."""
        self.clean()
        cmd = self.command(flow, direction, path)
        t0 = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {result.returncode}: {result.stderr!r}")
        landed = count_files(self.remote_dst if direction == "up" else self.local_dst)
        if landed != self.files:
            raise RuntimeError(f"{flow} {direction} via {path}: {landed} of {self.files} files")
        self.clean()
        return elapsed

    def remove(self) -> None:
        self.clean()
        shutil.rmtree(self.local_src, ignore_errors=True)
        shutil.rmtree(self.remote, ignore_errors=True)


TREE_FLOWS = ("scp", "scp -O", "sftp -r", "rsync -az", "tar")


# --- auth decisions under concurrent logins ---

_BUCKET = re.compile(r'^rtgw_auth_decision_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', re.M)


def auth_histogram(lab: Lab) -> dict[float, float] | None:
    """Cumulative bucket counts of ``rtgw_auth_decision_seconds`` (None if not served)."""
    assert lab.gateway is not None
    # The ops listener (GatewayProcess.metrics_port); older checkouts served /metrics on the API.
    port = getattr(lab.gateway, "metrics_port", 0) or lab.gateway.api_port
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return {float(le): float(n) for le, n in _BUCKET.findall(text)}


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of the observations between scrapes."""
    deltas = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = deltas[-1][1] if deltas else 0.0
    for le, cumulative in deltas:
        if cumulative >= q * total:
            return le
    return float("inf")


def login_bursts(lab: Lab, clients: int, rounds: int) -> int:
    """``rounds`` bursts of ``clients`` simultaneous ``ssh gateway true``; failures."""
    cmd = lab.ssh_cmd("gateway", "true")
    failed = 0
    lock = threading.Lock()

    def one(barrier: threading.Barrier) -> None:
        nonlocal failed
        barrier.wait()
        result = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        if result.returncode != 0:
            with lock:
                failed += 1

    for _ in range(rounds):
        barrier = threading.Barrier(clients)
        threads = [threading.Thread(target=one, args=(barrier,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return failed
