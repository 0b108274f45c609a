"""Where the gateway's time goes: py-spy samples of the gateway process during one workload.

    python -m bench.profile [--seconds 10] [--workload echo|up|down] [--out DIR]

Brings up the bench lab (``bench/lab.py``), starts the workload through the gateway, records
the gateway process with ``py-spy record --format raw --idle`` (install py-spy into the venv:
``pip install py-spy``; it ships its binary in the wheel) and prints the top frames by own time
and by inclusive time, as percentages of all samples. The raw collapsed stacks stay in ``--out``
(feed them to flamegraph.pl or speedscope).

* ``echo``: one asyncssh client echoing 1 byte through a remote ``cat``, back to back;
* ``up`` / ``down``: ``ssh … 'cat > /dev/null' < /dev/zero`` / ``ssh … 'cat /dev/zero'``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import flows
from bench.lab import Lab

IDLE = "EpollSelector.select"


def summarize(raw: Path, top: int = 25) -> str:
    """Top frames of the event-loop thread (the idle executor threads are left out), as shares
    of its samples; ``select`` (waiting in epoll) is the loop's idle time."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "concurrent/futures/thread.py" in stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    idle = sum(n for f, n in own.items() if f.startswith(IDLE))
    out = [f"{total} samples of the event-loop thread, {100 * idle / total:.1f}% idle in epoll"]
    out += ["", "own time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workload", choices=("echo", "up", "down"), default="echo")
    parser.add_argument("--out", type=Path, default=Path("/tmp/rtgw-profile"))
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"{args.workload}.txt"
    with Lab(pool_idle_seconds=60) as lab:
        lab.gateway_pid  # noqa: B018 - fails early if the gateway is not up
        bulk = None
        stop = threading.Event()
        echo_thread = None
        if args.workload == "echo":

            def loop() -> None:
                while not stop.is_set():
                    flows.echo_rtt(lab, "gateway", 2000)

            echo_thread = threading.Thread(target=loop, daemon=True)
            echo_thread.start()
        elif args.workload == "up":
            bulk = flows.bulk_neighbour(lab, "gateway")
        else:
            bulk = subprocess.Popen(
                lab.ssh_cmd("gateway", "cat /dev/zero"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(2.0)
        subprocess.run(
            [
                pyspy,
                "record",
                "--pid",
                str(lab.gateway_pid),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--idle",
                "--nonblocking",
                "-o",
                str(raw),
            ],
            check=True,
            capture_output=True,
        )
        stop.set()
        if bulk is not None:
            bulk.send_signal(signal.SIGKILL)
            bulk.wait()
        if echo_thread is not None:
            echo_thread.join(30)
    print(f"== {args.workload}: {raw}")
    print(summarize(raw))
    return 0


def summarize_main(argv: list[str] | None = None) -> int:
    """``python -c 'from bench.profile import summarize_main; summarize_main()' FILE...``"""
    for name in argv if argv is not None else sys.argv[1:]:
        print(f"== {name}")
        print(summarize(Path(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
