from __future__ import annotations

import pytest

from gateway.ssh.login import sandbox_id_from_login


@pytest.mark.parametrize(
    "login", ["sandbox-a", "sandbox-abc123", "sandbox-a-b-c", "sandbox-" + "a" * 63, "sandbox--"]
)
def test_well_formed_sandbox_logins_name_their_sandbox(login: str) -> None:
    assert sandbox_id_from_login(login) == login


@pytest.mark.parametrize(
    "login",
    [
        "",
        "root",
        "sandbox-",
        "sandbox-" + "a" * 64,
        "Sandbox-abc",
        "sandbox-ABC",
        "sandbox-a_b",
        "sandbox-a.b",
        "sandbox-abc ",
        " sandbox-abc",
        "sandbox-abc\n",
        "sandbox-abc\x00",
        "sandbox-ab\u0441",  # Cyrillic es: looks like 'c'
        "sandbox-abc@evil",
        "sandbox-abc/../x",
        "x" * 10_000,
    ],
)
def test_anything_else_is_not_a_sandbox_login(login: str) -> None:
    assert sandbox_id_from_login(login) is None
