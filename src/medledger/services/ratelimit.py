"""Failure budgets: how many failures one client or member may cause, and how fast.

A :class:`RateLimiter` keeps one budget per key (a client address, a token id,
a member id). A budget is a token bucket of ``burst`` units that refills one
unit every ``interval_ms``, kept as GCRA (the generic cell rate algorithm)
does: a single "theoretical arrival time" per key, so a key costs one integer
and a key whose bucket is full again is the same as no key at all::

    spend at now:  tat = max(stored, now)
                   tat - now > (burst - 1) * interval   -> refused, wait the excess
                   otherwise                           -> allowed, stored = tat + interval

Time comes from the injected :class:`~medledger.ledger.clock.Clock`, so tests
move time instead of sleeping. Memory is bounded: at most ``max_keys`` keys are
tracked; past that the least recently charged key is forgotten (it may start
again with a full budget, which only matters to an attacker holding more than
``max_keys`` addresses at once).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from medledger.core.errors import InvalidInput
from medledger.ledger.clock import Clock

__all__ = ["RateLimit", "RateLimiter"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """``burst`` failures back to back, then one more every ``interval_ms``."""

    burst: int
    interval_ms: int
    max_keys: int = 10_000

    def __post_init__(self) -> None:
        if self.burst < 1 or self.interval_ms < 1 or self.max_keys < 1:
            raise InvalidInput("a rate limit needs burst, interval_ms and max_keys of at least 1")


class RateLimiter:
    """Per-key failure budgets (see module docstring). Not thread-safe: one event loop."""

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self.limit = limit
        self._clock = clock
        self._tolerance_ms = (limit.burst - 1) * limit.interval_ms
        self._tat: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are tracked now (at most ``limit.max_keys``)."""
        return len(self._tat)

    def wait_ms(self, key: str) -> int:
        """0 if ``key`` has budget left now, else the milliseconds until it has (spends nothing)."""
        now = self._clock.now_ms()
        tat = max(self._tat.get(key, now), now)
        return max(0, tat - now - self._tolerance_ms)

    def spend(self, key: str) -> int:
        """Take one unit of ``key``'s budget: 0 if it had one, else the wait (nothing taken)."""
        now = self._clock.now_ms()
        tat = max(self._tat.get(key, now), now)
        excess = tat - now - self._tolerance_ms
        if key in self._tat:
            # A key that keeps failing stays tracked; quiet keys are the ones forgotten.
            self._tat.move_to_end(key)
        if excess > 0:
            return excess
        if key not in self._tat:
            while len(self._tat) >= self.limit.max_keys:
                self._tat.popitem(last=False)
        self._tat[key] = tat + self.limit.interval_ms
        return 0
