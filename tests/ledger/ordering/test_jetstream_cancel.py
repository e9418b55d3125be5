"""A JetStream reader whose cancellation was dropped still ends.

On Python 3.11, ``asyncio.wait_for`` — used by nats-py for requests with a
timeout — can return its result and drop a cancellation that arrives at the
same moment. A closing consortium member cancels its reader and awaits it;
the reader must end even then, or the member's close waits forever.
"""

from __future__ import annotations

import asyncio
import uuid

from medledger.ledger.ordering.jetstream import JetStreamOrderer
from medledger.localnet.natsserver import NatsCluster


def test_a_reader_whose_cancellation_was_dropped_still_ends(nats_cluster: NatsCluster) -> None:
    async def main() -> None:
        name = uuid.uuid4().hex[:12]
        orderer = await JetStreamOrderer.connect(
            nats_cluster.client_urls(), stream=f"S{name}", subject=f"s.{name}", replicas=3
        )
        real_open = orderer._open_consumer
        opened, dropped = asyncio.Event(), asyncio.Event()

        async def open_dropping_a_cancellation(start: int) -> object:
            feed = await real_open(start)
            opened.set()
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                dropped.set()  # what wait_for does when its result and the cancel coincide
            return feed

        orderer._open_consumer = open_dropping_a_cancellation  # type: ignore[method-assign]

        async def reader() -> None:
            async for _ in orderer.read(1):
                pass

        try:
            task = asyncio.create_task(reader())
            await asyncio.wait_for(opened.wait(), 10)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=10)
            assert dropped.is_set()
            assert done == {task} and task.cancelled()
        finally:
            await orderer.close()

    asyncio.run(main())
