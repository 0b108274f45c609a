"""The small, documented layer where the gateway corrects asyncssh 2.24.

1. SHA-1 RSA user signatures. asyncssh verifies a user's RSA signature with any of
   ``RSAKey.all_sig_algorithms``, ``ssh-rsa`` (SHA-1) included, whatever ``signature_algs``
   says (that option only covers host keys and the advertised server-sig-algs). We refuse a
   signature whose algorithm name is ``ssh-rsa`` before asyncssh verifies it, as OpenSSH 8.8+
   does. Upstream-worthy: make user-signature verification honour ``signature_algs``.

``apply()`` is idempotent and is called by ``gateway.ssh_server`` at import.
"""

from __future__ import annotations

from typing import Any

import asyncssh.connection
from asyncssh.packet import SSHPacket

from gateway.algorithms import SHA1_SIGNATURES

_APPLIED = False


def signature_algorithm(signature: bytes) -> bytes | None:
    """The algorithm name at the front of an SSH signature blob, or None if malformed."""
    try:
        return SSHPacket(signature).get_string()
    except Exception:  # asyncssh raises PacketDecodeError; any garbage means "no name"
        return None


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    cls: Any = asyncssh.connection.SSHServerConnection
    original = cls.validate_public_key

    async def validate_public_key(
        self: Any, username: str, key_data: bytes, msg: bytes, signature: bytes
    ) -> bool:
        if msg and signature_algorithm(signature) in SHA1_SIGNATURES:
            return False
        return bool(await original(self, username, key_data, msg, signature))

    cls.validate_public_key = validate_public_key
