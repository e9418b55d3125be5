"""``services.history``: ``_since`` / ``_at`` periods and the versions current during one."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from medledger.core.errors import InvalidInput
from medledger.services.history import current_during, parse_time_range


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "period"),
    [
        ("2026", (ms(2026, 1, 1), ms(2027, 1, 1))),
        ("2026-12", (ms(2026, 12, 1), ms(2027, 1, 1))),
        ("2026-02-28", (ms(2026, 2, 28), ms(2026, 3, 1))),
        ("2026-02-28T10:11:12Z", (ms(2026, 2, 28, 10, 11, 12), ms(2026, 2, 28, 10, 11, 13))),
        ("2026-02-28T10:11:12.345Z", (ms(2026, 2, 28, 10, 11, 12) + 345,) * 1),
        ("2026-02-28T12:11:12+02:00", (ms(2026, 2, 28, 10, 11, 12), ms(2026, 2, 28, 10, 11, 13))),
    ],
)
def test_periods(text: str, period: tuple[int, ...]) -> None:
    start, end = parse_time_range("_since", text)
    assert start == period[0]
    assert end == (period[1] if len(period) > 1 else start + 1)


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2026-13", "2026-02-30", "2026-02-28T10:11:12", "12345", "2026-1-1"]
)
def test_what_is_no_date_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="_at"):
        parse_time_range("_at", text)


def test_current_during_keeps_each_version_for_its_own_span() -> None:
    # Newest first: v3 from 30, v2 from 20 to 30, v1 from 10 to 20.
    versions, updated = ["v3", "v2", "v1"], [30, 20, 10]
    assert current_during(versions, updated, (25, 26)) == ["v2"]
    assert current_during(versions, updated, (20, 21)) == ["v2"]
    assert current_during(versions, updated, (19, 31)) == ["v3", "v2", "v1"]
    assert current_during(versions, updated, (40, 50)) == ["v3"]
    assert current_during(versions, updated, (0, 10)) == []
