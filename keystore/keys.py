"""OpenSSH public-key parsing and policy (pure: no I/O, no database).

:func:`parse_public_key` turns what a person pasted into a :class:`ParsedKey`, or raises
:class:`keystore.errors.InvalidPublicKey` whose ``str()`` is a message for that person and
whose ``code`` says what was wrong:

``too_large``                  longer than :data:`MAX_PUBLIC_KEY_CHARS` characters
``empty``                      nothing but whitespace and ``#`` comment lines
``private_key``                a PRIVATE key (OpenSSH, PEM, PKCS#8, PuTTY, ...) was pasted
``multiple_keys``              more than one non-blank, non-``#`` line (or RFC 4716/PEM block),
                               at least one of which looks like a key line; several lines
                               none of which looks like a key are ``not_a_public_key``
``options_not_supported``      an authorized_keys line with options before the key type
``certificate_not_supported``  an OpenSSH certificate (``*-cert-v01@openssh.com``)
``dsa_not_supported``          ``ssh-dss``
``rsa_too_small``              RSA modulus under :data:`MIN_RSA_BITS` bits
``rsa_too_large``              RSA modulus over :data:`MAX_RSA_BITS` bits
``rsa_bad_exponent``           RSA public exponent other than :data:`RSA_EXPONENT` (65537)
``unsupported_type``           any other key type outside :data:`ALLOWED_ALGORITHMS`
``bad_comment``                the comment contains control / invisible formatting characters
``not_a_public_key``           anything else that does not decode as a public key

Accepted input:

* one OpenSSH public-key line, ``TYPE BASE64 [comment]`` (the content of a ``.pub`` file),
  with any surrounding whitespace, blank lines and ``#`` comment lines;
* one RFC 4716 block (``---- BEGIN SSH2 PUBLIC KEY ----``, what PuTTYgen and
  ``ssh-keygen -e`` write); its ``Comment:`` header becomes the comment;
* one PEM public key (``-----BEGIN PUBLIC KEY-----`` / ``-----BEGIN RSA PUBLIC KEY-----``,
  what ``ssh-keygen -e -m PKCS8|PEM`` writes); it has no comment.

Whatever the input format, the result is canonical: :attr:`ParsedKey.public_key` is
``TYPE BASE64`` of the blob and the fingerprint is the one ``ssh-keygen -lf`` prints.

Comments are stripped and truncated to :data:`MAX_COMMENT_CHARS` characters. A comment holding a
control character (Unicode category Cc, e.g. NUL, ESC, TAB inside the comment) or an invisible
formatting character (Cf, e.g. the bidi override U+202E, or line/paragraph separators Zl/Zp) is
refused with code ``bad_comment``, because it would be shown to other people and could hide or
spoof text.

Messages never contain the key material or any other part of the input except the comment and
a key-type name matching :data:`_TYPE_RE`.

RSA limits, and the same limits at login
    Verifying an RSA signature costs one or two modular multiplications per bit of the public
    exponent, each growing with the square of the modulus length: a 16,384-bit modulus or a
    ~3,000-bit exponent makes one verification take milliseconds, and a few dozen connections
    offering such a key hold a core. ssh-keygen and every common tool make keys with the
    exponent 65537, and OpenSSH itself refuses RSA moduli over 16,384 bits. :func:`rsa_problem`
    is the one rule; :func:`parse_public_key` applies it at registration and
    :func:`login_key_problem` at login, to an :class:`asyncssh.SSHKey`, so that the server can
    refuse an offered key before verifying anything with it (a key registered before these
    limits existed, or any key at all offered by a hostile client).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import unicodedata
from dataclasses import dataclass

import asyncssh
from asyncssh.public_key import decode_ssh_public_key
from cryptography.hazmat.primitives.asymmetric import rsa

from keystore.errors import InvalidPublicKey

__all__ = [
    "ALLOWED_ALGORITHMS",
    "MAX_COMMENT_CHARS",
    "MAX_PUBLIC_KEY_CHARS",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "RSA_EXPONENT",
    "ParsedKey",
    "fingerprint_of_blob",
    "login_key_problem",
    "parse_public_key",
    "rsa_problem",
]

MAX_PUBLIC_KEY_CHARS = 16384
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
RSA_EXPONENT = 65537
MAX_COMMENT_CHARS = 255

# Key types runtools accepts, with the size reported for the fixed-size ones (RSA is measured).
_FIXED_BITS: dict[str, int] = {
    "ssh-ed25519": 256,
    "ecdsa-sha2-nistp256": 256,
    "ecdsa-sha2-nistp384": 384,
    "ecdsa-sha2-nistp521": 521,
    "sk-ssh-ed25519@openssh.com": 256,
    "sk-ecdsa-sha2-nistp256@openssh.com": 256,
}
ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"ssh-rsa", *_FIXED_BITS})

_CERT_SUFFIX = "-cert-v01@openssh.com"

_PASTE_HINT = (
    'Paste the whole single line of your .pub file, e.g. "ssh-ed25519 AAAA... you@laptop" '
    "(show it with: cat ~/.ssh/id_ed25519.pub)."
)
_NEW_KEY_HINT = "Create a new key with: ssh-keygen -t ed25519"

# Something that looks like an SSH key type name (safe to show back to the person).
_TYPE_RE = re.compile(r"(?:ssh|ecdsa|sk|rsa|x509v3|webauthn)-[A-Za-z0-9@.\-]{1,80}")

# Signs of a private key. Checked on the whole input before anything else.
_PRIVATE_MARKERS = (
    re.compile(r"BEGIN[A-Z0-9 ]*PRIVATE KEY", re.IGNORECASE),
    re.compile(r"PuTTY-User-Key-File-", re.IGNORECASE),
    re.compile(r"^\s*Private-(?:Lines|MAC)\s*:", re.IGNORECASE | re.MULTILINE),
    # base64 of "openssh-key-v1\0": the body of an OpenSSH private key pasted without its armour.
    re.compile(r"b3BlbnNzaC1rZXktdjE"),
)

_RFC4716_BEGIN = re.compile(r"^-{3,5} ?BEGIN SSH2 PUBLIC KEY ?-{3,5}$")
_RFC4716_END = re.compile(r"^-{3,5} ?END SSH2 PUBLIC KEY ?-{3,5}$")
_PEM_BEGIN = re.compile(r"^-----BEGIN (?:RSA )?PUBLIC KEY-----$")
_PEM_END = re.compile(r"^-----END (?:RSA )?PUBLIC KEY-----$")

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BAD_COMMENT_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A public key that passed :func:`parse_public_key`."""

    algorithm: str
    """Key type as OpenSSH names it: 'ssh-ed25519', 'ssh-rsa', 'ecdsa-sha2-nistp256', ..."""
    bits: int
    """ed25519 and sk-* -> 256, ecdsa -> curve size, rsa -> modulus size."""
    fingerprint: str
    """'SHA256:' + unpadded base64 of sha256(blob), identical to ``ssh-keygen -lf``."""
    public_key: str
    """Canonical "TYPE BASE64" (no comment, no options)."""
    comment: str | None
    """Trailing comment, stripped and truncated; None if absent."""
    blob: bytes
    """The raw key blob (SSH wire format)."""


def fingerprint_of_blob(blob: bytes) -> str:
    """Return the OpenSSH SHA256 fingerprint of a key blob, e.g. ``SHA256:nThbg6kXUpJW...``."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _fail(code: str, message: str) -> InvalidPublicKey:
    return InvalidPublicKey(message, code)


def parse_public_key(text: str) -> ParsedKey:
    """Parse and check one pasted public key. See the module docstring for codes and formats.

    The private-key check runs before the size check: it is a linear scan, and telling a person
    that they just pasted a secret matters more than telling them it was too long.
    """
    if not isinstance(text, str):
        raise _fail("not_a_public_key", "The public key must be text. " + _PASTE_HINT)

    if any(marker.search(text) for marker in _PRIVATE_MARKERS):
        raise _fail(
            "private_key",
            "This is a PRIVATE key, not a public key. A private key must never be shared or "
            "pasted anywhere; it has not been stored. Paste the public key instead: the "
            "contents of the matching .pub file (e.g. ~/.ssh/id_ed25519.pub). Since this "
            "private key has been exposed, consider replacing it with a new one "
            "(ssh-keygen -t ed25519) and removing the old one wherever it is authorized.",
        )

    if len(text) > MAX_PUBLIC_KEY_CHARS:
        raise _fail(
            "too_large",
            f"The public key is {len(text)} characters long; at most {MAX_PUBLIC_KEY_CHARS} "
            "are accepted. " + _PASTE_HINT,
        )

    # Split on line breaks only (not str.splitlines, which also splits on U+2028, VT, FF...):
    # any other odd character stays on its line and is judged there.
    lines = [line.strip() for line in _LINE_BREAK.split(text)]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise _fail("empty", "No public key was given. " + _PASTE_HINT)

    if _RFC4716_BEGIN.match(lines[0]) or _PEM_BEGIN.match(lines[0]):
        blob, comment = _parse_block(lines)
        type_in_text = None
    else:
        if len(lines) > 1 and not any(_looks_like_key_line(line) for line in lines):
            raise _fail("not_a_public_key", "This is not an OpenSSH public key. " + _PASTE_HINT)
        if len(lines) > 1:
            raise _fail(
                "multiple_keys",
                f"Found {len(lines)} lines; add exactly one public key at a time, on a single "
                "line. If this is one key, it was broken across lines when copied: join it "
                "back into one line. " + _PASTE_HINT,
            )
        type_in_text, blob, comment = _parse_line(lines[0])

    return _check_blob(blob, type_in_text, _clean_comment(comment))


def _parse_line(line: str) -> tuple[str, bytes, str | None]:
    """Split ``TYPE BASE64 [comment]`` and decode the base64; return (type, blob, comment)."""
    parts = line.split(None, 2)
    key_type = parts[0]

    if not _TYPE_RE.fullmatch(key_type):
        if _has_options(line):
            raise _fail(
                "options_not_supported",
                "This looks like an authorized_keys line with options in front of the key "
                '(such as from="...", command="..." or no-pty). Options are not supported by '
                'runtools; paste only the key itself ("ssh-ed25519 AAAA... comment").',
            )
        if key_type.startswith("AAAA"):
            raise _fail(
                "not_a_public_key",
                'The key type is missing: the line should start with e.g. "ssh-ed25519". '
                + _PASTE_HINT,
            )
        raise _fail("not_a_public_key", "This is not an OpenSSH public key. " + _PASTE_HINT)

    _check_type_policy(key_type)

    if len(parts) < 2:
        raise _fail(
            "not_a_public_key",
            f'The key data after "{key_type}" is missing. ' + _PASTE_HINT,
        )
    try:
        blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _fail(
            "not_a_public_key",
            f'The key data after "{key_type}" is not valid base64; it may have been cut short '
            "or altered when copied. " + _PASTE_HINT,
        ) from None
    comment = parts[2] if len(parts) > 2 else None
    return key_type, blob, comment


def _looks_like_key_line(line: str) -> bool:
    return bool(_TYPE_RE.fullmatch(line.split(None, 1)[0])) or _has_options(line)


def _has_options(line: str) -> bool:
    """True if ``line`` is ``OPTIONS TYPE BASE64 ...`` as in authorized_keys(5).

    Options are one field of comma-separated ``name`` or ``name="value"`` items; quoted values
    may contain spaces and escaped quotes.
    """
    in_quotes = False
    i = 0
    while i < len(line):
        ch = line[i]
        if in_quotes and ch == "\\" and i + 1 < len(line):
            i += 2
            continue
        if ch == '"':
            in_quotes = not in_quotes
        elif not in_quotes and ch in " \t":
            break
        i += 1
    rest = line[i:].split()
    return len(rest) >= 2 and bool(_TYPE_RE.fullmatch(rest[0]))


def _parse_block(lines: list[str]) -> tuple[bytes, str | None]:
    """Decode one RFC 4716 or PEM public-key block (the only thing in ``lines``)."""
    end_re = _RFC4716_END if _RFC4716_BEGIN.match(lines[0]) else _PEM_END
    ends = [i for i, line in enumerate(lines) if end_re.match(line)]
    if not ends:
        raise _fail(
            "not_a_public_key",
            "The public key block has no END line; it may have been cut short when copied. "
            + _PASTE_HINT,
        )
    if ends[0] != len(lines) - 1:
        raise _fail(
            "multiple_keys",
            "Found more than the one public key block; add exactly one public key at a time. "
            + _PASTE_HINT,
        )
    try:
        key = asyncssh.import_public_key("\n".join(lines) + "\n")
        comment = key.get_comment()
    except Exception:  # asyncssh raises several types on malformed input
        raise _fail(
            "not_a_public_key",
            "The public key block could not be decoded; it may have been cut short or altered "
            "when copied. " + _PASTE_HINT,
        ) from None
    return key.public_data, comment


def _check_type_policy(key_type: str) -> None:
    """Refuse types that are recognisably not allowed, with a specific code."""
    if key_type.endswith(_CERT_SUFFIX):
        raise _fail(
            "certificate_not_supported",
            f'This is an OpenSSH certificate ("{key_type}"); certificates are not supported. '
            "Paste the plain public key it was made from (the .pub file without -cert in its "
            "name).",
        )
    if key_type == "ssh-dss":
        raise _fail(
            "dsa_not_supported",
            "DSA keys (ssh-dss) are insecure and no longer supported by OpenSSH or runtools. "
            + _NEW_KEY_HINT
            + " and paste the new .pub file.",
        )
    if key_type not in ALLOWED_ALGORITHMS:
        allowed = ", ".join(sorted(ALLOWED_ALGORITHMS))
        raise _fail(
            "unsupported_type",
            f'Key type "{key_type}" is not supported. Supported types: {allowed}. '
            + _NEW_KEY_HINT
            + " and paste the new .pub file.",
        )


def _blob_type(blob: bytes) -> str:
    """The key-type string at the head of a wire-format blob."""
    if len(blob) < 4:
        raise ValueError("short blob")
    (length,) = struct.unpack(">I", blob[:4])
    if length == 0 or length > 256 or len(blob) < 4 + length:
        raise ValueError("bad type length")
    return blob[4 : 4 + length].decode("ascii")


def _check_blob(blob: bytes, type_in_text: str | None, comment: str | None) -> ParsedKey:
    corrupt = "The key data is not a valid public key; it may have been cut short or altered when "
    try:
        blob_type = _blob_type(blob)
    except (ValueError, UnicodeDecodeError):
        raise _fail("not_a_public_key", corrupt + "copied. " + _PASTE_HINT) from None

    if type_in_text is not None and blob_type != type_in_text:
        shown = blob_type if _TYPE_RE.fullmatch(blob_type) else "another type"
        raise _fail(
            "not_a_public_key",
            f'The line says "{type_in_text}" but the key data is of type "{shown}"; it was '
            "altered. " + _PASTE_HINT,
        )
    if not _TYPE_RE.fullmatch(blob_type):
        raise _fail("not_a_public_key", corrupt + "copied. " + _PASTE_HINT)
    _check_type_policy(blob_type)

    try:
        key = decode_ssh_public_key(blob)
    except Exception:  # KeyImportError, ValueError, UnicodeDecodeError, ... on hostile input
        raise _fail("not_a_public_key", corrupt + "copied. " + _PASTE_HINT) from None

    # Require the canonical encoding, so that the fingerprint (computed by OpenSSH on its own
    # re-encoding) and the stored blob always agree.
    if key.public_data != blob or key.algorithm.decode("ascii") != blob_type:
        raise _fail("not_a_public_key", corrupt + "copied. " + _PASTE_HINT)

    if blob_type == "ssh-rsa":
        pyca_key = key.pyca_key
        if not isinstance(pyca_key, rsa.RSAPublicKey):  # pragma: no cover - asyncssh invariant
            raise _fail("not_a_public_key", corrupt + "copied. " + _PASTE_HINT)
        numbers = pyca_key.public_numbers()
        bits = pyca_key.key_size
        problem = rsa_problem(bits, numbers.e)
        if problem is not None:
            raise _fail(problem, _rsa_message(problem, bits, numbers.e))
    else:
        bits = _FIXED_BITS[blob_type]

    return ParsedKey(
        algorithm=blob_type,
        bits=bits,
        fingerprint=fingerprint_of_blob(blob),
        public_key=f"{blob_type} {base64.b64encode(blob).decode('ascii')}",
        comment=comment,
        blob=blob,
    )


def rsa_problem(bits: int, exponent: int) -> str | None:
    """Why runtools refuses an RSA key with this modulus size and public exponent, or None.

    Returns ``rsa_too_small`` (under :data:`MIN_RSA_BITS`), ``rsa_too_large`` (over
    :data:`MAX_RSA_BITS`) or ``rsa_bad_exponent`` (not :data:`RSA_EXPONENT`), checked in that
    order.
    """
    if bits < MIN_RSA_BITS:
        return "rsa_too_small"
    if bits > MAX_RSA_BITS:
        return "rsa_too_large"
    if exponent != RSA_EXPONENT:
        return "rsa_bad_exponent"
    return None


def login_key_problem(key: asyncssh.SSHKey) -> str | None:
    """Why a key offered at login must be refused before any signature is checked, or None.

    For an RSA key, :func:`rsa_problem` of its modulus size and exponent (reading two numbers
    off the already decoded key: no crypto); None for every other key type, whose cost is fixed.
    Accepts public and private :class:`asyncssh.SSHKey` objects.
    """
    pyca_key = getattr(key, "pyca_key", None)
    if isinstance(pyca_key, rsa.RSAPrivateKey):
        pyca_key = pyca_key.public_key()
    if not isinstance(pyca_key, rsa.RSAPublicKey):
        return None
    return rsa_problem(pyca_key.key_size, pyca_key.public_numbers().e)


def _rsa_message(code: str, bits: int, exponent: int) -> str:
    new_key = _NEW_KEY_HINT + " (or ssh-keygen -t rsa -b 4096) and paste the new .pub file."
    if code == "rsa_too_small":
        return f"This RSA key is {bits} bits; at least {MIN_RSA_BITS} bits are required. " + new_key
    if code == "rsa_too_large":
        return (
            f"This RSA key is {bits} bits; at most {MAX_RSA_BITS} bits are accepted, because "
            "checking signatures made with larger keys slows down logins for everyone. " + new_key
        )
    # Small exponents are shown as they are; a huge one only by its length (it is key material).
    shown = (
        str(exponent) if exponent.bit_length() <= 32 else f"a {exponent.bit_length()}-bit number"
    )
    return (
        f"This RSA key's public exponent is {shown}; only {RSA_EXPONENT} is accepted (the "
        "exponent ssh-keygen and other common tools use). " + new_key
    )


def _clean_comment(comment: str | None) -> str | None:
    if comment is None:
        return None
    comment = comment.strip()
    if not comment:
        return None
    if any(unicodedata.category(ch) in _BAD_COMMENT_CATEGORIES for ch in comment):
        raise _fail(
            "bad_comment",
            "The key's comment (the text after the key data) contains control or invisible "
            "characters. Remove them, or remove the comment, and paste the key again.",
        )
    return comment[:MAX_COMMENT_CHARS].rstrip() or None
