"""One ``medledger bench all --quick`` run (the smoke profile), shared by every benchmark test.

Under ``pytest -n 2 --dist loadfile`` each worker has its own session, so the
modules that read the run are sent to one worker as one unit (see
``tests/module_scheduling.py``): the run, the suite's most expensive fixture,
then happens once, not once per worker.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cli_support import medledger_command

#: The run's hang guard, in seconds: the quick profile of every benchmark takes a few
#: minutes on an idle machine and several times that on a loaded one.
QUICK_ALL_TIMEOUT = 1200


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The test that first asks for the shared run pays its setup: give it the run's guard."""
    for item in items:
        if "quick_all" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(QUICK_ALL_TIMEOUT + 60))


@pytest.fixture(scope="session")
def quick_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``medledger bench all --quick`` run (the smoke profile), shared by the benchmark tests."""
    out = tmp_path_factory.mktemp("bench-all")
    markdown = out / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\nHand-written analysis stays.\n")
    proc = subprocess.run(
        [
            *medledger_command(),
            "bench",
            "all",
            "--quick",
            "--dir",
            str(out / "work"),
            "--results-dir",
            str(out / "results"),
            "--markdown",
            str(markdown),
        ],
        capture_output=True,
        text=True,
        timeout=QUICK_ALL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
