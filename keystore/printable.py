"""Client-supplied strings made safe for logs, audit rows and terminals.

Whatever a client sends (subsystem names, exit signals, key names, login names, forward
destinations, HTTP header lines) may end up in a log line, an audit row or ``audit tail`` on an
operator's terminal. :func:`printable` escapes every character that could move the cursor, end
the line or reorder the text (C0 and C1 controls, DEL, Unicode format characters such as the
bidi overrides, line and paragraph separators, lone surrogates) as ``\\n``, ``\\xNN`` or
``\\uNNNN``, and caps the length. Backslashes are left alone: escaping them too would double up
at every layer a value passes through (audit row, then ``audit tail``), and a client typing a
literal ``\\x1b`` gains nothing from it. :func:`redact` removes credentials (``Authorization``
header values, bearer tokens, the secret part of ``rt_live_``/``rt_test_`` keys) from text.
:func:`scrub` applies both to every string inside a JSON-like value.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

__all__ = [
    "AUDIT_MAX_CHARS",
    "LOG_MAX_CHARS",
    "NAME_MAX_CHARS",
    "escape",
    "name_or_none",
    "printable",
    "redact",
    "scrub",
]

# Longest value kept in an audit row (details, target, actor) and in a log line's field.
AUDIT_MAX_CHARS = 256
LOG_MAX_CHARS = 1024
# Longest name a user gives a key, an API key or a CA.
NAME_MAX_CHARS = 200

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_SECRET_PATTERNS = (
    # An Authorization header (or a repr of one), whatever its scheme: the value goes.
    (re.compile(r"(?i)(authorization\s*['\"]?\s*[:=]\s*['\"]?)[^\r\n'\",}]+"), r"\1[redacted]"),
    (re.compile(r"(?i)\b(bearer\s+)[^\s'\",}\\]+"), r"\1[redacted]"),
    # An API key anywhere: its public start (prefix + lookup) tells keys apart, the rest goes.
    (re.compile(r"\brt_(live|test)_([0-9A-Za-z]{12})[0-9A-Za-z]+"), r"rt_\1_\2[redacted]"),
    # A JWT (a WorkOS session token) without its header around it.
    (re.compile(r"\beyJ[0-9A-Za-z_-]*\.[0-9A-Za-z_-]+\.[0-9A-Za-z_-]*"), "[redacted jwt]"),
)


# Text none of whose patterns can match: the common case, decided by one search.
_SUSPECT = re.compile(r"(?i)rt_|bearer|authorization|eyj")


def _unsafe(char: str) -> bool:
    return unicodedata.category(char) in _UNSAFE_CATEGORIES


def escape(text: str, *, keep: str = "") -> str:
    """``text`` with every unsafe character (but those in ``keep``) written as an escape."""
    if text.isprintable():  # the common case: nothing to do
        return text
    out = []
    for char in text:
        if char in keep or not _unsafe(char):
            out.append(char)
        elif char in _NAMED:
            out.append(_NAMED[char])
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}")
    return "".join(out)


def printable(text: str, limit: int = AUDIT_MAX_CHARS) -> str:
    """``text`` escaped and capped at ``limit`` characters (what was cut is counted)."""
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = escape(text)
    return f"{text}...[+{cut} chars]" if cut > 0 else text


def redact(text: str) -> str:
    """``text`` without credentials: Authorization values, bearer tokens, API key secrets."""
    if _SUSPECT.search(text) is None:
        return text
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F  # C0, DEL and C1


def name_or_none(name: object) -> str | None:
    """A name as stored (surrounding spaces stripped), or None when it is not text, holds a
    control character anywhere (C0, DEL, C1: before stripping too, so "laptop\\f" is refused
    rather than silently cut, as the API's schema says), or is empty or over
    ``NAME_MAX_CHARS`` once stripped. One rule for SSH keys, API keys and CAs."""
    if not isinstance(name, str) or any(_control(c) for c in name):
        return None
    name = name.strip()
    return name if 1 <= len(name) <= NAME_MAX_CHARS else None


def scrub(value: Any, limit: int = AUDIT_MAX_CHARS) -> Any:
    """Every string in ``value`` (a str, or dicts/lists/tuples of them, keys included) redacted,
    escaped and capped; anything else is returned as it is."""
    if isinstance(value, str):
        if len(value) <= limit and value.isprintable() and _SUSPECT.search(value) is None:
            return value  # every log line's common case: nothing to redact, escape or cut
        return printable(redact(value), limit)
    if isinstance(value, Mapping):
        return {
            (scrub(k, limit) if isinstance(k, str) else k): scrub(v, limit)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [scrub(v, limit) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub(v, limit) for v in value)
    return value
