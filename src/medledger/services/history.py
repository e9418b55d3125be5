"""History parameters (FHIR R4 §3.1.0.6): ``_since`` and ``_at`` as time ranges, and ``_at``'s
choice of versions. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from medledger.core.errors import InvalidInput

__all__ = ["TimeRange", "current_during", "parse_time_range"]

#: ``[start, end)`` in milliseconds since the epoch.
TimeRange = tuple[int, int]

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
_INSTANT = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2})$"
)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def parse_time_range(name: str, text: str) -> TimeRange:
    """The period a FHIR ``date``, ``dateTime`` or ``instant`` names, as ``[start, end)`` ms.

    ``2026`` is that whole year (UTC), ``2026-03-01`` that day, and an instant
    the unit of its last given field (a second, a minute). A time needs a zone.
    Raises :class:`InvalidInput` for anything else.
    """
    value = text.strip()
    try:
        partial = _PARTIAL.match(value)
        if partial:
            year, month, day = (int(g) if g else None for g in partial.groups())
            assert year is not None
            start = datetime(year, month or 1, day or 1, tzinfo=UTC)
            if day is not None:
                end = start + timedelta(days=1)
            elif month is not None:
                end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
            else:
                end = datetime(year + 1, 1, 1, tzinfo=UTC)
            return _ms(start), _ms(end)
        if _INSTANT.match(value):
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            clock = value[11 : 16 + 3 if value[16:17] == ":" else 16]  # hh:mm or hh:mm:ss
            unit = 1 if "." in value else 1000 if clock.count(":") == 2 else 60_000
            return _ms(moment), _ms(moment) + unit
    except (ValueError, OverflowError):
        pass
    raise InvalidInput(
        f"{name} must be a FHIR date, dateTime or instant (e.g. 2026-03-01T10:00:00Z)"
    )


T = TypeVar("T")


def current_during(versions: Sequence[T], updated_ms: Sequence[int], period: TimeRange) -> list[T]:
    """The versions (newest first) that were current at some moment of ``period``.

    A version is current from its own update until the next newer one's.
    """
    start, end = period
    kept = []
    for i, version in enumerate(versions):
        newer = updated_ms[i - 1] if i > 0 else None
        if updated_ms[i] < end and (newer is None or newer > start):
            kept.append(version)
    return kept
