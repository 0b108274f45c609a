"""The certificate half of the auth decision, as a pure function: a certificate, the named
sandbox's access data and a clock -> accept or refuse, with the reason.

Certificates are made with asyncssh's own generator (the format ssh-keygen -s writes), so
``presented_certificate`` reads real certificate blobs.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import asyncssh
import pytest

from gateway.ssh import auth
from gateway.ssh.auth import (
    Accept,
    LoginLookup,
    Refuse,
    canonical_line,
    certificate_signature_algorithm,
    decide_certificate,
    presented_certificate,
)
from keystore.models import Sandbox, SandboxAccess, TrustedCA

SANDBOX = "sandbox-cert1"
NOW = time.time()


def _sandbox(sandbox_id: str, org: uuid.UUID) -> Sandbox:
    return Sandbox(
        id=sandbox_id,
        org_id=org,
        org_slug="acme",
        project_id=uuid.uuid4(),
        status="running",
        upstream_host="127.0.0.1",
        upstream_port=22,
        login_user="dev",
        host_keys=("ssh-ed25519 AAAA",),
        created_at=dt.datetime.now(dt.UTC),
    )


def _trusted(ca: asyncssh.SSHKey, **fields: object) -> TrustedCA:
    return TrustedCA(
        id=uuid.uuid4(),
        fingerprint=ca.get_fingerprint("sha256"),
        public_key=canonical_line(ca),
        **fields,  # type: ignore[arg-type]
    )


def _lookup(*cas: TrustedCA, sandbox_id: str = SANDBOX) -> LoginLookup:
    access = SandboxAccess(sandbox=_sandbox(sandbox_id, uuid.uuid4()), keys=(), cas=cas)
    return LoginLookup(sandbox_id, sandbox_id, access)


@pytest.fixture(scope="module")
def ca() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture(scope="module")
def user() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def _cert(
    ca: asyncssh.SSHKey,
    user: asyncssh.SSHKey,
    *,
    principals: tuple[str, ...] = (SANDBOX,),
    key_id: str = "alice@acme",
    serial: int = 7,
    valid_after: float = NOW - 60,
    valid_before: float = NOW + 3600,
) -> auth.PresentedCertificate:
    cert = ca.generate_user_certificate(
        user,
        key_id,
        principals=principals,
        serial=serial,
        valid_after=int(valid_after),
        valid_before=int(valid_before),
    )
    return presented_certificate(cert)


def test_a_certificate_naming_the_sandbox_from_the_orgs_ca_is_accepted(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    trusted = _trusted(ca)
    decision = decide_certificate(_lookup(trusted), _cert(ca, user), NOW)
    assert isinstance(decision, Accept)
    assert decision.key.id == trusted.id  # revocation tracks the CA
    assert decision.key.fingerprint == user.get_fingerprint("sha256")
    assert decision.certificate is not None
    assert (decision.certificate.key_id, decision.certificate.serial) == ("alice@acme", 7)


def test_a_certificate_from_a_ca_the_org_did_not_register_is_refused(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    other_ca = asyncssh.generate_private_key("ssh-ed25519")
    decision = decide_certificate(_lookup(_trusted(other_ca)), _cert(ca, user), NOW)
    assert decision == Refuse(auth.CERT_UNKNOWN_CA)
    assert decision.shows_registration_hint


def test_a_certificate_for_another_orgs_sandbox_is_refused(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    # The CA is org A's; the sandbox named is org B's, whose access data lists its own CAs only.
    cert = _cert(ca, user, principals=("sandbox-other",))
    decision = decide_certificate(_lookup(sandbox_id="sandbox-other"), cert, NOW)
    assert decision == Refuse(auth.CERT_UNKNOWN_CA)


def test_an_expired_certificate_is_refused(ca: asyncssh.SSHKey, user: asyncssh.SSHKey) -> None:
    cert = _cert(ca, user, valid_after=NOW - 7200, valid_before=NOW - 1)
    assert decide_certificate(_lookup(_trusted(ca)), cert, NOW) == Refuse(auth.CERT_EXPIRED)


def test_a_certificate_not_yet_valid_is_refused(ca: asyncssh.SSHKey, user: asyncssh.SSHKey) -> None:
    cert = _cert(ca, user, valid_after=NOW + 600)
    assert decide_certificate(_lookup(_trusted(ca)), cert, NOW) == Refuse(auth.CERT_NOT_YET_VALID)


def test_a_certificate_without_principals_is_refused(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    cert = _cert(ca, user, principals=())
    assert decide_certificate(_lookup(_trusted(ca)), cert, NOW) == Refuse(auth.CERT_NO_PRINCIPALS)


def test_a_certificate_for_another_principal_is_refused(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    cert = _cert(ca, user, principals=("sandbox-elsewhere", "root"))
    decision = decide_certificate(_lookup(_trusted(ca)), cert, NOW)
    assert decision == Refuse(auth.CERT_WRONG_PRINCIPAL)


def test_a_principal_the_org_gave_its_ca_opens_every_sandbox_of_the_org(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    cert = _cert(ca, user, principals=("team-infra",))
    decision = decide_certificate(_lookup(_trusted(ca, principals=("team-infra",))), cert, NOW)
    assert isinstance(decision, Accept)
    # Live revocation ends it when the CA drops that principal: the grant carries it.
    assert decision.certificate is not None
    assert decision.certificate.via_principals == ("team-infra",)


def test_the_principals_a_certificate_was_let_in_by_are_only_the_cas_own(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    trusted = _trusted(ca, principals=("team-infra", "oncall", "unused"))
    cert = _cert(ca, user, principals=("root", "oncall", "team-infra"))
    decision = decide_certificate(_lookup(trusted), cert, NOW)
    assert isinstance(decision, Accept) and decision.certificate is not None
    assert decision.certificate.via_principals == ("oncall", "team-infra")
    # Naming the sandbox itself: no CA principal to lose, nothing to track.
    named = _cert(ca, user, principals=(SANDBOX, "team-infra"))
    decision = decide_certificate(_lookup(trusted), named, NOW)
    assert isinstance(decision, Accept) and decision.certificate is not None
    assert decision.certificate.via_principals is None


@pytest.mark.parametrize(
    ("revoked", "expected"),
    [
        ({"revoked_key_ids": frozenset({"alice@acme"})}, Refuse(auth.CERT_REVOKED)),
        ({"revoked_serials": frozenset({7})}, Refuse(auth.CERT_REVOKED)),
        ({"revoked_key_ids": frozenset({"bob"}), "revoked_serials": frozenset({8})}, None),
    ],
)
def test_a_certificate_revoked_by_key_id_or_serial_is_refused(
    ca: asyncssh.SSHKey,
    user: asyncssh.SSHKey,
    revoked: dict[str, frozenset[object]],
    expected: Refuse | None,
) -> None:
    decision = decide_certificate(_lookup(_trusted(ca, **revoked)), _cert(ca, user), NOW)
    if expected is None:
        assert isinstance(decision, Accept)
    else:
        assert decision == expected


def test_a_host_certificate_is_not_a_user_certificate(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    host_cert = ca.generate_host_certificate(user, "host", principals=(SANDBOX,))
    decision = decide_certificate(_lookup(_trusted(ca)), presented_certificate(host_cert), NOW)
    assert decision == Refuse(auth.CERT_NOT_USER)


def test_a_certificate_its_ca_signed_with_sha1_is_refused(user: asyncssh.SSHKey) -> None:
    rsa_ca = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    sha1 = rsa_ca.generate_user_certificate(user, "old", principals=(SANDBOX,), sig_alg="ssh-rsa")
    sha2 = rsa_ca.generate_user_certificate(
        user, "new", principals=(SANDBOX,), sig_alg="rsa-sha2-512"
    )
    lookup = _lookup(_trusted(rsa_ca))
    assert decide_certificate(lookup, presented_certificate(sha1), NOW) == Refuse(
        auth.CERT_SHA1_SIGNATURE
    )
    assert isinstance(decide_certificate(lookup, presented_certificate(sha2), NOW), Accept)


def test_the_signature_algorithm_is_read_from_the_end_of_the_blob(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    cert = ca.generate_user_certificate(user, "x", principals=(SANDBOX,))
    signer = cert.signing_key.public_data  # type: ignore[attr-defined]
    assert certificate_signature_algorithm(cert.public_data, signer) == b"ssh-ed25519"
    assert certificate_signature_algorithm(b"garbage", signer) is None


def test_a_refused_login_name_refuses_the_certificate_too(
    ca: asyncssh.SSHKey, user: asyncssh.SSHKey
) -> None:
    lookup = LoginLookup("root", None, None, "invalid_login_name")
    assert decide_certificate(lookup, _cert(ca, user), NOW) == Refuse("invalid_login_name")
