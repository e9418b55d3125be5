"""Supervised background tasks: a death is logged, reported and (where safe) restarted.

Backoffs are short so the tests run quickly; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from medledger.core.errors import OrderingError
from medledger.ledger.supervision import Health, SupervisedTask


async def _until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_a_dying_task_is_reported_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []
    fail = asyncio.Event()

    async def work() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise OrderingError("stream gone")
        await fail.wait()

    async def main() -> list[str | None]:
        task = SupervisedTask("worker", work, backoff_min=0.05, backoff_max=0.2)
        seen: list[str | None] = []
        task.start()
        try:
            await _until(lambda: task.problem is not None, "the first death")
            seen.append(task.problem)
            await _until(lambda: len(runs) == 3 and task.problem is None, "the second restart")
            seen.append(task.problem)
            assert task.deaths == 2
        finally:
            await task.close()
        return seen

    caplog.set_level(logging.INFO, logger="medledger.ledger.supervision")
    first, after = asyncio.run(main())
    assert first is not None and "OrderingError" in first and "restarting" in first
    assert "stream gone" not in first  # the text goes to the log only
    assert after is None
    deaths = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(deaths) == 2 and deaths[0].exc_info is not None
    assert "worker" in deaths[0].getMessage() and "stream gone" in deaths[0].getMessage()


def test_a_task_that_may_not_restart_stays_dead_and_says_so() -> None:
    runs: list[int] = []

    async def work() -> None:
        runs.append(1)
        raise RuntimeError("half applied")

    async def main() -> str | None:
        task = SupervisedTask("worker", work, restart_if=lambda _e: False, backoff_min=0.01)
        task.start()
        try:
            await _until(lambda: task.problem is not None, "the death")
            await asyncio.sleep(0.05)  # would have restarted by now
            return task.problem
        finally:
            await task.close()

    problem = asyncio.run(main())
    assert problem is not None and "RuntimeError" in problem
    assert "not restarted" in problem
    assert runs == [1]


def test_a_task_that_ends_is_a_problem() -> None:
    async def work() -> None:
        return None

    async def main() -> str | None:
        task = SupervisedTask("worker", work)
        task.start()
        try:
            await _until(lambda: task.problem is not None, "the end")
            return task.problem
        finally:
            await task.close()

    problem = asyncio.run(main())
    assert problem is not None and problem.startswith("ended")


def test_health_lists_failing_checks_by_name_and_survives_a_broken_check() -> None:
    health = Health()
    health.add("fine", lambda: None)
    health.add("sick", lambda: "died: OrderingError: x")

    def broken() -> str | None:
        raise KeyError("oops")

    health.add("broken", broken)
    problems = health.problems()
    assert list(problems) == ["sick", "broken"]
    assert problems["sick"] == "died: OrderingError: x"
    assert "KeyError" in problems["broken"]
    assert health.results()["fine"] is None and list(health.results()) == ["fine", "sick", "broken"]
    health.remove("sick")
    health.remove("broken")
    assert health.problems() == {}


def test_close_ends_a_task_that_lost_its_cancellation() -> None:
    """On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation (its result won).

    A task that lost one must still end when closed: a node's shutdown waited for
    such a task forever.
    """
    swallowed: list[bool] = []

    async def work() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # what wait_for does when its result arrives too

    async def main() -> bool:
        task = SupervisedTask("worker", work)
        task.start()
        await asyncio.sleep(0)  # let it reach its first await
        # Not wait_for: cancelling close() on its timeout would cancel the task again.
        closing = asyncio.create_task(task.close())
        done, _ = await asyncio.wait({closing}, timeout=10)
        assert closing in done, "close() still waits for a task that lost its cancellation"
        return task.problem is None

    assert asyncio.run(main())
    assert swallowed == [True]
