"""The failure-budget limiter: burst, refill, independent keys, bounded memory.

Time is a clock the test moves by hand: nothing sleeps.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medledger.core.errors import InvalidInput
from medledger.services.ratelimit import RateLimit, RateLimiter


class HandClock:
    """A clock that stands still until the test moves it."""

    def __init__(self, now: int = 1_700_000_000_000) -> None:
        self.now = now

    def now_ms(self) -> int:
        return self.now


def limiter(
    burst: int = 3, interval_ms: int = 1_000, max_keys: int = 100
) -> tuple[RateLimiter, HandClock]:
    clock = HandClock()
    return RateLimiter(
        RateLimit(burst=burst, interval_ms=interval_ms, max_keys=max_keys), clock
    ), clock


def test_a_burst_is_allowed_then_refused_with_the_wait() -> None:
    limits, clock = limiter(burst=3, interval_ms=1_000)
    assert [limits.spend("a") for _ in range(3)] == [0, 0, 0]
    assert limits.spend("a") == 1_000
    clock.now += 400
    assert limits.spend("a") == 600
    assert limits.wait_ms("a") == 600


def test_refused_attempts_take_nothing_and_the_budget_refills_one_per_interval() -> None:
    limits, clock = limiter(burst=3, interval_ms=1_000)
    for _ in range(3):
        limits.spend("a")
    for _ in range(50):  # hammering while refused does not push the wait further out
        assert limits.spend("a") == 1_000
    clock.now += 1_000
    assert limits.spend("a") == 0
    assert limits.spend("a") == 1_000
    clock.now += 10_000  # long quiet: a full burst again, never more
    assert [limits.spend("a") for _ in range(4)] == [0, 0, 0, 1_000]


def test_keys_have_independent_budgets() -> None:
    limits, _ = limiter(burst=2)
    assert limits.spend("attacker") == limits.spend("attacker") == 0
    assert limits.spend("attacker") > 0
    assert limits.wait_ms("client") == 0
    assert limits.spend("client") == 0


def test_memory_is_bounded_and_the_quiet_keys_are_forgotten_first() -> None:
    limits, _ = limiter(burst=1, interval_ms=60_000, max_keys=10)
    limits.spend("busy")
    for i in range(1_000):
        limits.spend(f"k{i}")
        assert limits.spend("busy") > 0  # keeps failing, so it stays tracked
        assert len(limits) <= 10
    assert limits.wait_ms("busy") > 0
    assert limits.wait_ms("k0") == 0  # forgotten: a fresh budget


def test_bad_limits_are_refused() -> None:
    for bad in ({"burst": 0, "interval_ms": 1}, {"burst": 1, "interval_ms": 0}):
        with pytest.raises(InvalidInput):
            RateLimit(**bad)
    with pytest.raises(InvalidInput):
        RateLimit(burst=1, interval_ms=1, max_keys=0)


@given(
    burst=st.integers(1, 20),
    interval=st.integers(1, 5_000),
    steps=st.lists(st.integers(0, 3_000), max_size=60),
)
def test_no_window_admits_more_than_the_budget(burst: int, interval: int, steps: list[int]) -> None:
    """Against a slow reference: at most burst + elapsed/interval spends succeed in any run."""
    limits, clock = limiter(burst=burst, interval_ms=interval)
    start = clock.now
    allowed = 0
    for step in steps:
        clock.now += step
        wait = limits.spend("k")
        assert wait >= 0
        if wait == 0:
            allowed += 1
        assert allowed <= burst + (clock.now - start) // interval
        if wait:  # peeking agrees with the refusal and spends nothing
            assert limits.wait_ms("k") == wait


@given(burst=st.integers(1, 10), interval=st.integers(2, 5_000), extra=st.integers(0, 30))
def test_the_wait_a_refusal_names_is_exact(burst: int, interval: int, extra: int) -> None:
    limits, clock = limiter(burst=burst, interval_ms=interval)
    for _ in range(burst + extra):
        limits.spend("k")
    wait = limits.spend("k")
    assert wait > 0
    clock.now += wait - 1
    assert limits.spend("k") == 1
    clock.now += 1
    assert limits.spend("k") == 0
