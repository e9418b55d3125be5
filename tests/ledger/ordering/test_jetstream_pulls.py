"""A JetStream reader keeps a pull request open at its consumer (decision 0068).

With one pull request at a time, a reader that took the last message of a
batch held none until it asked for the next message, and whatever was ordered
meanwhile waited for the new request to reach the consumer's server. Requests
now overlap: the next is sent once the current one is half used.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from medledger.ledger.ordering import jetstream
from medledger.ledger.ordering.jetstream import JetStreamOrderer
from medledger.localnet.natsserver import NatsCluster

BATCH = 4


def test_a_message_ordered_at_a_batch_boundary_is_delivered_without_asking(
    nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jetstream, "_BATCH", BATCH)

    async def main() -> None:
        name = uuid.uuid4().hex[:12]
        stream = f"S{name}"
        orderer = await JetStreamOrderer.connect(
            nats_cluster.client_urls(), stream=stream, subject=f"s.{name}", replicas=3
        )
        reader = orderer.read(1)
        try:
            for i in range(BATCH):
                await orderer.publish(f"m{i}", b"%d" % i)
            # The first request's whole batch; the reader is then left waiting at a yield.
            assert [(await anext(reader)).seq for _ in range(BATCH)] == [1, 2, 3, 4]
            await orderer.publish("late", b"late")

            (feed,) = orderer._feeds

            async def delivered() -> int:
                info = await orderer._js.consumer_info(orderer._stream, feed.consumer)
                return int(info.delivered.stream_seq)

            async def until_delivered() -> None:
                while await delivered() < BATCH + 1:
                    await asyncio.sleep(0.02)

            # Only an open request lets the consumer send it before the reader asks.
            await asyncio.wait_for(until_delivered(), 10)
            late = await anext(reader)
            assert (late.seq, late.payload) == (BATCH + 1, b"late")
        finally:
            await reader.aclose()  # type: ignore[attr-defined]
            await orderer.close()

    asyncio.run(main())
