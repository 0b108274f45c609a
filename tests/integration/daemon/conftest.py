"""Daemon-area fixtures: a real sd_notify socket and gateways that count as started at READY=1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon.support import NotifiedGateway, NotifySocket
from tests.integration.support import GatewayFactory


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


@pytest.fixture
def start_gateway(
    notify: NotifySocket, gateway_factory: GatewayFactory
) -> Callable[..., NotifiedGateway]:
    """``start_gateway(env, **attributes)``: a gateway reporting to ``notify``, on a fresh copy
    of the shared state, started once it sent READY=1 and stopped after the test (before
    ``notify`` closes: this fixture sets the factory up after the socket)."""

    def start(env: dict[str, str] | None = None, **attributes: Any) -> NotifiedGateway:
        return gateway_factory(env, cls=NotifiedGateway, notify=notify, **attributes)

    return start


@pytest.fixture(scope="module")
def module_notify(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path_factory.mktemp("notify"))
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def module_start_gateway(
    module_notify: NotifySocket, module_gateway_factory: GatewayFactory
) -> Callable[..., NotifiedGateway]:
    """The same for module-scoped fixtures: stopped after the module."""

    def start(env: dict[str, str] | None = None, **attributes: Any) -> NotifiedGateway:
        return module_gateway_factory(env, cls=NotifiedGateway, notify=module_notify, **attributes)

    return start
