"""Connections from the gateway to a sandbox's own sshd.

The sandbox's host key must be one of the keys pinned in its sandboxes row, or come in a host
certificate signed by a CA of ``upstream.host_ca_keys_file`` (known_hosts ``@cert-authority``);
anything else is refused (and logged loudly by the caller). The gateway logs in with its own
upstream identity, whose public line ``runtools-gateway upstream-key`` prints for sandbox
images to trust; a dedicated connection may add a user certificate for it
(gateway/upstream/certificates.py), tried first.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
from asyncssh.public_key import SSHOpenSSHCertificate

from gateway import messages
from gateway.config import UpstreamConfig
from gateway.errors import UpstreamError
from gateway.ssh import algorithms
from gateway.upstream import certificates
from gateway.upstream.target import Target


def pinned_keys(lines: tuple[str, ...]) -> list[asyncssh.SSHKey]:
    keys = []
    for line in lines:
        try:
            keys.append(asyncssh.import_public_key(line))
        except (asyncssh.KeyImportError, ValueError):
            continue  # a broken pin can never match; the connection then fails closed
    return keys


def host_key_algorithms(
    pinned: list[asyncssh.SSHKey], cas: tuple[asyncssh.SSHKey, ...]
) -> list[str] | None:
    """With host CAs: certificate algorithms first (SHA-1 ``ssh-rsa-cert`` left out), then
    those of the pinned keys, as asyncssh would order them. None: asyncssh's own choice
    (the pinned keys' algorithms)."""
    if not cas:
        return None
    algs = [
        alg.decode()
        for alg in asyncssh.public_key.get_default_certificate_algs()
        if alg not in algorithms.SHA1_SIGNATURES
    ]
    for key in pinned:
        algs += [alg.decode() for alg in key.sig_algorithms if alg.decode() not in algs]
    return algs


class _HostCaWitness(asyncssh.SSHClient):
    """Notes a host certificate signed by a CA we do not trust (asyncssh asks only then)."""

    def __init__(self) -> None:
        self.untrusted_ca = False

    def validate_host_ca_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.untrusted_ca = True
        return False


async def connect(
    target: Target,
    *,
    client_key: asyncssh.SSHKey,
    config: UpstreamConfig,
    agent_path: str | None = None,
    certificate: SSHOpenSSHCertificate | None = None,
) -> asyncssh.SSHClientConnection:
    """Open an authenticated connection, or raise UpstreamError with a reason code.

    With ``agent_path`` (dedicated connections only, gateway/upstream/dedicated.py) the
    sandbox's agent requests are forwarded to that socket: the client's own agent. With
    ``certificate`` (a user certificate for ``client_key``, dedicated connections only) the
    key is offered with it first, then alone.

    A host certificate signed by a CA we do not trust fails like any unknown host key, unless
    the sandbox has pinned keys: then its plain key is checked against them on a second
    connection (OpenSSH falls back to the plain key the same way).

    A pooled connection is shared by many users' sessions (gateway/upstream/pool.py), so the error
    carries a reason code and technical detail only: the user's text is rendered from
    gateway/messages.py at the edge, by the session that failed (gateway/ssh/channels.py).
    """
    trusted = pinned_keys(target.host_keys)
    try:
        cas = certificates.host_ca_keys(config)
    except certificates.CaKeyError as exc:  # only when the daemon did not load it at start
        raise UpstreamError(messages.UPSTREAM_HOST_KEY_MISMATCH.code, str(exc)) from exc
    client_keys: list[Any] = [client_key if certificate is None else (client_key, certificate)]
    witness = _HostCaWitness()
    try:
        try:
            return await _open(
                target, client_keys, trusted, cas, config, agent_path, lambda: witness
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            if not (cas and trusted and witness.untrusted_ca):
                raise
            try:
                return await _open(target, client_keys, trusted, (), config, agent_path, None)
            except asyncssh.HostKeyNotVerifiable as again:
                raise asyncssh.HostKeyNotVerifiable(
                    f"{exc.reason}; its plain host key is not pinned either"
                ) from again
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


async def _open(
    target: Target,
    client_keys: list[Any],
    trusted: list[asyncssh.SSHKey],
    cas: tuple[asyncssh.SSHKey, ...],
    config: UpstreamConfig,
    agent_path: str | None,
    client_factory: Any,
) -> asyncssh.SSHClientConnection:
    host_key_algs = host_key_algorithms(trusted, cas)
    extra: dict[str, Any] = {}
    if host_key_algs is not None:
        extra["server_host_key_algs"] = host_key_algs
    if client_factory is not None:
        extra["client_factory"] = client_factory
    return await asyncio.wait_for(
        asyncssh.connect(
            target.host,
            target.port,
            username=target.user,
            client_keys=client_keys,
            known_hosts=(trusted, list(cas), []),
            agent_path=None,
            agent_forwarding=agent_path or False,
            preferred_auth="publickey",
            password=None,
            kbdint_auth=False,
            connect_timeout=config.connect_timeout_seconds,
            keepalive_interval=config.keepalive_interval_seconds,
            keepalive_count_max=config.keepalive_count_max,
            config=None,
            **extra,
            **algorithms.common_options(),  # type: ignore[arg-type]
        ),
        timeout=config.connect_timeout_seconds,
    )
