"""Issue 9, finding 7: hostile RSA keys (a 16,384-bit modulus, a ~3,000-bit public exponent) are
refused at registration, through the API with a 400 and a stable code, and through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keystore import ssh_keys
from keystore.keys import MAX_RSA_BITS, RSA_EXPONENT
from tests.integration.api.support import Api, make_org
from tests.integration.support import REPO

HUGE_EXPONENT = (1 << 2999) | 0x10001


def hostile_line(bits: int, exponent: int) -> str:
    """An RSA public key from numbers: a fake odd modulus is enough to be refused."""
    modulus = (1 << (bits - 1)) | (0x5DEECE66D << 64) | 1
    key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode() + " mallory@host"


CASES = [
    pytest.param(16384, RSA_EXPONENT, "rsa_too_large", f"at most {MAX_RSA_BITS} bits", id="16384"),
    pytest.param(4096, 3, "rsa_bad_exponent", f"only {RSA_EXPONENT}", id="e3"),
    pytest.param(4096, HUGE_EXPONENT, "rsa_bad_exponent", "3000-bit", id="e3000bits"),
]


@pytest.mark.parametrize(("bits", "exponent", "code", "words"), CASES)
async def test_api_refuses_a_hostile_rsa_key_with_400_and_its_code(
    api: Api, pool: Any, bits: int, exponent: int, code: str, words: str
) -> None:
    org = await make_org(pool, "hygiene")
    token, _ = await org.api_key(["*"], name="admin")

    r = await api.call(
        "POST",
        "/v1/ssh-keys",
        token,
        json_body={"name": "evil", "public_key": hostile_line(bits, exponent)},
    )

    assert r.status == 400, r.text
    assert r.code == code
    assert words in r.body["error"]["message"]
    assert await ssh_keys.list_keys(pool, org.id, include_revoked=True) == []
    refusal = api.events[-1]
    assert (refusal.action, refusal.result, refusal.reason) == (
        "api.ssh_key.create",
        "refused",
        code,
    )


@pytest.mark.parametrize(("bits", "exponent", "code", "words"), CASES[::2])
async def test_cli_refuses_a_hostile_rsa_key(
    database_url: str, pool: Any, tmp_path: Path, bits: int, exponent: int, code: str, words: str
) -> None:
    org = await make_org(pool, "hygiene")
    pub = tmp_path / "evil.pub"
    pub.write_text(hostile_line(bits, exponent) + "\n")

    r = subprocess.run(
        [sys.executable, "-m", "gateway", "ssh-key", "add", "--org", org.slug, str(pub)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, RTGW_DATABASE_URL=database_url),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )

    assert r.returncode == 1, (r.stdout, r.stderr)
    assert words in r.stderr
    assert await ssh_keys.list_keys(pool, org.id, include_revoked=True) == []
