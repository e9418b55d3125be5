"""Store health: a full disk and a failed write make the node unready until space is back;
scrub damage stays until a pass finds none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medledger.core.errors import RetryableStorageError, StorageFull
from medledger.services.health import StoreHealth


class Ticks:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_too_little_free_space_is_a_problem(tmp_path: Path) -> None:
    free = StoreHealth(tmp_path).free_bytes()
    assert free is not None and free > 0
    assert StoreHealth(tmp_path, min_free_bytes=0).problems() == []
    full = StoreHealth(tmp_path, min_free_bytes=free * 4 + 2**40)
    (problem,) = full.problems()
    assert "disk is full" in problem
    # The same problem, read again: other processes on the disk change the free bytes.
    space = full.space_problem()
    assert space is not None and _no_count(space) == _no_count(problem)
    assert full.damage_problem() is None


def _no_count(problem: str) -> str:
    return re.sub(r"\(\d+ bytes free", "(N bytes free", problem)


def test_a_full_disk_write_failure_lasts_until_a_probe_succeeds(tmp_path: Path) -> None:
    ticks = Ticks()
    health = StoreHealth(tmp_path, min_free_bytes=0, monotonic=ticks)
    health.write_failed(RetryableStorageError("PostgreSQL is unavailable"))
    assert health.problems() == []  # not a space problem
    health.write_failed(StorageFull("blobs: No space left on device"))
    # A probe that cannot write (here: no such directory) keeps the node unready.
    blocked = StoreHealth(tmp_path / "missing-dir", min_free_bytes=0, monotonic=ticks)
    blocked.write_failed(StorageFull("blobs: No space left on device"))
    assert any("writes fail for lack of space" in p for p in blocked.problems())
    ticks.now += 0.5  # probes are rate-limited: no new probe yet
    assert blocked.problems()
    # Where the probe can write, the node is ready again, and nothing is left behind.
    assert health.problems() == []
    assert list(tmp_path.iterdir()) == []
    health.write_failed(StorageFull("again"))
    health.write_succeeded()  # a real write succeeded
    assert health.problems(probe=False) == []


def test_scrub_damage_is_reported_until_a_clean_pass(caplog: pytest.LogCaptureFixture) -> None:
    health = StoreHealth(None)
    assert health.problems() == [] and health.free_bytes() is None
    with caplog.at_level("WARNING", logger="medledger.store"):
        health.scrub_finished(["Patient record 0123… version 1: its blob is missing"])
        health.scrub_finished(["Patient record 0123… version 1: its blob is missing"])
    assert caplog.text.count("its blob is missing") == 1  # logged once, not every pass
    (problem,) = health.problems()
    assert "store is damaged: 1 problem" in problem and "verify --records" in problem
    assert health.damage_problem() == problem and health.space_problem() is None
    health.scrub_finished([])
    assert health.problems() == [] and health.scrub_passes == 3
    assert health.damage_problem() is None
