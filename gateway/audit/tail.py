"""``runtools-gateway audit tail [--org SLUG] [--follow] [-n N] [--json]``.

Prints the newest audit events, oldest first, one line each (or one JSON object per line with
``--json``); ``--follow`` keeps polling for new ones until interrupted. Reason codes are the ones
in gateway/messages.py.

Rows hold client-supplied strings (subsystem names, login names, ...). Written before the gateway
escaped them, or by something else, they are escaped again here: a control character prints as
``\\xNN``, never raw, and a value with a space, ``=`` or ``"`` is quoted, so one event is always
one line and a value cannot pose as another field or another event.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from typing import Any

from gateway.config import Config
from keystore import audit_events, orgs
from keystore import db as keystore_db
from keystore.printable import escape


def format_event(event: dict[str, Any]) -> str:
    when = event["occurred_at"]
    if isinstance(when, dt.datetime):
        when = when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    raw = event.get("details") or {}
    details = dict(json.loads(raw) if isinstance(raw, str) else raw)
    parts = [
        _value(when),
        _value(event["action"]),
        _value(event["result"]),
        f"reason={_value(event['reason'])}" if event.get("reason") else "",
        f"from={_value(event['source_ip'])}" if event.get("source_ip") else "",
        f"org={_value(details.pop('org'))}" if details.get("org") else "",
        f"target={_value(event['target'])}" if event.get("target") else "",
        f"actor={_value(event['actor'])}" if event.get("actor") else "",
    ]
    parts += [f"{_value(k)}={_value(v)}" for k, v in details.items() if v is not None]
    return " ".join(p for p in parts if p)


def _value(value: Any) -> str:
    """One value on the line: control characters escaped, quoted when it has a space, ``=``
    or ``"`` in it (or is empty)."""
    text = escape(value if isinstance(value, str) else str(value))
    if not text or any(c.isspace() or c in '="' for c in text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _jsonable(event: dict[str, Any]) -> str:
    out = dict(event)
    if isinstance(out.get("details"), str):
        out["details"] = json.loads(out["details"])
    return json.dumps(out, default=str, sort_keys=True)


async def tail(
    config: Config,
    *,
    org_slug: str | None,
    follow: bool,
    lines: int,
    as_json: bool,
    poll_seconds: float = 1.0,
) -> int:
    async with keystore_db.connect(config.database.url) as conn:
        org_id = (await orgs.get_org(conn, org_slug)).id if org_slug else None
        after = 0
        limit = lines
        while True:
            events = await audit_events.recent(conn, org_id=org_id, after_id=after, limit=limit)
            for event in events:
                print(_jsonable(event) if as_json else format_event(event), flush=True)
                after = max(after, int(event["id"]))
            if not follow:
                return 0
            if after == 0:
                after = await _max_id(conn)
            limit = 1000
            await asyncio.sleep(poll_seconds)


async def _max_id(conn: Any) -> int:
    with keystore_db.unavailable_on_failure("reading audit events"):
        value = await conn.fetchval("SELECT coalesce(max(id), 0) FROM audit_events")
    return int(value)


def add_parser(sub: Any, func: Any) -> None:
    parent = sub.add_parser("audit", help="the audit trail")
    audit = parent.add_subparsers(dest="sub", required=True)
    p: argparse.ArgumentParser = audit.add_parser(
        "tail", help="print recent audit events", description="print recent audit events"
    )
    p.set_defaults(func=func)
    p.add_argument("--org", help="only this organization's events (slug)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("-n", "--lines", type=int, default=20, help="how many recent events (20)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
