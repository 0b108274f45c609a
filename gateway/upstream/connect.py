"""Connections from the gateway to a sandbox's own sshd.

The sandbox's host key must be one of the keys pinned in its sandboxes row; anything else is
refused (and logged loudly by the caller). The gateway logs in with its own upstream identity,
whose public line ``runtools-gateway upstream-key`` prints for sandbox images to trust.
"""

from __future__ import annotations

import asyncio

import asyncssh

from gateway import messages
from gateway.config import UpstreamConfig
from gateway.errors import UpstreamError
from gateway.ssh import algorithms
from gateway.upstream.target import Target


def pinned_keys(lines: tuple[str, ...]) -> list[asyncssh.SSHKey]:
    keys = []
    for line in lines:
        try:
            keys.append(asyncssh.import_public_key(line))
        except (asyncssh.KeyImportError, ValueError):
            continue  # a broken pin can never match; the connection then fails closed
    return keys


async def connect(
    target: Target,
    *,
    client_key: asyncssh.SSHKey,
    config: UpstreamConfig,
    agent_path: str | None = None,
) -> asyncssh.SSHClientConnection:
    """Open an authenticated connection, or raise UpstreamError with a reason code.

    With ``agent_path`` (dedicated connections only, gateway/upstream/dedicated.py) the
    sandbox's agent requests are forwarded to that socket: the client's own agent.

    A pooled connection is shared by many users' sessions (gateway/upstream/pool.py), so the error
    carries a reason code and technical detail only: the user's text is rendered from
    gateway/messages.py at the edge, by the session that failed (gateway/ssh/channels.py).
    """
    trusted = pinned_keys(target.host_keys)
    try:
        return await asyncio.wait_for(
            asyncssh.connect(
                target.host,
                target.port,
                username=target.user,
                client_keys=[client_key],
                known_hosts=(trusted, [], []),
                agent_path=None,
                agent_forwarding=agent_path or False,
                preferred_auth="publickey",
                password=None,
                kbdint_auth=False,
                connect_timeout=config.connect_timeout_seconds,
                keepalive_interval=config.keepalive_interval_seconds,
                keepalive_count_max=config.keepalive_count_max,
                config=None,
                **algorithms.common_options(),  # type: ignore[arg-type]
            ),
            timeout=config.connect_timeout_seconds,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise UpstreamError(messages.UPSTREAM_HOST_KEY_MISMATCH.code, str(exc)) from exc
    except asyncssh.PermissionDenied as exc:
        raise UpstreamError(messages.UPSTREAM_AUTH_FAILED.code, str(exc)) from exc
    except TimeoutError as exc:
        seconds = config.connect_timeout_seconds
        raise UpstreamError(
            messages.UPSTREAM_UNREACHABLE.code, f"no answer within {seconds:g} s"
        ) from exc
    except ConnectionRefusedError as exc:
        raise UpstreamError(
            messages.UPSTREAM_UNREACHABLE.code, "its SSH port refused the connection"
        ) from exc
    except (OSError, asyncssh.Error) as exc:
        # Said as it happened (not "did not answer"); addresses stay out of the user's text.
        text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise UpstreamError(
            messages.UPSTREAM_UNREACHABLE.code, str(text) or type(exc).__name__
        ) from exc
