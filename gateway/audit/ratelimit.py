"""A per-source budget for audit rows, so one source cannot flood the audit table.

A token bucket per source (``per_minute`` tokens a minute, bursts up to the same number),
in a table of at most ``max_sources`` entries (least recently seen evicted first). What is
not written is counted, and the next row that is written for that source says how many were
suppressed before it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class SourceRateLimit:
    def __init__(
        self,
        per_minute: int,
        *,
        max_sources: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self._max_sources = max_sources
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float, int]] = OrderedDict()
        self.suppressed_total = 0

    def allow(self, source: str) -> tuple[bool, int]:
        """(may write a row now, rows suppressed for this source since the last one written)."""
        now = self._clock()
        tokens, last, suppressed = self._buckets.pop(source, (float(self.per_minute), now, 0))
        tokens = min(float(self.per_minute), tokens + (now - last) * self.per_minute / 60.0)
        if tokens >= 1.0:
            self._remember(source, (tokens - 1.0, now, 0))
            return True, suppressed
        self.suppressed_total += 1
        self._remember(source, (tokens, now, suppressed + 1))
        return False, suppressed + 1

    def _remember(self, source: str, state: tuple[float, float, int]) -> None:
        self._buckets[source] = state
        while len(self._buckets) > self._max_sources:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
