"""The algorithm lists offered on both legs: modern only, AES-GCM first (cheapest for asyncssh).

asyncssh's defaults still include group14-sha1, hmac-sha1, ssh-rsa and zlib; we list ours.
The kex list is OpenSSH 9.x sshd's default set (mlkem first, as OpenSSH 10), minus what this
asyncssh build lacks (sntrup761 needs liboqs): ``_available`` drops those. The client-facing
leg also offers ``zlib@openssh.com`` (delayed compression, as sshd) so ``ssh -C`` gets it;
the upstream leg compresses nothing.
``kex-strict-s/c-v00@openssh.com`` (Terrapin countermeasure) is added by asyncssh itself.
"""

from __future__ import annotations

import asyncssh

_WANTED_KEX = (
    "mlkem768x25519-sha256",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)
# The client chooses (RFC 4253 7.1): OpenSSH's ssh asks for zlib@openssh.com only with -C.
SERVER_COMPRESSION = ("none", "zlib@openssh.com")
_WANTED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
_WANTED_MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)
# Host-key and user-signature algorithms: no ssh-rsa (SHA-1), no DSA.
_WANTED_SIGS = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
SHA1_SIGNATURES = frozenset({b"ssh-rsa", b"ssh-rsa-cert-v01@openssh.com", b"ssh-dss"})


def _available(wanted: tuple[str, ...], supported: list[bytes]) -> list[str]:
    have = {alg.decode() for alg in supported}
    return [alg for alg in wanted if alg in have]


def kex_algs() -> list[str]:
    return _available(_WANTED_KEX, asyncssh.kex.get_kex_algs())


def encryption_algs() -> list[str]:
    return _available(_WANTED_CIPHERS, asyncssh.encryption.get_encryption_algs())


def mac_algs() -> list[str]:
    return _available(_WANTED_MACS, asyncssh.mac.get_mac_algs())


def signature_algs() -> list[str]:
    return _available(_WANTED_SIGS, asyncssh.public_key.get_public_key_algs())


def server_compression_algs() -> list[str]:
    return _available(SERVER_COMPRESSION, asyncssh.compression.get_compression_algs())


def common_options() -> dict[str, object]:
    """Options shared by the listener and the upstream connections."""
    return {
        "kex_algs": kex_algs(),
        "encryption_algs": encryption_algs(),
        "mac_algs": mac_algs(),
        "compression_algs": None,
        "signature_algs": signature_algs(),
        "gss_host": None,
    }
