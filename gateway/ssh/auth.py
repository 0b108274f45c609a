"""The auth decision: login name + offered key + the sandbox's access data -> accept or refuse.

``decide()`` is a pure function: everything it needs arrives as arguments, so it is tested
without a database or an SSH connection (tests/unit/test_auth_decision.py). ``look_up()`` is
the one impure step, done once per login name per connection, through an injected
``AccessSource`` (gateway/ssh/access.py).

Certificates (``decide_certificate``) follow the same rule: only a CA registered by the named
sandbox's own organization counts, and the certificate must be a user certificate valid now,
naming the sandbox id (or one of that CA's extra principals), whose key id and serial that CA
has not revoked. A certificate without principals is refused (asyncssh would accept it for any
user; OpenSSH refuses it), and so is one its CA signed with SHA-1 (``ssh-rsa``), as OpenSSH's
default CASignatureAlgorithms does.

Keys are org-scoped: the access data of a sandbox holds the active keys of *that sandbox's*
organization only, so a key of another organization can never match. An unknown sandbox and
another organization's sandbox are refused with the same user-facing text (no oracle); only
logs and audit rows tell ``unknown_sandbox`` apart.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncssh
from asyncssh.packet import SSHPacket, String

from gateway import messages
from gateway.ssh.access import AccessSource
from gateway.ssh.algorithms import SHA1_SIGNATURES
from gateway.ssh.login import sandbox_id_from_login
from keystore.errors import Unavailable
from keystore.models import AuthorizedKey, Sandbox, SandboxAccess

UNKNOWN_SANDBOX = "unknown_sandbox"

# Why a certificate was refused (logs, audit rows, metrics; the user sees the usual
# key_not_registered banner, as for an unregistered key).
CERT_UNKNOWN_CA = "certificate_unknown_ca"
CERT_NOT_USER = "certificate_not_user"
CERT_NOT_YET_VALID = "certificate_not_yet_valid"
CERT_EXPIRED = "certificate_expired"
CERT_NO_PRINCIPALS = "certificate_no_principals"
CERT_WRONG_PRINCIPAL = "certificate_wrong_principal"
CERT_REVOKED = "certificate_revoked"
CERT_SHA1_SIGNATURE = "certificate_sha1_signature"
CERTIFICATE_REFUSALS = (
    CERT_UNKNOWN_CA,
    CERT_NOT_USER,
    CERT_NOT_YET_VALID,
    CERT_EXPIRED,
    CERT_NO_PRINCIPALS,
    CERT_WRONG_PRINCIPAL,
    CERT_REVOKED,
    CERT_SHA1_SIGNATURE,
)


@dataclass(frozen=True, slots=True)
class LoginLookup:
    """What one login name resolved to. ``refusal`` is set when no key can be accepted."""

    login: str
    sandbox_id: str | None
    access: SandboxAccess | None
    refusal: str | None = None
    error: str | None = None  # technical detail for the log (never shown to the user)


@dataclass(frozen=True, slots=True)
class CertificateLogin:
    """Which certificate opened a connection: what live revocation re-checks (CA, key id,
    serial) and what logs and audit rows show."""

    ca_id: uuid.UUID
    ca_fingerprint: str
    key_id: str
    serial: int
    principals: tuple[str, ...]
    # The CA's extra principals the certificate was let in by, when it does not name the
    # sandbox id itself (None then): live revocation ends the connection once the CA no
    # longer has any of them.
    via_principals: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Accept:
    """A login allowed. For a certificate, ``key`` is the credential tracked for revocation:
    its id is the CA's, its fingerprint and line the certificate's own key."""

    key: AuthorizedKey
    sandbox: Sandbox
    certificate: CertificateLogin | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str  # a messages code, or UNKNOWN_SANDBOX

    @property
    def shows_registration_hint(self) -> bool:
        """Unregistered key and unknown sandbox look the same to the user, on purpose."""
        return (
            self.reason in (messages.KEY_NOT_REGISTERED.code, UNKNOWN_SANDBOX)
            or self.reason in CERTIFICATE_REFUSALS
        )


Decision = Accept | Refuse


def canonical_line(key: asyncssh.SSHKey) -> str:
    """``TYPE BASE64`` without comment, the form stored in ssh_keys.public_key."""
    parts = key.export_public_key("openssh").decode().split()
    return f"{parts[0]} {parts[1]}"


async def look_up(login: str, source: AccessSource) -> LoginLookup:
    """Resolve a login name: grammar first (no query for a bad name), then one lookup."""
    sandbox_id = sandbox_id_from_login(login)
    if sandbox_id is None:
        return LoginLookup(login, None, None, messages.INVALID_LOGIN_NAME.code)
    try:
        access = await source.access_for(sandbox_id)
    except Unavailable as exc:
        return LoginLookup(
            login, sandbox_id, None, messages.KEYSTORE_UNAVAILABLE.code, error=str(exc)
        )
    if access is None:
        return LoginLookup(login, sandbox_id, None, UNKNOWN_SANDBOX)
    return LoginLookup(login, sandbox_id, access)


def decide(lookup: LoginLookup, fingerprint: str, public_key: str) -> Decision:
    """Accept only a key registered, active, for the organization of the named sandbox."""
    if lookup.refusal is not None or lookup.access is None:
        return Refuse(lookup.refusal or UNKNOWN_SANDBOX)
    match = lookup.access.key_for(fingerprint, public_key)
    if match is None:
        return Refuse(messages.KEY_NOT_REGISTERED.code)
    return Accept(match, lookup.access.sandbox)


@dataclass(frozen=True, slots=True)
class PresentedCertificate:
    """What a client's OpenSSH certificate says, already signature-checked by its decoder."""

    ca_fingerprint: str
    ca_public_key: str  # canonical TYPE BASE64 of the signing key
    key_fingerprint: str
    key_public_key: str  # canonical TYPE BASE64 of the certified key
    is_user: bool
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int  # epoch seconds
    valid_before: int  # epoch seconds (exclusive), 2**64-1 for "forever"
    sha1_signature: bool  # the CA signed with ssh-rsa (SHA-1)


def decide_certificate(lookup: LoginLookup, cert: PresentedCertificate, now: float) -> Decision:
    """Accept a certificate only from a CA of the named sandbox's own organization, valid at
    ``now``, naming the sandbox, and not revoked."""
    if lookup.refusal is not None or lookup.access is None:
        return Refuse(lookup.refusal or UNKNOWN_SANDBOX)
    ca = lookup.access.ca_for(cert.ca_fingerprint, cert.ca_public_key)
    if ca is None:
        return Refuse(CERT_UNKNOWN_CA)
    if cert.sha1_signature:
        return Refuse(CERT_SHA1_SIGNATURE)
    if not cert.is_user:
        return Refuse(CERT_NOT_USER)
    if now < cert.valid_after:
        return Refuse(CERT_NOT_YET_VALID)
    if now >= cert.valid_before:
        return Refuse(CERT_EXPIRED)
    if not cert.principals:
        return Refuse(CERT_NO_PRINCIPALS)
    sandbox = lookup.access.sandbox
    accepted = {sandbox.id, *ca.principals}
    if not accepted.intersection(cert.principals):
        return Refuse(CERT_WRONG_PRINCIPAL)
    if cert.key_id in ca.revoked_key_ids or cert.serial in ca.revoked_serials:
        return Refuse(CERT_REVOKED)
    key = AuthorizedKey(id=ca.id, fingerprint=cert.key_fingerprint, public_key=cert.key_public_key)
    login = CertificateLogin(
        ca_id=ca.id,
        ca_fingerprint=ca.fingerprint,
        key_id=cert.key_id,
        serial=cert.serial,
        principals=cert.principals,
        via_principals=(
            None
            if sandbox.id in cert.principals
            else tuple(sorted(set(ca.principals).intersection(cert.principals)))
        ),
    )
    return Accept(key, sandbox, certificate=login)


def presented_certificate(cert: asyncssh.SSHCertificate) -> PresentedCertificate:
    """The facts ``decide_certificate`` needs, read from an asyncssh OpenSSH certificate."""
    signing_key: asyncssh.SSHKey = cert.signing_key  # type: ignore[attr-defined]
    signature = certificate_signature_algorithm(cert.public_data, signing_key.public_data)
    return PresentedCertificate(
        ca_fingerprint=signing_key.get_fingerprint("sha256"),
        ca_public_key=canonical_line(signing_key),
        key_fingerprint=cert.key.get_fingerprint("sha256"),
        key_public_key=canonical_line(cert.key),
        is_user=cert._cert_type == asyncssh.public_key.CERT_TYPE_USER,  # type: ignore[attr-defined]
        key_id=cert._key_id,  # type: ignore[attr-defined]
        serial=cert._serial,  # type: ignore[attr-defined]
        principals=tuple(cert.principals),  # type: ignore[attr-defined]
        valid_after=cert._valid_after,  # type: ignore[attr-defined]
        valid_before=cert._valid_before,  # type: ignore[attr-defined]
        sha1_signature=signature is None or signature in SHA1_SIGNATURES,
    )


def certificate_signature_algorithm(blob: bytes, signing_key_blob: bytes) -> bytes | None:
    """The algorithm name of the CA's signature at the end of a certificate blob (which ends
    ``string signature_key, string signature``), or None when it cannot be read."""
    marker = String(signing_key_blob)
    at = blob.rfind(marker)
    if at < 0:
        return None
    try:
        packet = SSHPacket(blob[at + len(marker) :])
        signature = packet.get_string()
        packet.check_end()
        return SSHPacket(signature).get_string()
    except Exception:  # asyncssh raises PacketDecodeError; garbage means "unreadable"
        return None
