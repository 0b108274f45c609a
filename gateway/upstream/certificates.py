"""Upstream certificates: who is behind a dedicated upstream connection, said to the sandbox.

With ``upstream.ca_key_file`` set, each dedicated upstream connection (agent or remote
forwarding, gateway/upstream/dedicated.py: one per client connection) logs in with the
gateway's upstream key *plus* a fresh OpenSSH user certificate for it, signed by the gateway's
own user CA: valid from 30 s ago for at most 5 minutes (``upstream.certificate_lifetime_seconds``;
sshd checks it at login only), principal = the sandbox's login user, and a key id naming the
connection, the organization and the user's key fingerprint, which the sandbox's sshd logs
(``Accepted publickey ... ID runtools-gateway conn=... org=... key=SHA256:... (serial N)``).
A sandbox that trusts the CA (``TrustedUserCAKeys``; ``runtools-gateway upstream-ca`` prints
the line) needs no ``authorized_keys`` entry for the gateway. Shared upstream connections
carry many users' channels and keep the static key (config/README.md "Upstream certificates").

``upstream.host_ca_keys_file`` names CA public keys: a sandbox host key carried in a host
certificate signed by one of them is trusted in addition to the keys pinned in its sandbox row
(known_hosts ``@cert-authority``).

The key files are read at start and on every reload (``load``, called by the daemon; a bad
file stops the start or refuses the reload); connections use what was read then.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh
from asyncssh.public_key import SSHOpenSSHCertificate
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import (
    CERTIFICATE_LIFETIME_MAX_SECONDS,
    CERTIFICATE_LIFETIME_MIN_SECONDS,
    UpstreamConfig,
)
from gateway.errors import ConfigError

MAX_LIFETIME_SECONDS = CERTIFICATE_LIFETIME_MAX_SECONDS
MIN_LIFETIME_SECONDS = CERTIFICATE_LIFETIME_MIN_SECONDS
# Valid from this long before it was made: the sandbox's clock may be a little behind ours.
BACKDATE_SECONDS = 30
KEY_ID_PREFIX = "runtools-gateway"
# Where the sandbox-side snippets (runtools-gateway upstream-ca) put the CA's public line.
TRUSTED_CA_PATH = "/etc/ssh/runtools-gateway-user-ca.pub"

# What may stand unescaped in a key id: conn ids, org slugs and SHA256: fingerprints do.
_PLAIN = re.compile(r"[A-Za-z0-9._:/+=@-]")
_MAX_TOKEN = 128


class CaKeyError(ValueError):
    """A CA key file that cannot be used, with the reason."""


@dataclass(frozen=True, slots=True)
class UpstreamCertificate:
    """A certificate made for one upstream connection and what it says (for the logs)."""

    certificate: SSHOpenSSHCertificate
    key_id: str
    serial: int
    principal: str
    valid_after: int
    valid_before: int


# --- making certificates (pure) ---


def _token(value: str) -> str:
    """``value`` printable and unambiguous in a key id: other characters as %XX (UTF-8)."""
    out = []
    for ch in value[:_MAX_TOKEN]:
        if _PLAIN.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "replace"))
    return "".join(out) or "-"


def key_id(*, conn_id: str, org_slug: str, key_fingerprint: str) -> str:
    """``runtools-gateway conn=<conn id> org=<org slug> key=<SHA256:...>``."""
    return (
        f"{KEY_ID_PREFIX} conn={_token(conn_id)} org={_token(org_slug)} "
        f"key={_token(key_fingerprint)}"
    )


def signature_algorithm(ca: asyncssh.SSHKey) -> str:
    """The algorithm the CA signs with: SHA-2 for RSA, the key's own for the others."""
    algorithm = ca.get_algorithm()
    if algorithm == "ssh-rsa":
        return "rsa-sha2-512"
    if algorithm == "ssh-dss" or algorithm.startswith("sk-"):
        raise CaKeyError(f"a {algorithm} key cannot be the upstream CA (use ed25519)")
    return algorithm


def make_certificate(
    ca: asyncssh.SSHKey,
    key: asyncssh.SSHKey,
    *,
    login_user: str,
    key_fingerprint: str,
    org_slug: str,
    conn_id: str,
    lifetime_seconds: int = MAX_LIFETIME_SECONDS,
    now: float | None = None,
    serial: int | None = None,
) -> UpstreamCertificate:
    """An OpenSSH user certificate for ``key`` signed by ``ca``, for one upstream login.

    Valid from ``now`` - 30 s to ``now`` + ``lifetime_seconds`` (30..300), for ``login_user``
    only, with a random 64-bit serial (never 0) and the extensions a session needs:
    permit-pty, permit-port-forwarding, permit-agent-forwarding (no X11, no user rc)."""
    if not MIN_LIFETIME_SECONDS <= lifetime_seconds <= MAX_LIFETIME_SECONDS:
        raise ValueError(
            f"certificate lifetime must be {MIN_LIFETIME_SECONDS}..{MAX_LIFETIME_SECONDS} s "
            f"(got {lifetime_seconds})"
        )
    if not login_user:
        raise ValueError("a certificate needs a principal (the login user)")
    start = int(time.time() if now is None else now)
    valid_after = start - BACKDATE_SECONDS
    valid_before = start + int(lifetime_seconds)
    serial = secrets.randbelow(2**64 - 1) + 1 if serial is None else serial
    ident = key_id(conn_id=conn_id, org_slug=org_slug, key_fingerprint=key_fingerprint)
    cert = ca.generate_user_certificate(
        key,
        ident,
        serial=serial,
        principals=[login_user],
        valid_after=valid_after,
        valid_before=valid_before,
        permit_x11_forwarding=False,
        permit_agent_forwarding=True,
        permit_port_forwarding=True,
        permit_pty=True,
        permit_user_rc=False,
        sig_alg=signature_algorithm(ca),
        comment=KEY_ID_PREFIX,
    )
    return UpstreamCertificate(
        certificate=cert,
        key_id=ident,
        serial=serial,
        principal=login_user,
        valid_after=valid_after,
        valid_before=valid_before,
    )


# --- key files ---


def read_ca_key(path: str | Path) -> asyncssh.SSHKey:
    """The CA's private key: an unencrypted OpenSSH key file only its owner can read."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise CaKeyError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CaKeyError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        raise CaKeyError(f"{path} is accessible by group or others (mode {mode:04o}); chmod 600 it")
    try:
        key = asyncssh.read_private_key(str(path))
    except OSError as exc:
        raise CaKeyError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise CaKeyError(f"{path} is not an unencrypted OpenSSH private key ({exc})") from exc
    signature_algorithm(key)  # refuses DSA and security-key CAs
    pyca = key.pyca_key
    if isinstance(pyca, rsa.RSAPrivateKey) and pyca.key_size < 2048:
        raise CaKeyError(f"{path} is an RSA key of fewer than 2048 bits")
    return key


def read_host_ca_keys(path: str | Path) -> tuple[asyncssh.SSHKey, ...]:
    """CA public keys, one OpenSSH public key line each (``# comments`` and blanks skipped)."""
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise CaKeyError(f"cannot read {path}: {reason}") from exc
    keys: list[asyncssh.SSHKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            raise CaKeyError(
                f"{path}:{number}: write the CA's public key line alone, without a "
                "known_hosts marker or host patterns"
            )
        try:
            key = asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise CaKeyError(f"{path}:{number}: not a public key line ({exc})") from exc
        if key.get_algorithm() == "ssh-dss":
            raise CaKeyError(f"{path}:{number}: DSA keys are refused")
        keys.append(key)
    if not keys:
        raise CaKeyError(f"{path} holds no public key")
    return tuple(keys)


def generate_ca_key(path: str | Path) -> asyncssh.SSHKey:
    """A new ed25519 CA key at ``path`` (mode 0600, never overwriting) and ``path.pub``."""
    path = Path(path)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="runtools-gateway upstream CA")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key("openssh"))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)  # whatever the umask said
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key("openssh"))
    return key


def public_line(key: asyncssh.SSHKey) -> str:
    """The CA's ``TrustedUserCAKeys`` line."""
    return key.export_public_key("openssh").decode().strip()


def sshd_config_lines(trusted_path: str = TRUSTED_CA_PATH) -> list[str]:
    """What a sandbox image's sshd_config needs to accept (and log) upstream certificates."""
    return [
        "# runtools-gateway upstream certificates (config/README.md, Upstream certificates)",
        f"# {trusted_path} holds the line `runtools-gateway upstream-ca` prints.",
        f"TrustedUserCAKeys {trusted_path}",
        "# The certificate's principal is the sandbox's login user, which sshd accepts without",
        "# an AuthorizedPrincipalsFile; with one, list that user in it.",
        "# VERBOSE also logs 'Accepted certificate ID \"runtools-gateway conn=...\" (serial N)'.",
        "LogLevel VERBOSE",
    ]


# --- what the daemon loaded (at start and on each reload) ---


class _Loaded:
    """The key files as last read, by path (one process holds one config at a time)."""

    def __init__(self) -> None:
        self.ca: dict[str, asyncssh.SSHKey] = {}
        self.host_cas: dict[str, tuple[asyncssh.SSHKey, ...]] = {}


_LOADED = _Loaded()


def load(config: UpstreamConfig) -> None:
    """Read ``ca_key_file`` and ``host_ca_keys_file`` now (start, reload): ConfigError naming
    the setting when one cannot be used; nothing changes then."""
    ca: dict[str, asyncssh.SSHKey] = {}
    host_cas: dict[str, tuple[asyncssh.SSHKey, ...]] = {}
    try:
        if config.ca_key_file:
            ca[config.ca_key_file] = read_ca_key(config.ca_key_file)
    except CaKeyError as exc:
        raise ConfigError("upstream.ca_key_file", str(exc)) from exc
    try:
        if config.host_ca_keys_file:
            host_cas[config.host_ca_keys_file] = read_host_ca_keys(config.host_ca_keys_file)
    except CaKeyError as exc:
        raise ConfigError("upstream.host_ca_keys_file", str(exc)) from exc
    _LOADED.ca, _LOADED.host_cas = ca, host_cas


def ca_key(config: UpstreamConfig) -> asyncssh.SSHKey | None:
    """The user CA (None: upstream certificates are off). Read now if ``load`` has not read
    this path (a process that never called it); raises CaKeyError if it cannot be."""
    path = config.ca_key_file
    if not path:
        return None
    key = _LOADED.ca.get(path)
    if key is None:
        key = _LOADED.ca[path] = read_ca_key(path)
    return key


def host_ca_keys(config: UpstreamConfig) -> tuple[asyncssh.SSHKey, ...]:
    """The trusted host CAs (empty: pinned keys only); read now if ``load`` has not."""
    path = config.host_ca_keys_file
    if not path:
        return ()
    keys = _LOADED.host_cas.get(path)
    if keys is None:
        keys = _LOADED.host_cas[path] = read_host_ca_keys(path)
    return keys


def issue(
    config: UpstreamConfig,
    key: asyncssh.SSHKey,
    *,
    login_user: str,
    key_fingerprint: str,
    org_slug: str,
    conn_id: str,
) -> UpstreamCertificate | None:
    """A fresh certificate for one dedicated upstream connection, or None when the feature is
    off. Raises CaKeyError when the CA key cannot be read."""
    ca = ca_key(config)
    if ca is None:
        return None
    return make_certificate(
        ca,
        key,
        login_user=login_user,
        key_fingerprint=key_fingerprint,
        org_slug=org_slug,
        conn_id=conn_id,
        lifetime_seconds=config.certificate_lifetime_seconds,
    )
