"""freeze_startup_heap / ready_heap_for_serving: start-up's objects leave the collector's
generations, and a serving process collects its young generation less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from medledger.heap import YOUNG_THRESHOLD, freeze_startup_heap, ready_heap_for_serving


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's heap unfrozen before and after (the state is process-wide)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.fixture
def default_thresholds(unfrozen: None) -> Iterator[tuple[int, int, int]]:
    """CPython's default thresholds for the test, the test process's own restored after."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield (700, 10, 10)
    gc.set_threshold(*before)


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


def test_serving_raises_only_the_young_threshold(default_thresholds: tuple[int, int, int]) -> None:
    frozen = ready_heap_for_serving()
    assert frozen == gc.get_freeze_count() > 0
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *default_thresholds[1:])


def test_reads_in_flight_do_not_set_off_young_collections(
    default_thresholds: tuple[int, int, int],
) -> None:
    """What 64 reads waiting for their block hold at once (a few thousand containers)
    sets off young collections at CPython's 700, and none once ready to serve."""

    def young_collections_while_holding(count: int) -> int:
        seen: list[int] = []

        def note(phase: str, info: dict[str, int]) -> None:
            if phase == "start" and info["generation"] == 0:
                seen.append(1)

        gc.collect()
        gc.callbacks.append(note)
        try:
            held = [{"id": i} for i in range(count)]  # tracked containers, all alive
            del held
        finally:
            gc.callbacks.remove(note)
        return len(seen)

    in_flight = 5_000
    assert young_collections_while_holding(in_flight) > 0  # the default's behaviour
    ready_heap_for_serving()
    assert young_collections_while_holding(in_flight) == 0
    # Garbage cycles are still found by the collector, later rather than never.
    collected: list[int] = []

    def note_collected(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collected.append(info["collected"])

    gc.callbacks.append(note_collected)
    try:
        for _ in range(2 * YOUNG_THRESHOLD):
            cycle: list[object] = []
            cycle.append(cycle)
            del cycle
    finally:
        gc.callbacks.remove(note_collected)
    assert sum(collected) > 0
