"""Persistent keys in the state directory: the gateway's host keys and its upstream identity.

Created on first start (mode 0600, written atomically) and reused afterwards, so users' known_hosts
entries stay valid across restarts and sandboxes keep trusting the same upstream key.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import asyncssh

HOST_KEYS: tuple[tuple[str, str, dict[str, int]], ...] = (
    ("ssh_host_ed25519_key", "ssh-ed25519", {}),
    ("ssh_host_ecdsa_key", "ecdsa-sha2-nistp256", {}),
    ("ssh_host_rsa_key", "ssh-rsa", {"key_size": 3072}),
)
UPSTREAM_KEY = "upstream_ed25519_key"


def ensure_state_dir(state_dir: str | Path) -> Path:
    path = Path(state_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _write_private(path: Path, key: asyncssh.SSHKey, comment: str) -> None:
    key.set_comment(comment)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key("openssh"))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key("openssh"))


def _load_or_create(path: Path, alg: str, kwargs: dict[str, int], comment: str) -> asyncssh.SSHKey:
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key(alg, **kwargs)  # type: ignore[arg-type]
    _write_private(path, key, comment)
    return key


def load_host_keys(state_dir: str | Path) -> list[asyncssh.SSHKey]:
    """ed25519, ecdsa and RSA (signing with SHA-2 only, see gateway.ssh.algorithms)."""
    base = ensure_state_dir(state_dir)
    return [
        _load_or_create(base / name, alg, kwargs, "runtools-gateway host key")
        for name, alg, kwargs in HOST_KEYS
    ]


def load_upstream_key(state_dir: str | Path) -> asyncssh.SSHKey:
    base = ensure_state_dir(state_dir)
    return _load_or_create(base / UPSTREAM_KEY, "ssh-ed25519", {}, "runtools-gateway upstream")


def public_line(key: asyncssh.SSHKey) -> str:
    """``TYPE BASE64 COMMENT`` as an authorized_keys line."""
    return key.export_public_key("openssh").decode().strip()


# Host-key signature algorithms offered per key type: SHA-2 only for RSA (no ssh-rsa/SHA-1).
_HOST_KEY_ALGS = {b"ssh-rsa": [b"rsa-sha2-512", b"rsa-sha2-256"]}


def as_host_keypairs(keys: list[asyncssh.SSHKey]) -> list[asyncssh.SSHKeyPair]:
    """Key pairs for ``server_host_keys`` that never sign with SHA-1.

    asyncssh offers every algorithm a key supports, ``ssh-rsa`` included, whatever
    ``signature_algs`` says; we narrow each RSA key pair's list ourselves.
    """
    pairs = list(asyncssh.load_keypairs(keys))
    for pair in pairs:
        narrowed = _HOST_KEY_ALGS.get(pair.algorithm)
        if narrowed is not None:
            pair.host_key_algorithms = narrowed
            pair.sig_algorithms = narrowed
    return pairs
