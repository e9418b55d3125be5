"""``api.worker_metrics``: the API workers' counters in one shared region the parent adds up.

Real processes write into the region through an inherited descriptor, as a
restarted worker does; the parent's reading sees them, and a process that
takes over a slot goes on from what the one before it counted.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from medledger.api.metrics import CELLS, REFUSAL_REASONS, Metrics
from medledger.api.worker_metrics import SLOT_BYTES, WorkerCounters

#: A worker's counting, in a process of its own: ``answers`` 401s and one commit.
_CHILD = """
import sys
from medledger.api.worker_metrics import WorkerCounters
fd, slots, slot, answers = (int(a) for a in sys.argv[1:])
metrics = WorkerCounters.attach(fd, slots).metrics(slot)
for _ in range(answers):
    metrics.observe_answer(401)
metrics.observe_commit(0.003)
metrics.observe_integrity_error()
"""


def _count_in_a_process(counters: WorkerCounters, slot: int, answers: int) -> None:
    numbers = (counters.fd, counters.slots, slot, answers)
    subprocess.run(
        [sys.executable, "-c", _CHILD, *(str(n) for n in numbers)],
        pass_fds=[counters.fd],
        check=True,
        timeout=120,
    )


def test_what_worker_processes_count_is_added_up_by_the_parent() -> None:
    counters = WorkerCounters.create(2)
    try:
        _count_in_a_process(counters, 0, 3)
        _count_in_a_process(counters, 1, 4)
        total = counters.counts()
        assert total.answers["4xx"] == 7
        assert total.refusals["unauthenticated"] == 7
        assert total.latency_count == 2
        assert total.latency_sum == pytest.approx(0.006)
        assert total.integrity_errors == 2
        assert counters.slot_counts(0).answers["4xx"] == 3
        assert counters.slot_counts(1).answers["4xx"] == 4
    finally:
        counters.close()


def test_a_process_taking_over_a_slot_goes_on_from_its_counts() -> None:
    """A restarted worker: the dead one's counts stay, the new one's are added to them."""
    counters = WorkerCounters.create(2)
    try:
        _count_in_a_process(counters, 1, 5)
        _count_in_a_process(counters, 1, 2)  # the replacement, same slot
        slot = counters.slot_counts(1)
        assert slot.answers["4xx"] == 7
        assert slot.latency_count == 2
        assert counters.slot_counts(0).answers["4xx"] == 0
    finally:
        counters.close()


def test_the_parent_adds_its_own_counts_to_the_workers() -> None:
    counters = WorkerCounters.create(1)
    try:
        counters.metrics(0).observe_answer(200)
        own = Metrics()
        own.observe_answer(200)
        own.observe_answer(503)
        total = own.counts() + counters.counts()
        assert total.answers == {"2xx": 2, "3xx": 0, "4xx": 0, "5xx": 1}
        assert set(total.refusals) == set(REFUSAL_REASONS)
    finally:
        counters.close()


def test_a_region_of_the_wrong_size_or_slot_is_refused() -> None:
    counters = WorkerCounters.create(2)
    try:
        with pytest.raises(ValueError):
            WorkerCounters.attach(counters.fd, 3)
        with pytest.raises(ValueError):
            counters.metrics(2)
    finally:
        counters.close()
    with pytest.raises(ValueError):
        Metrics(memoryview(bytearray(SLOT_BYTES - 8)).cast("d"))
    assert len(Metrics().counts().values) == CELLS
