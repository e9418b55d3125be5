"""Background tasks that cannot die unnoticed, and the node's named health checks.

A node runs long-lived tasks beside its HTTP service: the consortium
member's consume loop and cut timer, the anchorer, the batched access
reports. A task that ended silently used to leave the node looking healthy
while it had stopped following the consortium. Here:

* :class:`SupervisedTask` runs one such task. If it raises, the exception is
  logged (once per death, with its type and text) and the task is restarted
  after a capped exponential backoff — but only if its owner says a restart
  is safe (``restart_if``); otherwise it stays dead. While it is dead or
  waiting to restart, :attr:`SupervisedTask.problem` says so in one line.
* :class:`Health` is a registry of named checks, each answering ``None``
  (fine) or one line saying what is wrong. ``/readyz`` answers 503 and names
  every failing check; components add their own checks without the API
  knowing about them.

``/readyz`` is unauthenticated, so a check's line names the exception's type
only: its text (server addresses, paths) goes to the log, not to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Health", "HealthCheck", "SupervisedTask"]

log = logging.getLogger(__name__)

#: ``None`` when all is well, else one line saying what is wrong.
HealthCheck = Callable[[], str | None]


class Health:
    """Named health checks of one node (insertion order is report order)."""

    def __init__(self) -> None:
        self._checks: dict[str, HealthCheck] = {}

    def add(self, name: str, check: HealthCheck) -> None:
        """Register ``check`` under ``name`` (replacing an earlier check of that name)."""
        self._checks[name] = check

    def watch(self, task: SupervisedTask) -> None:
        """Register a supervised task under its name."""
        self.add(task.name, lambda: task.problem)

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    def results(self) -> dict[str, str | None]:
        """Every check: name -> ``None`` (fine) or what is wrong. A check that raises fails."""
        out: dict[str, str | None] = {}
        for name, check in list(self._checks.items()):
            try:
                out[name] = check()
            except Exception as exc:  # a broken check must not hide the others
                out[name] = f"health check failed: {type(exc).__name__}: {exc}"
        return out

    def problems(self) -> dict[str, str]:
        """Every failing check: name -> what is wrong."""
        return {name: p for name, p in self.results().items() if p is not None}


#: How long :meth:`SupervisedTask.close` waits before cancelling a running task again.
_CANCEL_AGAIN_S = 0.5


def _always(_exc: BaseException) -> bool:
    return True


class SupervisedTask:
    """One long-running background task, restarted with backoff when it dies.

    ``run`` makes a fresh coroutine for each (re)start; it is expected to run
    until cancelled. Returning counts as stopping for good (``problem`` says
    it ended). ``restart_if(exc)`` decides whether a restart after ``exc``
    is safe; backoff starts at ``backoff_min`` seconds and doubles up to
    ``backoff_max``, and resets once a run has lasted ``backoff_max``.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[], Coroutine[Any, Any, None]],
        *,
        restart_if: Callable[[BaseException], bool] = _always,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.name = name
        self._run = run
        self._restart_if = restart_if
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._task: asyncio.Task[None] | None = None
        self._problem: str | None = None
        #: How many times the task died (raised) so far.
        self.deaths = 0

    @property
    def problem(self) -> str | None:
        """``None`` while the task runs (or was never started); else what happened to it."""
        return self._problem

    def start(self) -> None:
        """Start the task in the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self.name)

    async def close(self) -> None:
        """Cancel the task and wait until it has ended. Idempotent.

        The task is cancelled again every :data:`_CANCEL_AGAIN_S` while it still
        runs: on Python 3.11, ``asyncio.wait_for`` (the consortium member's
        ``submit``, nats-py requests) returns its result and drops a cancellation
        that arrives together with it, and a loop that lost its cancellation
        would run on while ``close`` waited for it forever (a node hung at
        shutdown).
        """
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_CANCEL_AGAIN_S)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._backoff_min
        while True:
            started = loop.time()
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.deaths += 1
                if loop.time() - started >= self._backoff_max:
                    delay = self._backoff_min  # it ran a good while: a fresh failure
                restart = self._restart_if(exc)
                what = f"died: {type(exc).__name__}"
                self._problem = (
                    f"{what} (restarting in {delay:.1f} s)"
                    if restart
                    else f"{what} (not restarted: restart the node)"
                )
                log.error(
                    "background task %s %s: %s",
                    self.name,
                    self._problem,
                    exc,
                    exc_info=exc,
                    extra={"fields": {"task": self.name, "deaths": self.deaths}},
                )
                if not restart:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                self._problem = None
                log.warning("background task %s restarted", self.name)
                continue
            self._problem = "ended (not restarted: restart the node)"
            log.error("background task %s ended", self.name)
            return
