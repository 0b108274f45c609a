"""The login-name grammar: pure, checked before anything touches the database."""

from __future__ import annotations

import re

# 'sandbox-' then 1-63 of [a-z0-9-]: the same rule as the sandboxes.id CHECK constraint.
_SANDBOX_LOGIN = re.compile(r"sandbox-[a-z0-9-]{1,63}")
MAX_LOGIN_CHARS = 71


def sandbox_id_from_login(username: str) -> str | None:
    """The sandbox id named by an SSH login name, or None when the name is not one.

    Only exact lowercase ASCII matches count: no trimming, no case folding, no suffixes, so that
    one sandbox has exactly one spelling.
    """
    if len(username) > MAX_LOGIN_CHARS or not username.isascii():
        return None
    if _SANDBOX_LOGIN.fullmatch(username) is None:
        return None
    return username
