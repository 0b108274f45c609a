"""Every live client connection of this process, indexed by organization, key and sandbox.

The daemon drains through it, its STATUS line counts from it, and live revocation and quotas
find the connections a change concerns in one lookup (``by_org``, ``by_key``,
``by_sandbox``) instead of scanning. A connection is registered when it is accepted and
indexed once it has authenticated (its ``Identity`` is known).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an authenticated connection is: the key that opened which sandbox of which org.

    For a certificate login ``key_id`` is the signing CA's id (``by_key`` then finds every
    connection a CA opened) and ``cert_key_id``/``cert_serial`` name the certificate;
    ``cert_principals`` are the CA's principals it was let in by (None: it names the sandbox)."""

    org_id: uuid.UUID
    sandbox_id: str
    key_id: uuid.UUID
    fingerprint: str
    cert_key_id: str | None = None
    cert_serial: int | None = None
    cert_principals: tuple[str, ...] | None = None

    @property
    def is_certificate(self) -> bool:
        return self.cert_serial is not None


class LiveConnection(Protocol):
    """What the registry's users may do with a connection."""

    @property
    def conn_id(self) -> str: ...

    @property
    def session_count(self) -> int: ...

    def notify_sessions(self, text: str) -> None: ...

    def close_sessions(self, text: str, reason: str) -> None: ...

    def close(self) -> None: ...


class Registry:
    def __init__(self) -> None:
        self._all: dict[LiveConnection, Identity | None] = {}
        self._by_org: dict[uuid.UUID, set[LiveConnection]] = {}
        self._by_key: dict[uuid.UUID, set[LiveConnection]] = {}
        self._by_sandbox: dict[str, set[LiveConnection]] = {}
        self._unauthenticated = 0

    def add(self, conn: LiveConnection) -> None:
        if conn not in self._all:
            self._all[conn] = None
            self._unauthenticated += 1

    def authenticated(self, conn: LiveConnection, identity: Identity) -> None:
        if conn not in self._all:
            return  # already gone (closed during auth)
        if self._all[conn] is None:
            self._unauthenticated -= 1
        self._unindex(conn)
        self._all[conn] = identity
        self._by_org.setdefault(identity.org_id, set()).add(conn)
        self._by_key.setdefault(identity.key_id, set()).add(conn)
        self._by_sandbox.setdefault(identity.sandbox_id, set()).add(conn)

    def remove(self, conn: LiveConnection) -> None:
        if conn in self._all:
            if self._all[conn] is None:
                self._unauthenticated -= 1
            self._unindex(conn)
            del self._all[conn]

    def identity(self, conn: LiveConnection) -> Identity | None:
        return self._all.get(conn)

    def by_org(self, org_id: uuid.UUID) -> list[LiveConnection]:
        return list(self._by_org.get(org_id, ()))

    def by_key(self, key_id: uuid.UUID) -> list[LiveConnection]:
        return list(self._by_key.get(key_id, ()))

    def by_sandbox(self, sandbox_id: str) -> list[LiveConnection]:
        return list(self._by_sandbox.get(sandbox_id, ()))

    def authenticated_connections(self) -> list[tuple[LiveConnection, Identity]]:
        return [(c, i) for c, i in self._all.items() if i is not None]

    @property
    def unauthenticated_count(self) -> int:
        return self._unauthenticated

    @property
    def session_count(self) -> int:
        return sum(c.session_count for c in self._all)

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[LiveConnection]:
        return iter(list(self._all))

    def __contains__(self, conn: object) -> bool:
        return conn in self._all

    def _unindex(self, conn: LiveConnection) -> None:
        identity = self._all.get(conn)
        if identity is None:
            return
        _discard(self._by_org, identity.org_id, conn)
        _discard(self._by_key, identity.key_id, conn)
        _discard(self._by_sandbox, identity.sandbox_id, conn)


def _discard(index: dict[K, set[LiveConnection]], key: K, conn: LiveConnection) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(conn)
        if not members:
            del index[key]
