"""Metrics scraped and parsed, health endpoints, complete audit rows, ``audit tail``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.lab.process import free_port
from gateway.lab.seed import Tenant, run_db
from gateway.lab.user_keys import make_key
from tests.integration.daemon.support import NotifiedGateway, http_get
from tests.integration.support import REPO, client_for


@pytest.fixture(scope="module")
def observed(module_start_gateway: Callable[..., NotifiedGateway]) -> Iterator[NotifiedGateway]:
    gw = module_start_gateway({"RTGW_METRICS_LISTEN": f"127.0.0.1:{free_port()}"})
    yield gw
    assert gw.stop() == 0


def _http_port(gw: NotifiedGateway) -> int:
    return int(gw.wait_event("listening")["http"])


def _samples(body: bytes) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


def _audit(database_url: str, org_id: Any, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        rows = run_db(
            database_url,
            lambda c: c.fetch(
                "SELECT occurred_at, org_id, action, result, reason, actor, target, "
                "host(source_ip) AS source_ip, details FROM audit_events "
                "WHERE org_id = $1 ORDER BY id",
                org_id,
            ),
        )
        if len(rows) >= n or time.monotonic() > deadline:
            return [dict(r, details=json.loads(r["details"])) for r in rows]
        time.sleep(0.1)


def test_health_endpoints(observed: NotifiedGateway) -> None:
    port = _http_port(observed)
    status, body = http_get(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    status, body = http_get(port, "/readyz")
    assert status == 200, body
    ready = json.loads(body)
    assert ready["checks"] == {
        "database": True,
        "listeners": True,
        "not_draining": True,
        "revocation": True,  # strict mode (the default): the access-change listener is up
    }
    assert ready["revocation"] == {"mode": "strict", "listener": "listening", "healthy": True}


def test_login_refusal_and_session_end_are_audited_and_counted(
    observed: NotifiedGateway, database_url: str, tmp_path: Path, tenant: Tenant
) -> None:
    port = _http_port(observed)
    before = _samples(http_get(port, "/metrics")[1])
    client = client_for(observed, tmp_path)
    stranger = make_key(tmp_path, "stranger")
    refused = client.ssh(stranger, tenant.sandbox_id, "true")
    assert refused.returncode == 255
    r = client.ssh(tenant.key, tenant.sandbox_id, "head -c 1000 /dev/zero; exit 3", input=b"x" * 70)
    assert (r.returncode, len(r.stdout)) == (3, 1000), r.stderr

    rows = _audit(database_url, tenant.org_id, 4)
    by_action: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_action.setdefault(row["action"], []).append(row)
    fingerprint = observed.wait_event("auth_ok")["key"]

    (bad,) = [a for a in by_action["ssh.auth"] if a["result"] == "refused"]
    assert bad["reason"] == "key_not_registered"
    assert bad["target"] == tenant.sandbox_id and bad["source_ip"] == "127.0.0.1"
    assert bad["actor"].startswith("SHA256:") and bad["actor"] != fingerprint
    assert bad["details"]["org"] == tenant.slug and bad["details"]["source_port"] > 0

    good = [a for a in by_action["ssh.auth"] if a["result"] == "ok"]
    assert len(good) == 1 and good[0]["reason"] is None
    assert (good[0]["actor"], good[0]["target"]) == (fingerprint, tenant.sandbox_id)
    assert good[0]["source_ip"] == "127.0.0.1"

    (start,) = by_action["ssh.session.start"]
    assert start["details"]["kind"] == "exec" and start["actor"] == fingerprint
    (end,) = by_action["ssh.session.end"]
    d = end["details"]
    assert end["result"] == "ok" and end["reason"] is None
    assert (end["actor"], end["target"], end["source_ip"]) == (
        fingerprint,
        tenant.sandbox_id,
        "127.0.0.1",
    )
    assert d["session_id"] == start["details"]["session_id"]
    assert (d["kind"], d["exit_status"], d["bytes_up"], d["bytes_down"]) == ("exec", 3, 70, 1000)
    assert 0 < d["duration_seconds"] < 30 and d["org"] == tenant.slug
    assert end["occurred_at"] >= start["occurred_at"]

    after = _samples(http_get(port, "/metrics")[1])

    def grew(name: str, by: float = 1, **labels: str) -> None:
        delta = _value(after, name, **labels) - _value(before, name, **labels)
        assert delta >= by, (name, labels, delta)

    grew("rtgw_auth_total", result="ok", reason="ok")
    grew("rtgw_auth_total", result="refused", reason="key_not_registered")
    grew("rtgw_connections_total", 2, result="accepted")
    grew("rtgw_sessions_total", kind="exec", result="ok")
    grew("rtgw_relayed_bytes_total", 70, direction="up")
    grew("rtgw_relayed_bytes_total", 1000, direction="down")
    grew("rtgw_upstream_connect_seconds_count", result="ok")
    grew("rtgw_auth_decision_seconds_count", 2)
    assert _value(after, "rtgw_db_pool_connections", state="max") == 10
    assert "rtgw_channels_active" in after and "rtgw_connections_open" in after


def test_audit_tail_prints_and_follows(
    observed: NotifiedGateway, database_url: str, tmp_path: Path, tenant: Tenant
) -> None:
    client = client_for(observed, tmp_path)
    assert client.ssh(tenant.key, tenant.sandbox_id, "true").returncode == 0
    _audit(database_url, tenant.org_id, 3)
    env = dict(os.environ, RTGW_DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "gateway", "audit", "tail", "--org", tenant.slug]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[1] for line in lines] == [
        "ssh.auth",
        "ssh.session.start",
        "ssh.session.end",
    ]
    assert f"org={tenant.slug}" in lines[0] and f"target={tenant.sandbox_id}" in lines[0]
    assert "exit_status=0" in lines[2]

    follow = subprocess.Popen(
        [*cmd, "--follow", "--json", "-n", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        time.sleep(1.5)  # let it reach its first poll
        assert client.ssh(tenant.key, tenant.sandbox_id, "exit 4").returncode == 4
        assert follow.stdout is not None
        seen = [json.loads(follow.stdout.readline()) for _ in range(3)]
        assert [e["action"] for e in seen] == ["ssh.auth", "ssh.session.start", "ssh.session.end"]
        assert seen[2]["details"]["exit_status"] == 4
    finally:
        follow.kill()
        follow.wait(5)
