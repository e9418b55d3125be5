"""How ``make test`` spreads the suite over pytest-xdist workers.

``--dist loadfile`` sends whole modules to a worker, so a module-scoped
fixture (a served node, a ``network up``) starts once and tests that read
what earlier tests of their module left behind still see it. Two things are
added here:

- Modules that use the session-scoped ``quick_all`` fixture (one
  ``medledger bench all --quick`` run, the suite's costliest fixture) form one
  unit, so the run happens on one worker only. (pytest-xdist's own
  ``loadgroup`` cannot do this with pytest 9.2: it renames test ids through an
  attribute pytest no longer reads.)
- The slowest units start first, so the run does not end with one worker
  busy on a long module while the other waits.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadFileScheduling

#: The unit of every module that uses the shared ``bench all --quick`` run.
BENCH_ALL_UNIT = "tests/benchmarks (bench all --quick)"

#: Units that take the longest (measured from ``--durations``), started first.
SLOWEST_FIRST: tuple[str, ...] = (
    BENCH_ALL_UNIT,
    "tests/multihost/test_multihost_scenario.py",
    "tests/test_cli_network.py",
    "tests/api/test_api_fuzz.py",
    "tests/test_demo.py",
    "tests/test_cli_sharing.py",
    "tests/ledger/test_crash_safety.py",
    "tests/api/test_portal_browser.py",
    "tests/faults/test_store_faults.py",
)


@functools.cache
def _uses_shared_bench_run(path: str) -> bool:
    try:
        return "quick_all" in Path(path).read_text(encoding="utf-8")
    except OSError:
        return False


def unit_of(nodeid: str) -> str:
    """The work unit a test belongs to: its module, or the shared-run unit."""
    module = nodeid.split("::", 1)[0]
    if module.startswith("tests/benchmarks/") and _uses_shared_bench_run(module):
        return BENCH_ALL_UNIT
    return module


def slowest_first(items: list[pytest.Item]) -> None:
    """Reorder ``items`` in place: the units in SLOWEST_FIRST, then the rest as collected.

    Every worker applies the same order to the same collection, so the
    collections still compare equal.
    """
    rank = {unit: index for index, unit in enumerate(SLOWEST_FIRST)}
    last = len(rank)
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), last))  # stable


class ModuleScheduling(LoadFileScheduling):  # type: ignore[misc]
    """``loadfile`` with the shared-run unit, in the order the items arrive."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        config.option.loadscopereorder = False  # keep the slowest-first order

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)
