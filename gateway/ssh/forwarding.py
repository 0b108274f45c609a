"""Helpers for remote and Unix-socket forwardings (gateway/ssh/channels.py uses them).

* ``printable_dest`` - a client-supplied host, port or socket path made safe for logs and
  audit rows: printable ASCII, at most ``MAX_DEST`` characters.
* ``RemoteListener`` - what the SSH door hands asyncssh for an ``ssh -R`` request: the
  listener inside the sandbox (on the client's own upstream connection), reporting the port
  the sandbox allocated (``-R 0:...``: ssh prints "Allocated port N") and telling its owner
  once when it closes (cancelled by the client, or with the connection).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

MAX_DEST = 200


def printable_dest(text: str) -> str:
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text[:MAX_DEST])
    return clean + ("..." if len(text) > MAX_DEST else "")


class RemoteListener:
    """Not callable on purpose: asyncssh would take a callable for a local listener."""

    def __init__(self, dest: str, on_close: Callable[[RemoteListener], None]) -> None:
        self.dest = dest
        self._on_close: Callable[[RemoteListener], None] | None = on_close
        self._inner: Any = None
        self.port = 0

    def attach(self, inner: Any, requested_port: int) -> None:
        self._inner = inner
        self.port = requested_port or int(inner.get_port() or 0)

    def get_port(self) -> int:
        return self.port

    def get_addresses(self) -> list[tuple[Any, ...]]:
        return list(self._inner.get_addresses()) if self._inner is not None else []

    def close(self) -> None:
        if self._inner is not None:
            with contextlib.suppress(Exception):
                self._inner.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)

    async def wait_closed(self) -> None:
        if self._inner is not None:
            with contextlib.suppress(Exception):
                await self._inner.wait_closed()
