"""What an organization may register as an SSH certificate authority, and how a certificate is
named for revocation: the checks keystore/cert_authorities.py runs before touching the
database (no database here)."""

from __future__ import annotations

import asyncssh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keystore import cert_authorities as cas
from keystore.errors import InvalidInput, InvalidPublicKey


@pytest.fixture(scope="module")
def ca_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519", comment="ci-signer")


def public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode().strip()


def certificate_line(ca_key: asyncssh.SSHKey) -> str:
    user = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca_key.generate_user_certificate(user, "alice", principals=["sandbox-abc"])
    return cert.export_certificate("openssh").decode().strip()


# --- the CA's key ------------------------------------------------------------------------------


def test_a_plain_ca_public_key_is_accepted_and_stored_canonically(ca_key: asyncssh.SSHKey) -> None:
    parsed = cas.parse_ca_key("\n" + public_line(ca_key) + "  \n")
    assert parsed.algorithm == "ssh-ed25519"
    assert parsed.bits == 256
    assert parsed.comment == "ci-signer"
    assert parsed.fingerprint == ca_key.get_fingerprint("sha256")
    assert parsed.public_key == " ".join(public_line(ca_key).split()[:2])


def test_a_certificate_offered_as_a_ca_is_refused_and_the_message_says_to_use_the_plain_key(
    ca_key: asyncssh.SSHKey,
) -> None:
    with pytest.raises(InvalidPublicKey) as caught:
        cas.parse_ca_key(certificate_line(ca_key))
    assert caught.value.code == "certificate_not_supported"
    message = str(caught.value)
    assert "certificate authority" in message and ".pub" in message
    assert "AAAA" not in message


def test_a_private_key_offered_as_a_ca_is_refused_without_echoing_it(
    ca_key: asyncssh.SSHKey,
) -> None:
    secret = ca_key.export_private_key("openssh").decode()
    with pytest.raises(InvalidPublicKey) as caught:
        cas.parse_ca_key(secret)
    assert caught.value.code == "private_key"
    body = [line for line in secret.splitlines() if "-----" not in line]
    assert not any(line in str(caught.value) for line in body)


def small_rsa_line() -> str:
    # A CA key that must be refused.
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()  # noqa: S505
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode()


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "empty"),
        ("hello world", "not_a_public_key"),
        ("ssh-ed25519 AAAA!!!notbase64", "not_a_public_key"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "dsa_not_supported"),
        ("x" * 20000, "too_large"),
        ('from="10.0.0.1" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI', "options_not_supported"),
    ],
)
def test_junk_and_keys_an_ssh_key_could_not_be_are_no_ca_either(text: str, code: str) -> None:
    with pytest.raises(InvalidPublicKey) as caught:
        cas.parse_ca_key(text)
    assert caught.value.code == code


def test_an_rsa_ca_under_2048_bits_is_refused() -> None:
    with pytest.raises(InvalidPublicKey) as caught:
        cas.parse_ca_key(small_rsa_line())
    assert caught.value.code == "rsa_too_small"


# --- the CA's name and extra principals --------------------------------------------------------


def test_a_ca_name_is_stripped_and_must_be_printable() -> None:
    assert cas.check_name("  ci signer ") == "ci signer"
    for bad in ("", "   ", "x" * 201, "ci\nsigner", "ci\x1b[31m"):
        with pytest.raises(InvalidInput) as caught:
            cas.check_name(bad)
        assert caught.value.code == "invalid_name"


def test_principals_are_kept_in_order_without_duplicates() -> None:
    assert cas.check_principals([]) == ()
    assert cas.check_principals(["deploy", "team-backend", "deploy", "a@b.c"]) == (
        "deploy",
        "team-backend",
        "a@b.c",
    )
    assert cas.check_principals(["x" * 255]) == ("x" * 255,)


def test_a_ca_has_at_most_32_principals() -> None:
    assert len(cas.check_principals([f"p{i}" for i in range(32)])) == 32
    with pytest.raises(InvalidInput) as caught:
        cas.check_principals([f"p{i}" for i in range(33)])
    assert caught.value.code == "too_many_principals"


@pytest.mark.parametrize(
    "principal",
    ["", "x" * 256, "two words", "a,b", "tab\there", "caf\u00e9", "nul\x00", "bidi\u202e", 7],
)
def test_a_principal_is_printable_ascii_without_spaces_or_commas(principal: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        cas.check_principals([principal])  # type: ignore[list-item]
    assert caught.value.code == "invalid_principal"
    assert "\x00" not in str(caught.value) and "\u202e" not in str(caught.value)


def test_a_single_string_is_not_mistaken_for_a_list_of_one_letter_principals() -> None:
    with pytest.raises(InvalidInput) as caught:
        cas.check_principals("deploy")
    assert caught.value.code == "invalid_principal"


def test_a_sandbox_id_is_refused_as_a_ca_principal_because_it_would_open_every_sandbox() -> None:
    with pytest.raises(InvalidInput) as caught:
        cas.check_principals(["deploy", "sandbox-abc"])
    assert caught.value.code == "principal_is_sandbox_id"
    assert "every sandbox" in str(caught.value)
    assert cas.check_principals(["sandbox"]) == ("sandbox",)  # not a sandbox id


# --- naming a certificate to revoke ------------------------------------------------------------


def test_a_key_id_is_kept_exactly_as_the_certificate_carries_it() -> None:
    assert cas.check_key_id("alice") == "alice"
    assert cas.check_key_id(" alice@laptop 2025 ") == " alice@laptop 2025 "
    assert cas.check_key_id("k" * 1024) == "k" * 1024


@pytest.mark.parametrize("key_id", ["", "k" * 1025, "line\nbreak", "esc\x1b", "bidi\u202e", 5])
def test_a_key_id_is_1_to_1024_printable_characters(key_id: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        cas.check_key_id(key_id)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_key_id"


def test_a_serial_is_any_64_bit_unsigned_number() -> None:
    assert cas.check_serial(0) == 0
    assert cas.check_serial(2**64 - 1) == 2**64 - 1


@pytest.mark.parametrize("serial", [-1, 2**64, True, "5", 1.0])
def test_a_serial_out_of_range_or_not_a_whole_number_is_refused(serial: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        cas.check_serial(serial)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_serial"
    assert "18446744073709551615" in str(caught.value)


def test_a_certificate_is_named_by_exactly_one_of_key_id_and_serial() -> None:
    assert cas.check_revocation_target("alice", None) == ("alice", None)
    assert cas.check_revocation_target(None, 42) == (None, 42)
    for both_or_neither in (("alice", 42), (None, None)):
        with pytest.raises(InvalidInput) as caught:
            cas.check_revocation_target(*both_or_neither)
        assert caught.value.code == "key_id_or_serial"
    with pytest.raises(InvalidInput) as caught:
        cas.check_revocation_target(None, -1)
    assert caught.value.code == "invalid_serial"


def test_a_revocation_reason_is_optional_short_and_printable() -> None:
    assert cas.check_reason(None) is None
    assert cas.check_reason("   ") is None
    assert cas.check_reason(" laptop stolen ") == "laptop stolen"
    for bad in ("r" * 501, "bell\x07"):
        with pytest.raises(InvalidInput) as caught:
            cas.check_reason(bad)
        assert caught.value.code == "invalid_reason"
