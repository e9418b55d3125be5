"""The consortium block-time rule (``core.consortium.block_time``): pure arithmetic."""

from __future__ import annotations

import pytest

from medledger.core.consortium import block_time, block_time_bound
from medledger.core.errors import InvalidInput

NOW = 1_700_000_000_000
SKEW = 30_000
MONTH = 31 * 24 * 3600 * 1000


@pytest.mark.parametrize("fast", [NOW + 300_000, NOW + MONTH])
def test_a_fast_minority_does_not_move_the_time(fast: int) -> None:
    assert block_time(NOW - 5, [NOW, fast, NOW - 1], [NOW], SKEW) == NOW  # the median
    # Two members: the lower median is the slower clock, never the fast one.
    assert block_time(NOW - 5, [fast, NOW], [NOW], SKEW) == NOW
    # Four members, one fast: still an honest reading.
    assert block_time(NOW - 5, [NOW - 2, fast, NOW - 1, NOW], [NOW], SKEW) == NOW - 1


def test_a_fast_majority_is_capped_by_the_transactions_times() -> None:
    fast = NOW + MONTH
    assert block_time(NOW - 5, [fast, fast, NOW], [NOW - 10, NOW], SKEW) == NOW + SKEW
    assert block_time_bound(NOW - 5, [NOW - 10, NOW], SKEW) == NOW + SKEW


def test_time_never_goes_back() -> None:
    prev = NOW + 1000
    assert block_time(prev, [NOW, NOW, NOW], [NOW], SKEW) == prev
    # Old transactions (or none) do not pull the bound below the previous block.
    assert block_time_bound(prev, [NOW - MONTH], SKEW) == prev


def test_a_block_needs_a_reading() -> None:
    with pytest.raises(InvalidInput):
        block_time(NOW, [], [NOW], SKEW)
