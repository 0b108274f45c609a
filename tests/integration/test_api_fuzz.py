"""Schemathesis against the live key API and the OpenAPI document it serves.

The API runs on loopback in a thread of its own (with its own event loop and pool), because
schemathesis calls it synchronously. Every generated request, valid and invalid, must get a
response that the served document describes (status, content type, headers, body schema),
and none may be a 5xx.

Not run: ``positive_data_acceptance``. It expects every schema-valid request to succeed, but
"a string of 1-16384 characters" is all a JSON schema can say about an SSH public key, so
generated keys are rightly refused with 400 (and generated ids of existing keys are 404).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from keystore import db as keystore_db
from keystore import orgs
from keystore.api import ApiServer, serve_api
from keystore.audit_events import AuditEvent
from tests.api_support import make_org, public_line

pytestmark = pytest.mark.integration

# Bounded so the file runs in well under a minute; RTGW_FUZZ_EXAMPLES=500 for a deeper hunt.
MAX_EXAMPLES = int(os.environ.get("RTGW_FUZZ_EXAMPLES", "50"))


class LiveApi:
    """serve_api in a background thread: a token for an org with keys of every kind."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ApiServer | None = None
        self.pool: Any = None
        self.token = ""
        self.events: list[AuditEvent] = []

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
        self.token, _ = await org.api_key(["*"], name="fuzzer")
        for i in range(3):
            await org.api_key(["ssh-key:read"], name=f"reader-{i}")
        self.server = await serve_api(
            self.pool,
            host="127.0.0.1",
            port=0,
            max_body_bytes=65536,
            record_audit=self.events.append,
            rate_per_second=10_000.0,
            rate_burst=10_000,
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


@pytest.fixture(scope="module")
def live_api(database_url: str) -> Iterator[LiveApi]:
    api = LiveApi(database_url).start()
    yield api
    api.stop()


_CONFIG = """
[generation]
mode = "all"

[phases.examples]
enabled = true

[phases.coverage]
enabled = true

[phases.fuzzing]
enabled = true

[phases.stateful]
enabled = false

[checks.positive_data_acceptance]
enabled = false

# 413 (body over the configured limit) is a rejection too.
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
"""


@pytest.fixture(scope="module")
def api_schema(live_api: LiveApi) -> Any:
    config = SchemathesisConfig.from_str(_CONFIG)
    return schemathesis.openapi.from_url(f"{live_api.base}/v1/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_generated_request_gets_a_documented_answer_and_never_a_5xx(
    case: Any, live_api: LiveApi
) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {live_api.token}"})
