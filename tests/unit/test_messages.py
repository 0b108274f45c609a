from __future__ import annotations

import re

from gateway import messages


def _reasons() -> list[messages.Reason]:
    return [v for v in vars(messages).values() if isinstance(v, messages.Reason)]


def test_every_reason_code_is_documented_in_the_table() -> None:
    table = messages.__doc__ or ""
    for reason in _reasons():
        assert re.search(rf"\|\s*{reason.code}\s*\|", table), reason.code


def test_reason_codes_are_unique_and_stable_identifiers() -> None:
    codes = [r.code for r in _reasons()]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", c) for c in codes)


def test_messages_after_auth_say_what_to_do_next() -> None:
    text = messages.UPSTREAM_UNREACHABLE.render(
        sandbox="sandbox-x", detail="no answer within 10 s", conn_id="abc"
    )
    assert text.startswith("runtools: sandbox-x could not be reached (no answer within 10 s)")
    assert "try again" in text and "abc" in text
    assert "runtools sandbox start sandbox-x" in messages.SANDBOX_STOPPED.render(
        sandbox="sandbox-x"
    )
