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
  busy on a long module while the other waits. The scheduler (in the
  controller) picks them: sorting the items in a ``pytest_collection_modifyitems``
  hook does nothing under xdist, whose workers collect with ``dist`` set to
  ``"no"`` and whose controller takes the units in the workers' collection order.
- A worker is given its next unit only when it is down to its last test, not
  two tests before as pytest-xdist does: a unit handed out early waits behind
  the current module's long test while the other worker may run out of work.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadFileScheduling

#: The unit of every module that uses the shared ``bench all --quick`` run.
BENCH_ALL_UNIT = "tests/benchmarks (bench all --quick)"

#: Units that take the longest, the longest first: every unit of 10 s or more in a
#: full two-worker run of the 3,366 tests (``--junitxml``, summed per unit; a shared
#: machine, so only the order counts). Every other unit follows in collection order;
#: they take seconds each, so whichever runs last the two workers end close together.
SLOWEST_FIRST: tuple[str, ...] = (
    BENCH_ALL_UNIT,  # 188 s
    "tests/api/test_api_fuzz.py",  # 109 s
    "tests/test_cli_network.py",  # 72 s
    "tests/multihost/test_multihost_scenario.py",  # 71 s
    "tests/test_demo.py",  # 67 s
    "tests/ledger/test_crash_safety.py",  # 46 s
    "tests/api/test_portal_browser.py",  # 43 s
    "tests/storage/test_postgres.py",  # 39 s
    "tests/test_cli_sharing.py",  # 38 s
    "tests/faults/test_store_faults.py",  # 36 s
    "tests/api/test_api_workers.py",  # 26 s
    "tests/api/test_fhir_writes.py",  # 24 s
    "tests/services/test_sharing.py",  # 21 s
    "tests/ledger/ordering/test_nats_security.py",  # 19 s
    "tests/ledger/ordering/test_orderer_contract.py",  # 18 s
    "tests/benchmarks/test_bench_workers_cpu_quota.py",  # 18 s
    "tests/services/test_search.py",  # 16 s
    "tests/services/test_records.py",  # 16 s
    "tests/storage/test_sequencer_lease.py",  # 16 s
    "tests/test_cli_service.py",  # 15 s
    "tests/storage/test_chain_store_contract.py",  # 15 s
    "tests/test_architecture.py",  # 14 s
    "tests/localnet/test_process_tree.py",  # 14 s
    "tests/localnet/test_network_nats_credentials.py",  # 14 s
    "tests/test_cli_records.py",  # 14 s
    "tests/security/test_node_files.py",  # 13 s
    "tests/storage/test_sequencer_failover.py",  # 13 s
    "tests/ledger/test_private_chain.py",  # 12 s
    "tests/security/test_http_hardening.py",  # 11 s
    "tests/faults/test_nats_faults.py",  # 11 s
    "tests/security/test_patient_identity.py",  # 10 s
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


#: Each unit's place in the order work is handed out: SLOWEST_FIRST's, then the rest.
_RANK = {unit: index for index, unit in enumerate(SLOWEST_FIRST)}


def rank_of(unit: str) -> int:
    """Where ``unit`` comes in the hand-out order (ties keep the collection order)."""
    return _RANK.get(unit, len(_RANK))


class ModuleScheduling(LoadFileScheduling):  # type: ignore[misc]
    """``loadfile`` with the shared-run unit, in the order the items arrive, handed out late."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        config.option.loadscopereorder = False  # the units as collected; ranked when handed out

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)

    def _assign_work_unit(self, node: Any) -> None:
        """Hand ``node`` the waiting unit that comes first in SLOWEST_FIRST, else the next one."""
        unit = min(self.workqueue, key=rank_of)  # the first of equal rank: collection order
        self.workqueue.move_to_end(unit, last=False)
        super()._assign_work_unit(node)

    def _reschedule(self, node: Any) -> None:
        """Give ``node`` the next unit once its last pending test is all it has left.

        A worker starts a test only when it knows the one after (for the teardown
        of module fixtures), so its last pending test has not started: handing
        the next unit out then costs no idle time. pytest-xdist hands it out at
        two pending tests, so a worker running a long test reserves a unit the
        other worker, idle at the end of the run, could have run.
        """
        if node.shutting_down:
            return
        if not self.workqueue:
            node.shutdown()
            return
        if self._pending_of(self.assigned_work[node]) > 1:
            return
        self._assign_work_unit(node)
