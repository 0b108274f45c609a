"""keystore.keys: what happens when a person pastes something into "add SSH key"."""

from __future__ import annotations

import base64
import re
import struct
import subprocess
from pathlib import Path

import asyncssh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from keystore.errors import InvalidInput, InvalidPublicKey
from keystore.keys import (
    MAX_PUBLIC_KEY_CHARS,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    RSA_EXPONENT,
    ParsedKey,
    fingerprint_of_blob,
    login_key_problem,
    parse_public_key,
    rsa_problem,
)

SSH_KEYGEN = "/usr/bin/ssh-keygen"

# --------------------------------------------------------------------------- helpers


def keygen(directory: Path, name: str, *args: str, comment: str = "alice@laptop") -> Path:
    """Run ssh-keygen to make a key pair; return the private key path (public is .pub)."""
    path = directory / name
    subprocess.run(
        [SSH_KEYGEN, "-q", "-N", "", "-C", comment, "-f", str(path), *args],
        check=True,
        capture_output=True,
    )
    return path


def keygen_fingerprint(pub_path: Path) -> tuple[int, str]:
    """(bits, fingerprint) as printed by `ssh-keygen -lf`."""
    out = subprocess.run(
        [SSH_KEYGEN, "-lf", str(pub_path)], check=True, capture_output=True, text=True
    ).stdout
    bits, fingerprint = out.split()[:2]
    return int(bits), fingerprint


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ssh_mpint(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "big")  # leading 0 keeps it positive
    return ssh_string(data)


def refused(text: str, code: str) -> str:
    """Assert parse_public_key refuses ``text`` with ``code``; return the message.

    Also asserts that the message echoes no key material: no 16-character run of any
    base64-looking token of the input appears in it.
    """
    with pytest.raises(InvalidPublicKey) as info:
        parse_public_key(text)
    error = info.value
    assert error.code == code, str(error)
    assert isinstance(error, InvalidInput)
    message = str(error)
    assert message
    windows = {message[i : i + 16] for i in range(max(0, len(message) - 15))}
    for token in re.findall(r"[A-Za-z0-9+/=]{16,}", text):
        leaked = [w for w in windows if w in token]
        assert not leaked, f"message echoes key material: {leaked}"
    return message


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def ed25519_key(keydir: Path) -> Path:
    return keygen(keydir, "id_ed25519", "-t", "ed25519")


@pytest.fixture(scope="module")
def ed25519_pub(ed25519_key: Path) -> str:
    return ed25519_key.with_suffix(".pub").read_text()


# --------------------------------------------------------------------------- accepted keys

KEYGEN_CASES = [
    ("ed25519", ["-t", "ed25519"], "ssh-ed25519", 256),
    ("ecdsa256", ["-t", "ecdsa", "-b", "256"], "ecdsa-sha2-nistp256", 256),
    ("ecdsa384", ["-t", "ecdsa", "-b", "384"], "ecdsa-sha2-nistp384", 384),
    ("ecdsa521", ["-t", "ecdsa", "-b", "521"], "ecdsa-sha2-nistp521", 521),
    ("rsa2048", ["-t", "rsa", "-b", "2048"], "ssh-rsa", 2048),
    ("rsa3072", ["-t", "rsa", "-b", "3072"], "ssh-rsa", 3072),
]


@pytest.mark.parametrize(
    ("name", "args", "algorithm", "bits"), KEYGEN_CASES, ids=[c[0] for c in KEYGEN_CASES]
)
def test_user_pastes_pub_file_made_by_ssh_keygen_and_sees_the_same_fingerprint(
    keydir: Path, name: str, args: list[str], algorithm: str, bits: int
) -> None:
    pub_path = keygen(keydir, f"accept_{name}", *args).with_suffix(".pub")
    text = pub_path.read_text()

    parsed = parse_public_key(text)

    keygen_bits, keygen_fp = keygen_fingerprint(pub_path)
    key_type, key_b64, comment = text.split(None, 2)
    assert isinstance(parsed, ParsedKey)
    assert parsed.algorithm == algorithm == key_type
    assert parsed.bits == bits == keygen_bits
    assert parsed.fingerprint == keygen_fp
    assert parsed.public_key == f"{key_type} {key_b64}"
    assert parsed.comment == comment.strip() == "alice@laptop"
    assert parsed.blob == base64.b64decode(key_b64)
    assert fingerprint_of_blob(parsed.blob) == keygen_fp


@pytest.mark.parametrize(
    ("alg", "kwargs", "bits"),
    [
        ("ssh-ed25519", {}, 256),
        ("ecdsa-sha2-nistp256", {}, 256),
        ("ecdsa-sha2-nistp521", {}, 521),
        ("ssh-rsa", {"key_size": 2048}, 2048),
        ("ssh-rsa", {"key_size": 4096}, 4096),
    ],
)
def test_keys_generated_with_asyncssh_are_accepted(
    tmp_path: Path, alg: str, kwargs: dict[str, int], bits: int
) -> None:
    key = asyncssh.generate_private_key(alg, comment="ci-bot", **kwargs)
    text = key.export_public_key("openssh").decode()
    (tmp_path / "k.pub").write_text(text)

    parsed = parse_public_key(text)

    assert parsed.algorithm == alg
    assert parsed.bits == bits
    assert parsed.fingerprint == key.get_fingerprint("sha256")
    assert parsed.fingerprint == keygen_fingerprint(tmp_path / "k.pub")[1]
    assert parsed.blob == key.public_data
    assert parsed.comment == "ci-bot"


def _sk_ed25519_blob() -> bytes:
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return ssh_string(b"sk-ssh-ed25519@openssh.com") + ssh_string(raw) + ssh_string(b"ssh:")


def _sk_ecdsa_blob() -> bytes:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return (
        ssh_string(b"sk-ecdsa-sha2-nistp256@openssh.com")
        + ssh_string(b"nistp256")
        + ssh_string(point)
        + ssh_string(b"ssh:")
    )


@pytest.mark.parametrize("make_blob", [_sk_ed25519_blob, _sk_ecdsa_blob], ids=["ed25519", "ecdsa"])
def test_security_key_backed_keys_are_accepted(tmp_path: Path, make_blob: object) -> None:
    assert callable(make_blob)
    blob: bytes = make_blob()
    key_type = blob[4 : 4 + struct.unpack(">I", blob[:4])[0]].decode()
    line = f"{key_type} {base64.b64encode(blob).decode()} bob@yubikey\n"
    (tmp_path / "sk.pub").write_text(line)

    parsed = parse_public_key(line)

    keygen_bits, keygen_fp = keygen_fingerprint(tmp_path / "sk.pub")
    assert parsed.algorithm == key_type
    assert parsed.bits == 256 == keygen_bits
    assert parsed.fingerprint == keygen_fp
    assert parsed.comment == "bob@yubikey"
    assert parsed.blob == blob


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: "  \n\n" + s.strip() + "   \n\n",
        lambda s: s.strip() + "\r\n",
        lambda s: "# my laptop key\n" + s + "\n# end\n",
        lambda s: "\t" + s.strip().replace(" ", "\t"),
    ],
    ids=["as-is", "blank-lines-and-spaces", "crlf", "hash-comment-lines", "tabs"],
)
def test_whitespace_newlines_and_hash_comment_lines_around_the_key_are_tolerated(
    ed25519_key: Path, ed25519_pub: str, wrap: object
) -> None:
    assert callable(wrap)
    parsed = parse_public_key(wrap(ed25519_pub))

    assert parsed.fingerprint == keygen_fingerprint(ed25519_key.with_suffix(".pub"))[1]
    assert parsed.public_key == " ".join(ed25519_pub.split()[:2])
    assert parsed.comment == "alice@laptop"


def test_key_without_comment_has_no_comment(ed25519_pub: str) -> None:
    line = " ".join(ed25519_pub.split()[:2])

    parsed = parse_public_key(line + "\n")

    assert parsed.comment is None
    assert parsed.public_key == line


def test_comment_with_spaces_and_unicode_is_kept(ed25519_pub: str) -> None:
    line = " ".join(ed25519_pub.split()[:2]) + "   José's laptop (work) 🔑  \n"

    assert parse_public_key(line).comment == "José's laptop (work) 🔑"


def test_very_long_comment_is_cut_to_255_characters(ed25519_pub: str) -> None:
    comment = "c" * 200 + "d" * 200
    line = " ".join(ed25519_pub.split()[:2]) + " " + comment

    parsed = parse_public_key(line)

    assert parsed.comment == comment[:255]
    assert parsed.public_key == " ".join(ed25519_pub.split()[:2])


@pytest.mark.parametrize(
    "comment",
    [
        "evil\x1b[2J\x1b[31mroot",
        "nul\x00byte",
        "bell\x07",
        "admin\u202etxt.exe",
        "a\tb",
        "x\u2028y",
    ],
    ids=["ansi-escape", "nul", "bell", "bidi-override", "tab-inside", "line-separator"],
)
def test_comment_with_control_or_invisible_characters_is_refused(
    ed25519_pub: str, comment: str
) -> None:
    line = " ".join(ed25519_pub.split()[:2]) + " " + comment

    message = refused(line, "bad_comment")

    assert "comment" in message


def test_rfc4716_export_from_puttygen_or_ssh_keygen_is_accepted(
    keydir: Path, ed25519_key: Path
) -> None:
    pub_path = ed25519_key.with_suffix(".pub")
    rfc4716 = subprocess.run(
        [SSH_KEYGEN, "-e", "-f", str(pub_path)], check=True, capture_output=True, text=True
    ).stdout
    assert rfc4716.startswith("---- BEGIN SSH2 PUBLIC KEY ----")

    parsed = parse_public_key(rfc4716)

    assert parsed.fingerprint == keygen_fingerprint(pub_path)[1]
    assert parsed.public_key == " ".join(pub_path.read_text().split()[:2])
    assert parsed.comment is not None and "ED25519" in parsed.comment


@pytest.mark.parametrize(
    ("name", "args", "pem_format", "header"),
    [
        ("rsa", ["-t", "rsa", "-b", "2048"], "PKCS8", "-----BEGIN PUBLIC KEY-----"),
        ("rsa", ["-t", "rsa", "-b", "2048"], "PEM", "-----BEGIN RSA PUBLIC KEY-----"),
        ("ecdsa", ["-t", "ecdsa", "-b", "384"], "PKCS8", "-----BEGIN PUBLIC KEY-----"),
    ],
)
def test_pem_public_key_is_accepted_and_canonicalised(
    tmp_path: Path, name: str, args: list[str], pem_format: str, header: str
) -> None:
    pub_path = keygen(tmp_path, name, *args).with_suffix(".pub")
    pem = subprocess.run(
        [SSH_KEYGEN, "-e", "-m", pem_format, "-f", str(pub_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert pem.startswith(header)

    parsed = parse_public_key(pem)

    assert parsed.fingerprint == keygen_fingerprint(pub_path)[1]
    assert parsed.public_key == " ".join(pub_path.read_text().split()[:2])
    assert parsed.comment is None


def test_fingerprint_of_blob_is_unpadded_sha256_base64(ed25519_key: Path) -> None:
    pub_path = ed25519_key.with_suffix(".pub")
    blob = base64.b64decode(pub_path.read_text().split()[1])

    fingerprint = fingerprint_of_blob(blob)

    assert fingerprint == keygen_fingerprint(pub_path)[1]
    assert fingerprint.startswith("SHA256:") and not fingerprint.endswith("=")
    assert len(fingerprint) == len("SHA256:") + 43


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "args", "marker"),
    [
        ("openssh_ed25519", ["-t", "ed25519"], "BEGIN OPENSSH PRIVATE KEY"),
        ("openssh_rsa", ["-t", "rsa", "-b", "2048"], "BEGIN OPENSSH PRIVATE KEY"),
        ("pem_rsa", ["-t", "rsa", "-b", "2048", "-m", "PEM"], "BEGIN RSA PRIVATE KEY"),
        ("pkcs8_rsa", ["-t", "rsa", "-b", "2048", "-m", "PKCS8"], "BEGIN PRIVATE KEY"),
        ("pem_ec", ["-t", "ecdsa", "-m", "PEM"], "BEGIN EC PRIVATE KEY"),
    ],
)
def test_private_key_pasted_by_mistake_is_refused_without_echo(
    tmp_path: Path, name: str, args: list[str], marker: str
) -> None:
    private_text = keygen(tmp_path, name, *args).read_text()
    assert marker in private_text

    message = refused(private_text, "private_key")

    for line in private_text.splitlines():
        if line.strip():
            assert line.strip() not in message
    assert "PRIVATE" in message.upper()
    assert "never" in message and "shared" in message
    assert ".pub" in message
    assert "new" in message  # suggests replacing the exposed key


def test_passphrase_protected_private_key_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "id_locked"
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "correct horse", "-f", str(path)],
        check=True,
        capture_output=True,
    )

    refused(path.read_text(), "private_key")


def test_private_key_body_without_its_begin_end_lines_is_refused(ed25519_key: Path) -> None:
    body = "".join(ed25519_key.read_text().splitlines()[1:-1])

    message = refused(body, "private_key")

    assert body[:40] not in message


def test_private_and_public_key_pasted_together_is_reported_as_private(
    ed25519_key: Path, ed25519_pub: str
) -> None:
    refused(ed25519_pub + ed25519_key.read_text(), "private_key")


def test_huge_paste_containing_a_private_key_is_still_reported_as_private(
    ed25519_key: Path,
) -> None:
    text = ed25519_key.read_text() + "\n" * (MAX_PUBLIC_KEY_CHARS + 1)

    refused(text, "private_key")


def test_putty_private_key_file_is_refused_without_echo() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    public_b64 = base64.b64encode(key.public_data).decode()
    private_b64 = base64.b64encode(b"\x00\x00\x00\x20" + b"\x5a" * 32).decode()
    ppk = (
        "PuTTY-User-Key-File-3: ssh-ed25519\n"
        "Encryption: none\n"
        "Comment: eddsa-key-20240101\n"
        "Public-Lines: 2\n"
        f"{public_b64[:64]}\n{public_b64[64:]}\n"
        "Private-Lines: 1\n"
        f"{private_b64}\n"
        "Private-MAC: 2e1f6c8d0c1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3\n"
    )

    message = refused(ppk, "private_key")

    assert private_b64 not in message
    assert ".pub" in message


def test_paste_over_the_size_limit_is_refused() -> None:
    lines = [
        asyncssh.generate_private_key("ssh-ed25519", comment=f"user{i}@host")
        .export_public_key()
        .decode()
        .strip()
        for i in range(200)
    ]
    text = "\n".join(lines)  # a whole authorized_keys file
    assert len(text) > MAX_PUBLIC_KEY_CHARS

    message = refused(text, "too_large")

    assert str(MAX_PUBLIC_KEY_CHARS) in message


def test_paste_exactly_at_the_size_limit_is_accepted(ed25519_pub: str) -> None:
    text = ed25519_pub.strip() + "\n" * (MAX_PUBLIC_KEY_CHARS - len(ed25519_pub.strip()))
    assert len(text) == MAX_PUBLIC_KEY_CHARS

    assert parse_public_key(text).comment == "alice@laptop"
    refused(text + "\n", "too_large")


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\n", "# no key here\n#another\n"])
def test_empty_paste_is_refused(text: str) -> None:
    message = refused(text, "empty")

    assert ".pub" in message


def test_two_keys_pasted_at_once_are_refused(keydir: Path, ed25519_pub: str) -> None:
    other = keygen(keydir, "second", "-t", "ecdsa").with_suffix(".pub").read_text()

    message = refused(ed25519_pub + other, "multiple_keys")

    assert "one" in message


def test_key_broken_across_lines_is_refused_with_a_hint_to_join_it(ed25519_pub: str) -> None:
    key_type, key_b64 = ed25519_pub.split()[:2]
    wrapped = f"{key_type} {key_b64[:30]}\n{key_b64[30:]}\n"

    message = refused(wrapped, "multiple_keys")

    assert "join" in message


def test_two_rfc4716_blocks_are_refused(ed25519_key: Path) -> None:
    block = subprocess.run(
        [SSH_KEYGEN, "-e", "-f", str(ed25519_key.with_suffix(".pub"))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout

    refused(block + block, "multiple_keys")


@pytest.mark.parametrize(
    "options",
    [
        'from="10.0.0.1",command="x"',
        "no-pty",
        'restrict,command="echo hello world"',
        'environment="A=b c",no-port-forwarding',
        'command="printf \\"quoted words\\""',
    ],
)
def test_authorized_keys_line_with_options_is_refused(ed25519_pub: str, options: str) -> None:
    message = refused(f"{options} {ed25519_pub}", "options_not_supported")

    assert "not supported" in message
    assert '"ssh-ed25519 AAAA... comment"' in message


def test_openssh_certificate_is_refused(tmp_path: Path) -> None:
    ca = keygen(tmp_path, "ca", "-t", "ed25519")
    user = keygen(tmp_path, "id_user", "-t", "ed25519")
    subprocess.run(
        [SSH_KEYGEN, "-q", "-s", str(ca), "-I", "alice", "-n", "alice", str(user) + ".pub"],
        check=True,
        capture_output=True,
    )
    cert = (tmp_path / "id_user-cert.pub").read_text()
    assert cert.startswith("ssh-ed25519-cert-v01@openssh.com ")

    message = refused(cert, "certificate_not_supported")

    assert "certificate" in message


def test_dsa_key_from_ssh_keygen_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "dsa", "-N", "", "-f", str(tmp_path / "id_dsa")],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip("this ssh-keygen cannot make DSA keys; see the hand-built test")

    message = refused((tmp_path / "id_dsa.pub").read_text(), "dsa_not_supported")

    assert "ssh-keygen -t ed25519" in message


def _dsa_blob() -> bytes:
    private = dsa.generate_private_key(1024)  # noqa: S505 - a DSA key that must be refused
    numbers = private.public_key().public_numbers()
    params = numbers.parameter_numbers
    return b"".join(
        [
            ssh_string(b"ssh-dss"),
            ssh_mpint(params.p),
            ssh_mpint(params.q),
            ssh_mpint(params.g),
            ssh_mpint(numbers.y),
        ]
    )


def test_hand_built_dsa_key_is_refused(tmp_path: Path) -> None:
    blob = _dsa_blob()
    line = f"ssh-dss {base64.b64encode(blob).decode()} old@server\n"
    (tmp_path / "dsa.pub").write_text(line)
    assert keygen_fingerprint(tmp_path / "dsa.pub")[0] == 1024  # OpenSSH reads it as DSA

    refused(line, "dsa_not_supported")


def test_dsa_key_in_an_rfc4716_block_is_refused() -> None:
    body = base64.b64encode(_dsa_blob()).decode()
    block = "\n".join(
        [
            "---- BEGIN SSH2 PUBLIC KEY ----",
            *(body[i : i + 70] for i in range(0, len(body), 70)),
            "---- END SSH2 PUBLIC KEY ----",
        ]
    )

    refused(block, "dsa_not_supported")


def test_small_rsa_key_is_refused_naming_its_size(tmp_path: Path) -> None:
    pub = keygen(tmp_path, "id_rsa_small", "-t", "rsa", "-b", "1024").with_suffix(".pub")

    message = refused(pub.read_text(), "rsa_too_small")

    assert "1024" in message and str(MIN_RSA_BITS) in message
    assert "ssh-keygen -t ed25519" in message


# --------------------------------------------------------------------------- hostile RSA keys


def fake_modulus(bits: int) -> int:
    """An odd number of exactly ``bits`` bits: a public key need not be valid to be refused."""
    return (1 << (bits - 1)) | (0x5DEECE66D << 64) | 1


def rsa_numbers_line(bits: int, exponent: int = 65537, comment: str = "mallory@host") -> str:
    """An OpenSSH public-key line for the RSA public numbers (exponent, fake modulus)."""
    key = rsa.RSAPublicNumbers(exponent, fake_modulus(bits)).public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}\n"


HUGE_EXPONENT = (1 << 2999) | 0x10001  # ~3,000 bits, odd: as in issue 9


@pytest.mark.parametrize("bits", [8193, 10240, 16384, 20000])
def test_oversized_rsa_key_is_refused_naming_its_size(bits: int) -> None:
    line = rsa_numbers_line(bits)
    assert len(line) < MAX_PUBLIC_KEY_CHARS  # refused for its size in bits, not in characters

    message = refused(line, "rsa_too_large")

    assert str(bits) in message and str(MAX_RSA_BITS) in message
    assert "ssh-keygen -t ed25519" in message


def test_rsa_key_of_exactly_the_maximum_size_is_accepted() -> None:
    parsed = parse_public_key(rsa_numbers_line(MAX_RSA_BITS))
    assert (parsed.algorithm, parsed.bits) == ("ssh-rsa", MAX_RSA_BITS)


@pytest.mark.parametrize(
    ("exponent", "bits", "shown"),
    [
        (3, 2048, "3"),
        (17, 4096, "17"),
        (65539, 2048, "65539"),
        ((1 << 31) - 1, 3072, str((1 << 31) - 1)),
        (HUGE_EXPONENT, 4096, "a 3000-bit number"),
    ],
    ids=["e3", "e17", "e65539", "e2^31-1", "e3000bits"],
)
def test_rsa_key_with_an_exponent_other_than_65537_is_refused(
    exponent: int, bits: int, shown: str
) -> None:
    message = refused(rsa_numbers_line(bits, exponent), "rsa_bad_exponent")

    assert f"public exponent is {shown};" in message
    assert str(RSA_EXPONENT) in message
    assert str(HUGE_EXPONENT)[:12] not in message  # the huge exponent is never echoed


def test_huge_key_with_a_bad_exponent_is_refused_for_its_size_first() -> None:
    refused(rsa_numbers_line(16384, 3), "rsa_too_large")


def test_hostile_rsa_key_in_pem_or_rfc4716_form_is_refused_too() -> None:
    key = rsa.RSAPublicNumbers(65537, fake_modulus(16384)).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    refused(pem, "rsa_too_large")

    body = rsa_numbers_line(4096, HUGE_EXPONENT).split()[1]
    chunks = "\n".join(body[i : i + 70] for i in range(0, len(body), 70))
    block = f"---- BEGIN SSH2 PUBLIC KEY ----\n{chunks}\n---- END SSH2 PUBLIC KEY ----\n"
    refused(block, "rsa_bad_exponent")


@pytest.mark.parametrize("bits", [2048, 4096])
def test_real_rsa_keys_with_exponent_65537_are_accepted(bits: int) -> None:
    # Built from a real modulus when cheap (2048); a 4096-bit modulus only needs its size here.
    if bits == 2048:
        key = rsa.generate_private_key(65537, 2048).public_key()
        raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        line = raw.decode() + " ci@runner"
    else:
        line = rsa_numbers_line(bits)

    parsed = parse_public_key(line)

    assert (parsed.algorithm, parsed.bits) == ("ssh-rsa", bits)
    assert login_key_problem(asyncssh.import_public_key(line)) is None


@pytest.mark.parametrize(
    ("bits", "exponent", "code"),
    [
        (2048, 65537, None),
        (4096, 65537, None),
        (8192, 65537, None),
        (1024, 65537, "rsa_too_small"),
        (8193, 65537, "rsa_too_large"),
        (16384, 65537, "rsa_too_large"),
        (2048, 3, "rsa_bad_exponent"),
        (4096, HUGE_EXPONENT, "rsa_bad_exponent"),
    ],
)
def test_login_refuses_exactly_the_rsa_keys_registration_refuses(
    bits: int, exponent: int, code: str | None
) -> None:
    line = rsa_numbers_line(bits, exponent)
    key = asyncssh.import_public_key(line)  # what asyncssh hands validate_public_key

    assert login_key_problem(key) == code == rsa_problem(bits, exponent)
    if code is None:
        parse_public_key(line)
    else:
        refused(line, code)


def test_login_check_accepts_every_other_key_type_and_private_keys() -> None:
    for alg in ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp521"):
        private = asyncssh.generate_private_key(alg)
        assert login_key_problem(private) is None
        assert login_key_problem(asyncssh.import_public_key(private.export_public_key())) is None
    private_rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    assert login_key_problem(private_rsa) is None
    weak = asyncssh.generate_private_key("ssh-rsa", key_size=2048, exponent=3)
    assert login_key_problem(weak) == "rsa_bad_exponent"


def test_ed448_key_is_refused_as_unsupported() -> None:
    text = asyncssh.generate_private_key("ssh-ed448").export_public_key().decode()

    message = refused(text, "unsupported_type")

    assert '"ssh-ed448"' in message and "ssh-ed25519" in message


def test_unknown_key_type_is_refused_as_unsupported(ed25519_pub: str) -> None:
    refused("ssh-foo " + ed25519_pub.split()[1], "unsupported_type")


def test_rsa_signature_algorithm_name_used_as_key_type_is_refused(ed25519_pub: str) -> None:
    refused("rsa-sha2-512 " + ed25519_pub.split()[1], "unsupported_type")


def _not_a_key_cases() -> list[tuple[str, str]]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    good_b64 = base64.b64encode(key.public_data).decode()
    rsa_b64 = base64.b64encode(
        asyncssh.generate_private_key("ssh-rsa", key_size=2048).public_data
    ).decode()
    trailing = base64.b64encode(key.public_data + b"\x00\x00\x00\x01x").decode()
    short_blob = base64.b64encode(key.public_data[:-5]).decode()
    # RSA with the exponent 65537 written as a non-minimal mpint (00 00 01 00 01): decodable,
    # but not the canonical encoding OpenSSH fingerprints, so it must not be stored as is.
    modulus = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    non_canonical = base64.b64encode(
        ssh_string(b"ssh-rsa") + ssh_string(b"\x00\x00\x01\x00\x01") + ssh_mpint(modulus)
    ).decode()
    return [
        ("bad-base64-char", f"ssh-ed25519 {good_b64[:20]}!{good_b64[21:]} a@b"),
        ("truncated-base64", f"ssh-ed25519 {good_b64[:-3]} a@b"),
        ("truncated-blob", f"ssh-ed25519 {short_blob} a@b"),
        ("trailing-bytes-in-blob", f"ssh-ed25519 {trailing} a@b"),
        ("type-says-rsa-blob-is-ed25519", f"ssh-rsa {good_b64} a@b"),
        ("type-says-ed25519-blob-is-rsa", f"ssh-ed25519 {rsa_b64} a@b"),
        ("non-canonical-rsa-encoding", f"ssh-rsa {non_canonical} a@b"),
        ("type-only", "ssh-ed25519"),
        ("type-missing", f"{good_b64} a@b"),
        ("prose", "my key is on my laptop"),
        ("fingerprint", "SHA256:NKV2mKNnJS8LirrG75Czt7GkwBsKbO5U/sAhYZa07lg"),
        ("pgp-block", "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBGabc\n-----END PGP"),
        ("rfc4716-without-end", f"---- BEGIN SSH2 PUBLIC KEY ----\n{good_b64}\n"),
        (
            "rfc4716-garbage",
            "---- BEGIN SSH2 PUBLIC KEY ----\nnot base64!\n---- END SSH2 PUBLIC KEY ----",
        ),
        ("non-ascii-base64", f"ssh-ed25519 {good_b64[:-2]}é= a@b"),
    ]


_NOT_A_KEY = _not_a_key_cases()


@pytest.mark.parametrize("text", [c[1] for c in _NOT_A_KEY], ids=[c[0] for c in _NOT_A_KEY])
def test_text_that_is_not_a_public_key_is_refused_without_echo(text: str) -> None:
    message = refused(text, "not_a_public_key")

    assert ".pub" in message


@pytest.mark.parametrize("value", [None, b"ssh-ed25519 AAAA", 42])
def test_non_text_input_is_refused(value: object) -> None:
    with pytest.raises(InvalidPublicKey) as info:
        parse_public_key(value)  # type: ignore[arg-type]

    assert info.value.code == "not_a_public_key"
