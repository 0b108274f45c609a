"""keystore/printable.py, the log processor, the audit writer's and audit tail's escaping,
and the database URL read from a file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.audit.tail import format_event
from gateway.audit.writer import sanitized
from gateway.config import Config
from gateway.daemon.logs import sanitize
from gateway.errors import ConfigError
from keystore.api import guard_aiohttp_logs
from keystore.audit_events import AuditEvent
from keystore.printable import escape, printable, redact, scrub

EVIL = "evil\x1b[2J\norg=acme ssh.auth ok"
KEY = "rt_live_L00kupL00kup" + "S" * 32


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("é ü 中", "é ü 中"),
        (EVIL, "evil\\x1b[2J\\norg=acme ssh.auth ok"),
        ("a\rb\tc\x00\x7f\x9b", "a\\rb\\tc\\x00\\x7f\\x9b"),
        ("abc\u202edcba\u2066\u200b\u2028", "abc\\u202edcba\\u2066\\u200b\\u2028"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_printable_caps_and_counts() -> None:
    assert printable("x" * 300, 10) == "x" * 10 + "...[+290 chars]"
    assert printable("short", 10) == "short"


def test_redact() -> None:
    assert "S" * 32 not in redact(f"Authorization: Bearer {KEY}")
    assert redact(f"b'Bearer {KEY}XXXX'") == "b'Bearer [redacted]'"
    assert redact(KEY) == "rt_live_L00kupL00kup[redacted]"
    assert redact("rt_live_L00kupL00kup") == "rt_live_L00kupL00kup"  # the public prefix stays
    assert redact("x eyJhbGciOi.eyJzdWIi.c2ln y") == "x [redacted jwt] y"
    assert redact("nothing here") == "nothing here"


def test_scrub_nested() -> None:
    assert scrub({"k\n": [EVIL, 1, (KEY,)]}) == {
        "k\\n": ["evil\\x1b[2J\\norg=acme ssh.auth ok", 1, ("rt_live_L00kupL00kup[redacted]",)]
    }


def test_log_processor() -> None:
    out = sanitize(None, "info", {"event": "x", "subsystem": EVIL, "big": "a" * 5000, "n": 3})
    assert out["subsystem"] == "evil\\x1b[2J\\norg=acme ssh.auth ok"
    assert len(out["big"]) < 1100 and out["n"] == 3
    tb = sanitize(None, "error", {"event": "x", "exception": f"Tb\n  line {KEY}\x1b"})
    assert tb["exception"] == "Tb\n  line rt_live_L00kupL00kup[redacted]\\x1b"


def test_audit_writer_sanitizes() -> None:
    event = AuditEvent(action="ssh.session.start", result="ok", target=EVIL, details={"kind": EVIL})
    clean = sanitized(event)
    assert clean.target == clean.details["kind"] == "evil\\x1b[2J\\norg=acme ssh.auth ok"
    plain = AuditEvent(action="a", result="ok", target="sandbox-1", details={"n": 1})
    assert sanitized(plain) is plain


def test_audit_tail_escapes_and_quotes() -> None:
    line = format_event(
        {
            "occurred_at": "2024-01-01T00:00:00Z",
            "action": "ssh.session.start",
            "result": "ok",
            "details": {"org": "acme", "kind": "subsystem:" + EVIL},
        }
    )
    assert "\x1b" not in line and "\n" not in line
    assert line.startswith('2024-01-01T00:00:00Z ssh.session.start ok org=acme kind="')


def test_aiohttp_records_are_redacted() -> None:
    guard_aiohttp_logs()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("aiohttp.server")
    handler = Keep()
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"Invalid HTTP header: b'Authorization: Bearer {KEY}'")
        except ValueError:
            logger.exception("Error handling request from %s", "127.0.0.1")
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert record.exc_info is None and "S" * 32 not in record.getMessage()
    assert record.getMessage().startswith("Error handling request from 127.0.0.1: ValueError")


def test_database_url_file(tmp_path: Path) -> None:
    url = "postgresql://runtools:pw@db:5432/runtools"
    f = tmp_path / "url"
    f.write_text(url + "\n")
    assert Config.load(env={"RTGW_DATABASE_URL_FILE": str(f)}).database.url == url
    creds = tmp_path / "creds"
    creds.mkdir()
    assert Config.load(env={"CREDENTIALS_DIRECTORY": str(creds)}).database.url != url
    (creds / "database-url").write_text(url)
    assert Config.load(env={"CREDENTIALS_DIRECTORY": str(creds)}).database.url == url
    explicit = "postgresql://other@db/x"
    env = {"CREDENTIALS_DIRECTORY": str(creds), "RTGW_DATABASE_URL": explicit}
    assert Config.load(env=env).database.url == explicit
    with pytest.raises(ConfigError, match="RTGW_DATABASE_URL_FILE"):
        Config.load(env={"RTGW_DATABASE_URL_FILE": str(f), "RTGW_DATABASE_URL": explicit})
    with pytest.raises(ConfigError, match="cannot read"):
        Config.load(env={"RTGW_DATABASE_URL_FILE": str(tmp_path / "missing")})


def test_ops_listener_is_loopback_by_default() -> None:
    assert Config.load(env={}).metrics.listen == "127.0.0.1:9122"
    assert Config.load(env={"RTGW_METRICS_LISTEN": ""}).metrics.listen == ""
