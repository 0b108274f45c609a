"""Upstream certificates (gateway/upstream/certificates.py): what each certificate says, checked
with OpenSSH's own ``ssh-keygen -L``; the CA key files; the config bounds; the CLI."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
from pathlib import Path

import asyncssh
import pytest

from gateway import cli
from gateway.config import Config, UpstreamConfig
from gateway.errors import ConfigError
from gateway.upstream import certificates
from gateway.upstream.certificates import UpstreamCertificate, make_certificate
from gateway.upstream.connect import host_key_algorithms

NOW = 1_800_000_000
FINGERPRINT = "SHA256:q0Bf4yQn2qkB8C3Ck0aC5ZLs5h1q2Ka7m3tW0x1Ykq4"


@pytest.fixture(scope="module")
def ca() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture(scope="module")
def upstream_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def issue(ca: asyncssh.SSHKey, key: asyncssh.SSHKey, **kw: object) -> UpstreamCertificate:
    args: dict[str, object] = {
        "login_user": "dev",
        "key_fingerprint": FINGERPRINT,
        "org_slug": "acme",
        "conn_id": "0a1b2c3d4e5f",
        "now": NOW,
    }
    args.update(kw)
    return make_certificate(ca, key, **args)  # type: ignore[arg-type]


def keygen_listing(cert: UpstreamCertificate, tmp_path: Path) -> dict[str, object]:
    """What OpenSSH reads in the certificate (``ssh-keygen -L``), times in UTC."""
    path = tmp_path / f"c-{cert.serial}-cert.pub"
    cert.certificate.write_certificate(str(path))
    out = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TZ": "UTC"},
    ).stdout
    valid = re.search(r"Valid: from (\S+) to (\S+)", out)
    assert valid is not None, out

    def epoch(text: str) -> int:
        return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp())

    section = ""
    lists: dict[str, list[str]] = {"Principals": [], "Critical Options": [], "Extensions": []}
    for line in out.splitlines():
        head = line.strip().split(":", 1)[0]
        if head in lists:
            section = head
        elif section and line.startswith("                "):
            lists[section].append(line.strip())
        else:
            section = ""
    key_id = re.search(r'Key ID: "(.*)"', out)
    serial = re.search(r"Serial: (\d+)", out)
    signing = re.search(r"Signing CA: .*\(using (\S+)\)", out)
    assert key_id and serial and signing, out
    return {
        "type": "user certificate" in out,
        "valid_after": epoch(valid.group(1)),
        "valid_before": epoch(valid.group(2)),
        "key_id": key_id.group(1),
        "serial": int(serial.group(1)),
        "sig_alg": signing.group(1),
        **{name.lower(): values for name, values in lists.items()},
    }


# --- what a certificate says ---


def test_a_certificate_is_valid_from_30_s_ago_for_the_lifetime(
    ca: asyncssh.SSHKey, upstream_key: asyncssh.SSHKey, tmp_path: Path
) -> None:
    cert = issue(ca, upstream_key, lifetime_seconds=300)
    seen = keygen_listing(cert, tmp_path)
    assert seen["type"] is True
    assert (seen["valid_after"], seen["valid_before"]) == (NOW - 30, NOW + 300)
    assert (cert.valid_after, cert.valid_before) == (NOW - 30, NOW + 300)
    short = keygen_listing(issue(ca, upstream_key, lifetime_seconds=45), tmp_path)
    assert short["valid_before"] == NOW + 45


def test_the_principal_is_the_sandbox_login_user_only(
    ca: asyncssh.SSHKey, upstream_key: asyncssh.SSHKey, tmp_path: Path
) -> None:
    cert = issue(ca, upstream_key, login_user="rtsandbox", now=None)
    assert keygen_listing(cert, tmp_path)["principals"] == ["rtsandbox"]
    cert.certificate.validate(asyncssh.public_key.CERT_TYPE_USER, "rtsandbox")  # valid now
    with pytest.raises(ValueError, match="principal"):
        cert.certificate.validate(asyncssh.public_key.CERT_TYPE_USER, "root")
    with pytest.raises(ValueError, match="principal"):
        issue(ca, upstream_key, login_user="")


def test_the_key_id_names_the_connection_the_org_and_the_user_key(
    ca: asyncssh.SSHKey, upstream_key: asyncssh.SSHKey, tmp_path: Path
) -> None:
    cert = issue(ca, upstream_key)
    expected = f"runtools-gateway conn=0a1b2c3d4e5f org=acme key={FINGERPRINT}"
    assert cert.key_id == expected
    assert keygen_listing(cert, tmp_path)["key_id"] == expected


def test_the_key_id_escapes_anything_but_plain_tokens() -> None:
    text = certificates.key_id(
        conn_id="c 1", org_slug='a"b\nc=d', key_fingerprint="SHA256:x\x1b[31m\u00e9"
    )
    assert text == "runtools-gateway conn=c%201 org=a%22b%0Ac=d key=SHA256:x%1B%5B31m%C3%A9"
    assert text.isprintable()
    long = certificates.key_id(conn_id="x" * 1000, org_slug="", key_fingerprint="k")
    assert len(long) < 200 and "org=- " in long


def test_each_certificate_has_its_own_random_nonzero_serial(
    ca: asyncssh.SSHKey, upstream_key: asyncssh.SSHKey, tmp_path: Path
) -> None:
    serials = {issue(ca, upstream_key).serial for _ in range(20)}
    assert len(serials) == 20
    assert all(0 < s < 2**64 for s in serials)
    cert = issue(ca, upstream_key)
    assert keygen_listing(cert, tmp_path)["serial"] == cert.serial


def test_extensions_are_pty_port_and_agent_forwarding_only(
    ca: asyncssh.SSHKey, upstream_key: asyncssh.SSHKey, tmp_path: Path
) -> None:
    seen = keygen_listing(issue(ca, upstream_key), tmp_path)
    assert seen["extensions"] == [
        "permit-agent-forwarding",
        "permit-port-forwarding",
        "permit-pty",
    ]
    assert seen["critical options"] == ["(none)"] or seen["critical options"] == []


def test_the_lifetime_is_capped_at_5_minutes(
    ca: asyncssh.SSHKey, upstream_key: asyncssh.SSHKey
) -> None:
    for lifetime in (301, 3600, 29, 0, -5):
        with pytest.raises(ValueError, match=r"30\.\.300"):
            issue(ca, upstream_key, lifetime_seconds=lifetime)
    assert issue(ca, upstream_key, lifetime_seconds=30).valid_before == NOW + 30


def test_an_rsa_ca_signs_with_sha2_512(upstream_key: asyncssh.SSHKey, tmp_path: Path) -> None:
    rsa_ca = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    assert keygen_listing(issue(rsa_ca, upstream_key), tmp_path)["sig_alg"] == "rsa-sha2-512"
    ed_ca = asyncssh.generate_private_key("ssh-ed25519")
    assert keygen_listing(issue(ed_ca, upstream_key), tmp_path)["sig_alg"] == "ssh-ed25519"


# --- config ---


@pytest.mark.parametrize("value", ["29", "301", "0", "86400"])
def test_a_lifetime_outside_30_to_300_is_refused_at_config_load(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.load(env={"RTGW_UPSTREAM_CERTIFICATE_LIFETIME_SECONDS": value})
    assert err.value.key == "upstream.certificate_lifetime_seconds"
    assert "between 30 and 300 seconds" in str(err.value)


def test_the_settings_default_to_off_with_a_5_minute_lifetime() -> None:
    up = Config.load(env={}).upstream
    assert (up.ca_key_file, up.certificate_lifetime_seconds, up.host_ca_keys_file) == ("", 300, "")
    assert (
        certificates.issue(
            up,
            asyncssh.generate_private_key("ssh-ed25519"),
            login_user="u",
            key_fingerprint="k",
            org_slug="o",
            conn_id="c",
        )
        is None
    )
    assert certificates.host_ca_keys(up) == ()


# --- key files ---


def test_generate_makes_an_owner_only_key_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "upstream_ca"
    key = certificates.generate_ca_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "upstream_ca.pub").read_text().split()[:2] == certificates.public_line(
        key
    ).split()[:2]
    assert certificates.read_ca_key(path).public_data == key.public_data
    with pytest.raises(FileExistsError):
        certificates.generate_ca_key(path)


def test_a_ca_key_others_can_read_or_that_is_no_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ca"
    certificates.generate_ca_key(path)
    path.chmod(0o640)
    with pytest.raises(certificates.CaKeyError, match="chmod 600"):
        certificates.read_ca_key(path)
    with pytest.raises(certificates.CaKeyError, match="cannot read"):
        certificates.read_ca_key(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    with pytest.raises(certificates.CaKeyError, match="not an unencrypted OpenSSH private key"):
        certificates.read_ca_key(junk)
    small = tmp_path / "small"
    small.write_bytes(
        asyncssh.generate_private_key("ssh-rsa", key_size=1024).export_private_key("openssh")
    )
    small.chmod(0o600)
    with pytest.raises(certificates.CaKeyError, match="2048"):
        certificates.read_ca_key(small)


def test_host_ca_keys_are_public_key_lines(tmp_path: Path) -> None:
    a, b = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    path = tmp_path / "host_cas"
    path.write_text(
        f"# our host CAs\n\n{certificates.public_line(a)}\n{certificates.public_line(b)} two\n"
    )
    keys = certificates.read_host_ca_keys(path)
    assert [k.public_data for k in keys] == [a.public_data, b.public_data]
    path.write_text(f"@cert-authority * {certificates.public_line(a)}\n")
    with pytest.raises(certificates.CaKeyError, match=r":1: write the CA's public key line alone"):
        certificates.read_host_ca_keys(path)
    path.write_text("# nothing\n")
    with pytest.raises(certificates.CaKeyError, match="holds no public key"):
        certificates.read_host_ca_keys(path)
    path.write_text(f"{certificates.public_line(a)}\nssh-ed25519 garbage\n")
    with pytest.raises(certificates.CaKeyError, match=":2: not a public key line"):
        certificates.read_host_ca_keys(path)


def test_load_names_the_setting_and_keeps_what_it_had(tmp_path: Path) -> None:
    good = tmp_path / "ca"
    key = certificates.generate_ca_key(good)
    config = UpstreamConfig(ca_key_file=str(good))
    certificates.load(config)
    assert certificates.ca_key(config) is not None
    with pytest.raises(ConfigError) as err:
        certificates.load(UpstreamConfig(ca_key_file=str(good), host_ca_keys_file="/nonexistent"))
    assert err.value.key == "upstream.host_ca_keys_file"
    with pytest.raises(ConfigError) as err:
        certificates.load(UpstreamConfig(ca_key_file=str(tmp_path / "gone")))
    assert err.value.key == "upstream.ca_key_file"
    loaded = certificates.ca_key(config)
    assert loaded is not None and loaded.public_data == key.public_data
    # What was read is used until the next load (reload), even if the file changes meanwhile.
    good.unlink()
    cert = certificates.issue(
        config, key, login_user="dev", key_fingerprint="k", org_slug="o", conn_id="c"
    )
    assert cert is not None
    certificates.load(UpstreamConfig())


def test_host_key_algorithms_put_certificates_first_without_sha1() -> None:
    pin = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    ca_key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    assert host_key_algorithms([pin], ()) is None  # asyncssh's own choice: the pins'
    algs = host_key_algorithms([pin], (ca_key,))
    assert algs is not None
    assert algs.index("ssh-ed25519-cert-v01@openssh.com") < algs.index("ssh-ed25519")
    assert "ssh-rsa-cert-v01@openssh.com" not in algs


# --- runtools-gateway upstream-ca ---


def test_cli_generates_then_prints_the_line_and_the_sshd_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "upstream_ca"
    assert cli.main(["upstream-ca", "--generate", str(path)]) == 0
    out, err = capsys.readouterr()
    line = out.strip()
    assert line.startswith("ssh-ed25519 ") and "upstream.ca_key_file" in err
    assert path.stat().st_mode & 0o777 == 0o600
    assert cli.main(["upstream-ca", "--generate", str(path)]) == 1
    assert "exists" in capsys.readouterr().err

    monkeypatch.setenv("RTGW_UPSTREAM_CA_KEY_FILE", str(path))
    assert cli.main(["upstream-ca"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == line
    assert "TrustedUserCAKeys /etc/ssh/runtools-gateway-user-ca.pub" in err
    assert "LogLevel VERBOSE" in err
    assert cli.main(["upstream-ca", "--sshd-config"]) == 0
    out, _ = capsys.readouterr()
    assert "TrustedUserCAKeys " in out and "ssh-ed25519" not in out

    monkeypatch.setenv("RTGW_UPSTREAM_CA_KEY_FILE", "")
    assert cli.main(["upstream-ca"]) == 1
    assert "upstream-ca --generate PATH" in capsys.readouterr().err
