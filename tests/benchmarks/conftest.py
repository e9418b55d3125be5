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
    proc = _run_stopped_by_sigterm(
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
        timeout=QUICK_ALL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run_stopped_by_sigterm(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` with output captured, except that a run over ``timeout`` gets
    SIGTERM (SIGKILL, which ``run`` sends, would leave its nats-servers and institution
    processes running) and SIGKILL only if still there a minute later; then it fails."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            pytest.fail(f"bench all --quick took over {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
