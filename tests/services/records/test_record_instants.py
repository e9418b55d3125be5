"""``instant``: a version's time as a FHIR instant, the same text as Python's datetime writes."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from medledger.services.records.model import instant

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _exact(ms: int) -> str:
    """The instant by exact integer arithmetic (no float), as datetime writes it."""
    moment = _EPOCH + timedelta(milliseconds=ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_instants_match_datetime_at_edges_and_over_centuries() -> None:
    edges = [0, 1, 999, 1_000, 1_001, 59_999, 86_399_999, 86_400_000, 951_782_400_000]
    edges += [1_764_950_000_123, 4_102_444_799_999, 253_402_300_799_999]
    sample = random.Random(19).sample(range(253_402_300_800_000), 20_000)
    for ms in edges + sample:
        assert instant(ms) == _exact(ms), ms


def test_before_the_epoch_an_instant_is_still_written() -> None:
    assert instant(-1) == "1969-12-31T23:59:59.999Z"
    assert instant(-86_400_000) == "1969-12-31T00:00:00.000Z"
