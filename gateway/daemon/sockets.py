"""Listening sockets handed to this process: by systemd (LISTEN_FDS) or by our supervisor.

The supervisor (gateway/daemon/supervisor.py) passes its one inherited socket to every worker
through ``RTGW_INHERITED_SSH_FD`` and tells each worker its index in ``RTGW_WORKER_INDEX``; both
the supervisor and the gateway read these names from here, so neither imports the other.
"""

from __future__ import annotations

import os
import socket

import structlog

from gateway.daemon import systemd

log = structlog.get_logger("gateway.daemon.sockets")

WORKER_INDEX_ENV = "RTGW_WORKER_INDEX"
INHERITED_FD_ENV = "RTGW_INHERITED_SSH_FD"


def is_worker() -> bool:
    """True in a worker process started by the supervisor."""
    return WORKER_INDEX_ENV in os.environ


def inherited_listen_socket() -> socket.socket | None:
    """A listening socket from systemd (LISTEN_FDS) or from our supervisor, if any."""
    fds = systemd.listen_fds()
    systemd.forget_listen_env()
    if fds:
        if len(fds) > 1:
            log.warning("extra_listen_fds_ignored", fds=fds[1:])
        return systemd.socket_from_fd(fds[0])
    fd = os.environ.pop(INHERITED_FD_ENV, None)
    if fd is not None:
        return systemd.socket_from_fd(int(fd))
    return None
