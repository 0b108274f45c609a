"""Schemathesis against the live key API and the OpenAPI document it serves.

The API runs on loopback in a thread of its own (with its own event loop and pool) while the
schemathesis CLI runs as a subprocess: its examples, coverage and fuzzing phases, valid and
invalid data, every check. Every generated request must get a response that the served
document describes (status, content type, headers, body schema), and none may be a 5xx.
(The CLI rather than schemathesis' pytest plugin: the plugin's lazy-fixture loader breaks on
pytest 9.2; the CLI is its stable, public interface.)

It runs twice: authenticated with API keys, and as a member signed in through WorkOS (a
session token from a JWKS served on loopback, the owner role), with the webhook configured.

Not run: ``positive_data_acceptance``. It expects every schema-valid request to succeed, but
"a string of 1-16384 characters" is all a JSON schema can say about an SSH public key, so
generated keys are rightly refused with 400 (and generated ids of existing keys are 404).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from keystore import db as keystore_db
from keystore import orgs
from keystore.api import ApiServer, serve_api
from keystore.api.app import ROUTES
from keystore.audit_events import AuditEvent
from tests.integration.api.support import make_org, public_line
from tests.integration.api.workos_support import (
    ISSUER,
    WEBHOOK_SECRET,
    Issuer,
    JwksServer,
    SigningKey,
    user_id,
    workos_org_id,
)

# Bounded so the file runs in well under a minute; RTGW_FUZZ_EXAMPLES=500 for a deeper hunt.
MAX_EXAMPLES = int(os.environ.get("RTGW_FUZZ_EXAMPLES", "50"))


class LiveApi:
    """serve_api in a background thread, for an org with a few keys of every kind.

    ``member``: WorkOS sessions and webhooks are configured, and the fuzzer authenticates as
    an owner of the org with a session token instead of an API key.
    """

    def __init__(self, database_url: str, *, member: bool = False) -> None:
        self.database_url = database_url
        self.member = member
        self.jwks: JwksServer | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ApiServer | None = None
        self.pool: Any = None
        self.events: list[AuditEvent] = []
        self.minted = 0
        self.org: Any = None

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def start(self) -> LiveApi:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    async def _start(self) -> None:
        self.pool = await keystore_db.create_pool(self.database_url, min_size=1, max_size=4)
        org = await make_org(self.pool, "fuzz")
        await orgs.create_project(self.pool, org.id, "backend", "Backend")
        workos: dict[str, Any] = {}
        issuer: Issuer | None = None
        if self.member:
            key = SigningKey.rsa()
            self.jwks = JwksServer([key]).start()
            issuer = Issuer(key)
            mapped = workos_org_id()
            await orgs.set_workos_org_id(self.pool, org.slug, mapped)
            workos = {
                "workos_jwks_url": self.jwks.url,
                "workos_issuer": ISSUER,
                "workos_webhook_secret": WEBHOOK_SECRET,
            }
        for i in range(3):
            await org.api_key(["ssh-key:read"], name=f"reader-{i}")
        self.org = org

        async def mint(request: web.Request) -> web.Response:
            # Test only (an extra route, not in the document): the fuzzer learns API key ids
            # from GET /v1/api-keys and may revoke or rotate its own key, so it fetches a fresh
            # one whenever it gets a 401 (schemathesis dynamic auth).
            if issuer is not None:
                token = issuer.token(user_id(), mapped, role="owner")
            else:
                token, _ = await org.api_key(["*"], name="fuzzer")
            self.minted += 1
            return web.json_response({"token": token})

        self.server = await serve_api(
            self.pool,
            host="127.0.0.1",
            port=0,
            max_body_bytes=65536,
            record_audit=self.events.append,
            extra_routes=[web.post("/test-only/token", mint)],
            rate_per_second=10_000.0,
            rate_burst=10_000,
            invalid_key_burst=10_000,
            **workos,
        )
        # A few registered keys, so list/get/patch/delete meet real rows too.
        from keystore import keys as keyparse
        from keystore import ssh_keys

        project = await orgs.get_project(self.pool, org.id, None)
        for i in range(3):
            await ssh_keys.add_key(
                self.pool,
                org_id=org.id,
                project_id=project.id,
                key=keyparse.parse_public_key(public_line(f"seed{i}@fuzz")),
                name=f"seed {i}",
            )

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                await self.server.close()
            if self.pool is not None:
                await self.pool.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        if self.jwks is not None:
            self.jwks.stop()


@pytest.fixture(scope="module")
def live_api(database_url: str) -> Iterator[LiveApi]:
    api = LiveApi(database_url).start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def live_member_api(database_url: str) -> Iterator[LiveApi]:
    api = LiveApi(database_url, member=True).start()
    yield api
    api.stop()


# Every operation of the document but GET /v1/openapi.json: the routes with a scope, and the
# WorkOS webhook.
OPERATIONS = len(ROUTES) + 1

# Checks: all of them but positive_data_acceptance (see the module docstring). 413 (a body
# over the configured limit) is a rejection of invalid data too.
_CONFIG = """
[auth.dynamic.openapi.{scheme}]
path = "/test-only/token"
method = "post"
extract_selector = "/token"

[checks.positive_data_acceptance]
enabled = false

[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
"""


def run_schemathesis(live_api: LiveApi, tmp_path: Path, scheme: str) -> str:
    """The schemathesis CLI, as a person would run it: every phase but stateful, valid and
    invalid data, every check; its exit status is the verdict and its report the evidence.
    Fails unless every operation was exercised, authenticated, and nothing was found."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(_CONFIG.replace("{scheme}", scheme))
    cli = Path(sys.executable).parent / "schemathesis"
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "schemathesis.cli"]
    result = subprocess.run(
        [
            *command,
            "--config-file",
            str(config),
            "--no-color",
            "run",
            f"{live_api.base}/v1/openapi.json",
            "--phases",
            "examples,coverage,fuzzing",
            "--mode",
            "all",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20000:]
    # It really exercised every operation, authenticated, and found nothing.
    assert f"{OPERATIONS} selected / {OPERATIONS} total" in report, report[-5000:]
    assert f"Tested: {OPERATIONS}" in report, report[-5000:]
    assert "Authentication failed" not in report, report[-5000:]
    assert " failed" not in report.split("SUMMARY")[-1], report[-5000:]
    assert live_api.minted >= 1
    return report


def test_every_generated_request_gets_a_documented_answer_and_never_a_5xx(
    live_api: LiveApi, tmp_path: Path
) -> None:
    run_schemathesis(live_api, tmp_path, "bearer")
    # Mutations really happened (and each was audited with its actor).
    assert any(e.action == "api.ssh_key.create" and e.result == "ok" for e in live_api.events)
    assert all(e.actor for e in live_api.events if e.result == "ok")


def test_a_member_signed_in_through_workos_gets_documented_answers_too(
    live_member_api: LiveApi, tmp_path: Path
) -> None:
    """The same run with a member's session token (owner), the webhook configured: the audit
    API, the webhook's refusals and every other operation answer as documented."""
    run_schemathesis(live_member_api, tmp_path, "workosSession")
    events = live_member_api.events
    assert any(e.action == "api.ssh_key.create" and e.result == "ok" for e in events)
    members = [e for e in events if e.result == "ok" and e.action.startswith("api.")]
    assert members and all(e.details.get("actor_type") == "member" for e in members)
    assert all(e.actor and e.actor.startswith("user_") for e in members)
