"""Group commit for any storage write: many concurrent callers, one transaction.

Callers ``await submit(op)``; a single writer thread applies every queued op
in one call of ``apply`` (one storage transaction, one fsync) and then wakes
each caller — with its own exception if ``apply`` reported one for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from medledger.core.errors import StorageError

__all__ = ["GroupCommitter"]

T = TypeVar("T")
R = TypeVar("R")

#: ``apply`` returns, per op, ``None`` (done) or the exception for that op's caller.
ApplyFn = Callable[[Sequence[T]], Sequence[BaseException | None]]


class GroupCommitter(Generic[T]):
    """Batches ``submit``-ted ops into calls of ``apply`` on one thread."""

    def __init__(self, apply: ApplyFn[T], *, name: str, max_batch: int = 4096) -> None:
        self._apply = apply
        self._max = max_batch
        self._queue: list[tuple[T, asyncio.Future[None]]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._closed = False

    async def submit(self, op: T) -> None:
        """Queue ``op``; return once it is committed (or raise its error)."""
        if self._closed:
            raise StorageError("storage is closed")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run())
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.append((op, fut))
        assert self._wakeup is not None
        self._wakeup.set()
        await fut

    async def run_exclusive(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the writer thread, between batches."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._queue[: self._max]
                del self._queue[: self._max]
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._apply, [op for op, _ in batch]
                    )
                except Exception as exc:
                    err = (
                        exc
                        if isinstance(exc, StorageError)
                        else StorageError(f"{type(exc).__name__}: {exc}")
                    )
                    results = [err] * len(batch)
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if result is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(result)
            if self._closed:
                return

    async def close(self) -> None:
        """Finish everything queued, then stop the writer thread."""
        self._closed = True
        if self._task is not None and self._wakeup is not None:
            self._wakeup.set()
            await self._task
        self._executor.shutdown(wait=True)
