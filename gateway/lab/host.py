"""What the lab's child processes need from this host: a free loopback port, directories the
sandbox user and the ``postgres`` user can reach, and the tail of a server's log for errors."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

LOG_TAIL_LINES = 30


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_traversable(path: Path) -> None:
    """Give "others" search (x) permission on ``path`` and each parent that lacks it.

    Only the execute bit is added, so other users can reach the directory below without being
    able to list anything on the way.
    """
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)


def log_tail(path: str, what: str, lines: int = LOG_TAIL_LINES, start: int = 0) -> str:
    """The last ``lines`` of the log at ``path`` from byte ``start`` on, or why there are none."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return f"(no {what} log)"
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) if text else f"({what} log is empty)"
