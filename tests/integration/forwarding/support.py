"""Helpers shared by the forwarding tests: a real ``ssh-agent`` holding one key, and a key's
fingerprint as ``ssh-keygen -lf`` prints it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from gateway.lab.seed import unique
from gateway.lab.user_keys import UserKey


def fingerprint(key: UserKey) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(key.pub)], capture_output=True, check=True)
    return out.stdout.split()[1].decode()


class Agent:
    """``ssh-agent`` holding one key, for ``ssh -A``."""

    def __init__(self, directory: Path, key: UserKey) -> None:
        self.sock = directory / f"agent-{unique('a')}.sock"
        self.proc = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(self.sock)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not self.sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(self.sock)}
        subprocess.run(["ssh-add", str(key.path)], env=env, check=True, capture_output=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
