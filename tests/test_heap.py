"""freeze_startup_heap: start-up's objects leave the collector's generations."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from medledger.heap import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's heap unfrozen before and after (the state is process-wide)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def _tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_objects_alive_at_start_up_are_frozen_and_garbage_is_not(unfrozen: None) -> None:
    kept: list[object] = [[]]
    cycle: list[object] = []
    cycle.append(cycle)  # garbage that only the cyclic collector frees
    garbage_id = id(cycle)
    del cycle
    assert _tracked(kept)
    frozen = freeze_startup_heap()
    assert frozen == gc.get_freeze_count() > 0
    # What start-up keeps is out of the generations a full collection scans...
    assert not _tracked(kept)
    # ...and the garbage was collected first, not frozen for good.
    assert all(id(o) != garbage_id for o in gc.get_objects())
    after: list[object] = []
    assert _tracked(after)  # later objects are collected as usual
