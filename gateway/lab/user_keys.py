"""User key pairs made with ``ssh-keygen``, as a person would have them in ``~/.ssh``.

The demo makes one when it finds no ``~/.ssh/*.pub``; the tests make them per tenant; the bench
makes the key its clients log in with.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["UserKey", "make_key"]


@dataclass(frozen=True)
class UserKey:
    """A private key file and its ``.pub`` next to it."""

    path: Path

    @property
    def pub(self) -> Path:
        return self.path.with_name(self.path.name + ".pub")

    @property
    def public_line(self) -> str:
        """``"ssh-ed25519 AAAA... comment"``, as in the ``.pub`` file."""
        return self.pub.read_text().strip()


def make_key(
    directory: Path,
    name: str,
    kind: str = "ed25519",
    bits: int | None = None,
    *,
    comment: str | None = None,
) -> UserKey:
    """``ssh-keygen`` a key pair without passphrase at ``directory/name`` (and ``.pub``)."""
    path = directory / name
    comment = comment or f"{name}@test"
    cmd = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
    if bits:
        cmd += ["-b", str(bits)]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)  # no overwrite prompt
    return UserKey(path)
