"""A JetStream reader keeps a pull request open at its consumer (decision 0068).

With one pull request at a time, a reader that took the last message of a
batch held none until it asked for the next message, and whatever was ordered
meanwhile waited for the new request to reach the consumer's server. Requests
now overlap; :class:`PullBudget` counts what the open ones may still deliver.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from medledger.ledger.ordering import jetstream
from medledger.ledger.ordering.jetstream import JetStreamOrderer, PullBudget
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
            # The first request's "409 Batch Completed" ended the request, not the
            # consumer: the reader still reads through the same one.
            assert orderer._feeds == {feed}
        finally:
            await reader.aclose()  # type: ignore[attr-defined]
            await orderer.close()

    asyncio.run(main())


def test_the_budget_asks_for_a_request_when_half_a_batch_is_left_in_all() -> None:
    budget = PullBudget(batch=4, lifetime_s=10.0)
    assert budget.wants_pull(0.0)
    budget.sent(0.0)
    assert not budget.wants_pull(0.1)
    budget.delivered()
    assert not budget.wants_pull(0.2)  # 3 left
    budget.delivered()
    assert budget.wants_pull(0.3)  # 2 left: half a batch
    budget.sent(0.3)
    assert (budget.capacity, budget.wants_pull(0.4)) == (6, False)


def test_the_budget_asks_again_when_the_newest_request_is_half_way_to_expiring() -> None:
    budget = PullBudget(batch=4, lifetime_s=10.0)
    budget.sent(0.0)
    assert not budget.wants_pull(4.9)
    assert budget.wants_pull(5.0)  # nothing delivered, but this one ends at 10 s
    budget.sent(5.0)
    assert not budget.wants_pull(9.9)


def test_requests_served_in_turn_that_expire_leave_no_capacity_counted() -> None:
    """What a real server does (checked against nats-server: two open requests of 4 got
    2 messages each, and each then expired saying 2 were pending): with a count per
    request, oldest first, the first request looked used up and the second untouched,
    and after both expired the reader still counted 4 messages to come."""
    budget = PullBudget(batch=4, lifetime_s=10.0)
    budget.sent(0.0)
    budget.delivered()
    budget.delivered()
    budget.sent(0.1)  # half a batch left: a second request
    for _ in range(2):
        budget.delivered()
    budget.ended(2)  # the first expires: 2 of its 4 were never asked for
    budget.ended(2)  # so does the second
    assert budget.capacity == 0
    assert budget.wants_pull(10.2)


def test_a_request_that_ends_without_saying_what_was_left_counts_as_empty() -> None:
    budget = PullBudget(batch=4, lifetime_s=10.0)
    budget.sent(0.0)
    budget.sent(0.0)
    budget.ended(None)
    assert (budget.capacity, budget.wants_pull(0.1)) == (0, True)
