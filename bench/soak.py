"""Soak: session churn while the gateway is being attacked; resources must stay flat.

    python -m bench.soak              # 10 minutes (the default), a row every 30 s
    python -m bench.soak --smoke      # 30 s, a row every 5 s (CI: runs end to end, no thresholds)
    python -m bench.soak --minutes 3 --every 10

Brings up the bench lab (throwaway PostgreSQL, a sandbox sshd, the gateway as a subprocess;
bench/lab.py), then for the whole run, at the same time:

- 127.0.0.2 holds 150 silent TCP connections, reopening each one the gateway drops;
- 127.0.0.3 makes 20 failing logins a second (an unregistered key);
- 127.0.0.4 is the legitimate user: back-to-back ``ssh … true`` logins (session churn),
  each timed.

Every row prints the gateway's RSS (``/proc/PID/status``), open file descriptors
(``/proc/PID/fd``), asyncio tasks (the ``rtgw_asyncio_tasks`` metric), the legitimate logins
done in the interval, their p50/p99 latency and failures. The expected result is flat rows:
memory, fds and tasks that do not grow with time, and p99 login latency that stays low. The
final line compares the last row with the first. Every loop stops by itself at the deadline.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.lab import Lab
from gateway.lab.attacks import FailingLogins, IdleHolder

LEGIT_SOURCE = "127.0.0.4"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(seconds: float, every: float) -> int:
    with Lab() as lab:
        assert lab.gateway is not None
        gw = lab.gateway
        sandbox = "sandbox-bench"
        cmd = lab.ssh_cmd("gateway", "true")
        cmd[1:1] = ["-b", LEGIT_SOURCE]
        print(
            f"== runtools-gateway soak: {seconds:g} s, a row every {every:g} s; "
            f"attackers 127.0.0.2 (150 idle sockets), 127.0.0.3 (20 failing logins/s); "
            f"user {LEGIT_SOURCE} (ssh {sandbox} true, back to back)",
            flush=True,
        )
        header = "| t (s) | RSS MiB | fds | tasks | logins | p50 ms | p99 ms | failed |"
        print(header)
        print("|" + "---|" * 8)
        rows: list[tuple[float, float, int, float | None]] = []
        failed_total = 0
        start = time.monotonic()
        end = start + seconds
        with (
            IdleHolder(gw.ssh_port, "127.0.0.2", 150),
            FailingLogins(gw.ssh_port, "127.0.0.3", sandbox, 20),
        ):
            next_row = start + every
            latencies: list[float] = []
            failed = 0
            while time.monotonic() < end:
                t0 = time.monotonic()
                result = subprocess.run(
                    cmd, capture_output=True, timeout=30, stdin=subprocess.DEVNULL, check=False
                )
                took = time.monotonic() - t0
                if result.returncode == 0:
                    latencies.append(took * 1000)
                else:
                    failed += 1
                if time.monotonic() >= next_row:
                    t = time.monotonic() - start
                    rss, fds = rss_mib(gw.pid), open_fds(gw.pid)
                    tasks = metric(gw.metrics_port, "rtgw_asyncio_tasks")
                    rows.append((t, rss, fds, tasks))
                    shown = f"{tasks:.0f}" if tasks is not None else "-"
                    print(
                        f"| {t:.0f} | {rss:.1f} | {fds} | {shown} | {len(latencies)} | "
                        f"{p(latencies, 0.5):.0f} | {p(latencies, 0.99):.0f} | {failed} |",
                        flush=True,
                    )
                    failed_total += failed
                    latencies, failed = [], 0
                    next_row += every
        if len(rows) >= 2:
            (_, rss0, fds0, tasks0), (_, rss1, fds1, tasks1) = rows[0], rows[-1]
            growth = statistics.fmean([r[1] for r in rows[len(rows) // 2 :]]) - rss0
            print(
                f"first -> last row: RSS {rss0:.1f} -> {rss1:.1f} MiB "
                f"(second-half mean {growth:+.1f} MiB), fds {fds0} -> {fds1}, "
                f"tasks {tasks0} -> {tasks1}; legitimate logins failed: {failed_total}"
            )
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description="soak the gateway")
    parser.add_argument("--minutes", type=float, default=10.0, help="run length (default 10)")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between rows")
    parser.add_argument("--smoke", action="store_true", help="30 s, a row every 5 s (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        return run(30.0, 5.0)
    return run(args.minutes * 60.0, args.every)


if __name__ == "__main__":
    sys.exit(main())
