"""The per-process budget for bytes held by relayed channels (``ssh.max_buffered_bytes``).

With back-pressure honoured on both legs (gateway/asyncssh_patches.py,
``pause-writing-reaches-channels``), what a relayed pair of channels can make this process hold
is bounded by its SSH windows, not by what the peers do:

- on each leg, data received but not yet passed on: at most the window the gateway advertised
  on that leg (asyncssh refuses data beyond it; ``window-credit-for-delivered-data`` keeps a
  paused channel at one window);
- on each leg, the channel's send buffer: up to its high-water mark plus the one packet that
  crossed it, before the session is told to pause and the other leg stops reading.

``relay_cost()`` is that sum: 4.2 MiB with asyncssh's defaults (2 MiB windows, 64 KiB high
water, 32 KiB packets). Each session or forwarding channel reserves it when it starts and gives
it back when it ends; one that would take the reserved total past the budget is refused
(``buffer_budget_exhausted``) and counted in ``rtgw_relay_buffer_refusals``. So the budget
divided by the cost is the number of channels one process relays at once: 244 with the
default 1 GiB. Per connection there is also the transport's own buffer (its 64 KiB high-water
mark plus at most ``asyncssh_patches.FLUSH_AT`` queued in one turn), which connection limits
bound, not this budget.
"""

from __future__ import annotations

import weakref

import structlog

from gateway.config import SshConfig
from gateway.daemon import metrics

_log = structlog.get_logger("gateway.relay.budget")

# asyncssh's defaults: the receive window and maximum packet size of a channel
# (asyncssh.connection._DEFAULT_WINDOW/_DEFAULT_MAX_PKTSIZE) and the send buffer's high-water
# mark (SSHChannel.set_write_buffer_limits()).
DEFAULT_WINDOW = 2 * 1024 * 1024
MAX_PACKET = 32 * 1024
SEND_HIGH_WATER = 64 * 1024


def relay_cost(window: int = DEFAULT_WINDOW, upstream_window: int | None = None) -> int:
    """Most bytes one relayed pair of channels holds with these receive windows."""
    if upstream_window is None:
        upstream_window = window
    return window + upstream_window + 2 * (SEND_HIGH_WATER + MAX_PACKET)


class Hold:
    """Bytes reserved for one channel; ``release()`` gives them back (once)."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: BufferBudget, nbytes: int) -> None:
        self._budget: BufferBudget | None = budget
        self.nbytes = nbytes

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.nbytes)

    def tie_to(self, owner: object) -> None:
        """Release the hold when ``owner`` is garbage-collected, if nothing released it."""
        weakref.finalize(owner, self.release)


class BufferBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reserved = 0
        metrics.RELAY_BUFFER_BUDGET.set(limit)

    def reconfigure(self, limit: int) -> None:
        """A new limit (reload): channels already open keep their reservation."""
        self.limit = limit
        metrics.RELAY_BUFFER_BUDGET.set(limit)

    def reserve(self, nbytes: int, kind: str) -> Hold | None:
        """Reserve ``nbytes`` for one channel of ``kind``, or None (counted) when over budget."""
        if self.reserved + nbytes > self.limit:
            metrics.RELAY_BUFFER_REFUSALS.labels(kind).inc()
            _log.warning(
                "relay_buffer_budget_exhausted",
                type=kind,
                reserved=self.reserved,
                wanted=nbytes,
                limit=self.limit,
            )
            return None
        self.reserved += nbytes
        metrics.RELAY_BUFFER_RESERVED.set(self.reserved)
        return Hold(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        self.reserved -= nbytes
        metrics.RELAY_BUFFER_RESERVED.set(self.reserved)


# The process's budget; gateway/ssh/runtime.py configure() sets the configured limit.
BUFFERS = BufferBudget(SshConfig().max_buffered_bytes)
