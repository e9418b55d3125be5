"""Fan-out of broadcast payloads to this process's ``broadcasts()`` listeners (both adapters).

Each listener has a bounded queue: a payload that finds it full is dropped
for that listener (broadcasts are best effort), so a listener that stops
reading — or a flood from a hostile sender — costs at most
:data:`LISTENER_QUEUE` payloads of memory per listener, never an unbounded
backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

__all__ = ["LISTENER_QUEUE", "Listeners"]

#: Payloads a listener may fall behind by before new ones are dropped for it.
LISTENER_QUEUE = 1024


class Listeners:
    """The open ``broadcasts()`` iterators of one orderer."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[bytes | None]] = set()
        self._closed = False
        #: Payloads dropped because a listener's queue was full.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queues)

    def deliver(self, payload: bytes) -> None:
        """Queue ``payload`` for every open listener (dropped where a queue is full)."""
        for queue in self._queues:
            try:
                queue.put_nowait(payload)
            except asyncio.QueueFull:
                self.dropped += 1

    async def listen(self) -> AsyncIterator[bytes]:
        """Every payload delivered from now on, until :meth:`close`."""
        if self._closed:
            return
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(LISTENER_QUEUE)
        self._queues.add(queue)
        try:
            while True:
                payload = await queue.get()
                if payload is None:
                    return
                yield payload
        finally:
            self._queues.discard(queue)

    def close(self) -> None:
        """End every listener (what they have not read yet is dropped)."""
        self._closed = True
        for queue in self._queues:
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)
