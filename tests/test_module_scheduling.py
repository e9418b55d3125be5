"""How ``make test`` hands modules to its two workers (``tests/module_scheduling.py``).

The scheduler runs against stand-in workers that behave as pytest-xdist's do
(a worker starts a test only once it has the next one, or is told to stop), on
a simulated clock: which worker runs what, and when the last one finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from module_scheduling import BENCH_ALL_UNIT, SLOWEST_FIRST, ModuleScheduling, unit_of

TESTS = Path(__file__).parent


@dataclass(eq=False)
class Worker:
    """What the scheduler sees of a worker, and the indexes of the tests it was sent."""

    name: str
    queue: list[int] = field(default_factory=list)
    shutting_down: bool = False
    gateway: SimpleNamespace = field(init=False)

    def __post_init__(self) -> None:
        self.gateway = SimpleNamespace(id=self.name)

    def send_runtest_some(self, indexes: list[int]) -> None:
        self.queue.extend(indexes)

    def shutdown(self) -> None:
        self.shutting_down = True


def _run(durations: dict[str, float]) -> tuple[float, dict[str, list[str]]]:
    """Run a collection of ``nodeid -> seconds`` on two workers; the end and who ran what."""
    config = SimpleNamespace(
        getvalue=lambda name: ["2*popen"] if name == "tx" else None,
        option=SimpleNamespace(loadscopereorder=True),
    )
    scheduler = ModuleScheduling(config)  # type: ignore[arg-type]
    collection = list(durations)
    workers = [Worker("gw0"), Worker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
    for worker in workers:
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    now = 0.0
    running: dict[str, tuple[float, int]] = {}  # worker -> (finishes at, test index)
    ran: dict[str, list[str]] = {w.name: [] for w in workers}
    while True:
        for worker in workers:
            # As xdist's worker: a test starts once the next one is known (or at shutdown).
            if worker.name not in running and (
                len(worker.queue) >= 2 or (worker.queue and worker.shutting_down)
            ):
                index = worker.queue.pop(0)
                running[worker.name] = (now + durations[collection[index]], index)
        if not running:
            break
        name = min(running, key=lambda n: running[n][0])
        now, index = running.pop(name)
        ran[name].append(collection[index])
        scheduler.mark_test_complete(next(w for w in workers if w.name == name), index)
    assert sorted(t for tests in ran.values() for t in tests) == sorted(collection)
    return now, ran


def test_a_unit_is_not_reserved_behind_a_long_test_while_the_other_worker_runs_dry() -> None:
    # a.py ends with a long test then a short one; b.py and c.py are one test each.
    durations = {
        "tests/a.py::test_long": 100.0,
        "tests/a.py::test_short": 1.0,
        "tests/b.py::test_b": 50.0,
        "tests/c.py::test_c": 60.0,
    }
    end, ran = _run(durations)
    # c.py goes to the worker that finished b.py, not to the one still busy with a.py
    # (handed out two tests early, c.py would wait there: the run would end at 161 s).
    by_module = {unit_of(t): w for w, tests in ran.items() for t in tests}
    assert by_module["tests/c.py"] == by_module["tests/b.py"] != by_module["tests/a.py"]
    assert end == 110.0
    # Each module on one worker, its tests in their order.
    assert ran[by_module["tests/a.py"]] == ["tests/a.py::test_long", "tests/a.py::test_short"]


def test_a_module_of_one_test_does_not_stall_its_worker() -> None:
    durations = {
        "tests/a.py::test_a": 5.0,
        "tests/b.py::test_b": 5.0,
        "tests/c.py::test_c": 5.0,
        "tests/d.py::test_d": 5.0,
    }
    end, ran = _run(durations)
    assert end == 10.0
    assert sorted(len(tests) for tests in ran.values()) == [2, 2]


def test_the_slowest_units_start_first_whatever_their_place_in_the_collection() -> None:
    fuzz, network = SLOWEST_FIRST[1], SLOWEST_FIRST[2]
    durations = {
        "tests/a.py::test_a": 10.0,
        "tests/b.py::test_b": 10.0,
        f"{network}::test_network": 40.0,  # collected after the others, ranked second
        f"{network}::test_network_too": 10.0,
        f"{fuzz}::test_fuzz": 90.0,  # collected last, ranked first
        f"{fuzz}::test_fuzz_too": 10.0,
    }
    end, ran = _run(durations)
    assert sorted(unit_of(tests[0]) for tests in ran.values()) == sorted([fuzz, network])
    # In collection order the fuzz module would start at 10 s and end the run at 110 s.
    assert end == 100.0


def test_every_unit_named_slowest_is_a_unit_of_the_suite() -> None:
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)
    for unit in SLOWEST_FIRST:
        if unit == BENCH_ALL_UNIT:
            continue
        assert (TESTS.parent / unit).is_file(), f"{unit} was moved or renamed"
        assert unit_of(f"{unit}::test_x") == unit, f"{unit} runs within another unit"
