"""A JetStream reader keeps following through a hung server, and fails over in order.

A SIGSTOPped nats-server keeps its client connections open but answers
nothing: only unanswered pings reveal it. The reader must leave it within a
few seconds (short ping interval), resume on another server without a gap,
never give up however long the outage lasts, and log the outage once rather
than once per retry. The server list is tried in the order given (a member's
own server first), and a reconnect prefers the servers it did not just lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from urllib.parse import urlparse

import pytest
from nats.aio.client import Server

from medledger.ledger.ordering.jetstream import JetStreamOrderer, JetStreamTuning, _ServerChoice
from medledger.ledger.ordering.port import OrderedMessage
from medledger.localnet.natsserver import NatsCluster

#: Detect a hung server after 2 s (1 s pings, 1 unanswered allowed).
FAST_DETECTION = JetStreamTuning(ping_interval=1, max_outstanding_pings=1, read_backoff_max=1.0)


def _server(url: str, reconnects: int = 0) -> Server:
    return Server(uri=urlparse(url), reconnects=reconnects)


def test_reconnect_prefers_the_configured_order_then_servers_not_just_lost() -> None:
    own, second, third = "nats://h:1", "nats://h:2", "nats://h:3"
    choice = _ServerChoice()
    picked, delay = choice([_server(own), _server(second), _server(third)], {})
    assert picked is not None and picked.uri.netloc == "h:1" and delay == 0.0
    # The server just lost (maybe hung) goes last among equals.
    choice.current = "h:1"
    picked, _ = choice([_server(own), _server(second), _server(third)], {})
    assert picked is not None and picked.uri.netloc == "h:2"
    # Fewer failed attempts still wins over order.
    picked, delay = choice([_server(own, 2), _server(second, 3), _server(third, 1)], {})
    assert picked is not None and picked.uri.netloc == "h:3" and delay > 0


def test_tuning_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        JetStreamTuning(ping_interval=0)
    with pytest.raises(ValueError, match="min <= max"):
        JetStreamTuning(read_backoff_min=3.0, read_backoff_max=1.0)


def test_a_reader_leaves_a_hung_server_and_never_gives_up(
    fault_cluster: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="medledger.ledger.ordering.jetstream")
    tag = uuid.uuid4().hex[:12]
    urls = fault_cluster.client_urls()
    hung = 0

    async def main() -> None:
        # Every orderer opened is closed, also when the next connect or the scenario fails.
        async with contextlib.AsyncExitStack() as opened:
            # The writer first: it creates the stream with the default patience, which a
            # cluster just started on a loaded machine may need (its first stream waits
            # for a JetStream leader).
            writing = await JetStreamOrderer.connect(
                urls[1:] + urls[:1],
                stream=f"F{tag}",
                subject=f"f.{tag}",
                replicas=3,
                tuning=FAST_DETECTION,
                name="writer",
            )
            opened.push_async_callback(writing.close)
            # retry_for=2 s: the old reader gave up after retry_for seconds of failure.
            reading = await JetStreamOrderer.connect(
                urls,
                stream=f"F{tag}",
                subject=f"f.{tag}",
                replicas=3,
                retry_for=2.0,
                tuning=FAST_DETECTION,
                name="reader",
            )
            opened.push_async_callback(reading.close)
            got: list[OrderedMessage] = []

            async def follow() -> None:
                async for msg in reading.read(1):
                    got.append(msg)

            async def until(count: int, timeout: float) -> None:
                deadline = asyncio.get_running_loop().time() + timeout
                while len(got) < count:
                    assert not follower.done(), follower
                    assert asyncio.get_running_loop().time() < deadline, f"{len(got)} of {count}"
                    await asyncio.sleep(0.05)

            follower = asyncio.create_task(follow())
            try:
                # Own server first: no shuffling of the configured list.
                assert reading._nc.connected_url is not None
                assert reading._nc.connected_url.netloc == urlparse(urls[hung]).netloc
                for i in range(5):
                    await writing.publish(f"m{i}", b"before %d" % i)
                await until(5, 15)
                fault_cluster.pause_node(hung)
                try:
                    # Longer than retry_for and than the reader's missed-heartbeat limit.
                    for i in range(5, 10):
                        await writing.publish(f"m{i}", b"during %d" % i)
                    await until(10, 30)
                    connected = reading._nc.connected_url
                    assert connected is not None and connected.netloc != urlparse(urls[hung]).netloc
                    await asyncio.sleep(3.0)  # an idle stream over the outage is not a failure
                    assert not follower.done()
                finally:
                    fault_cluster.resume_node(hung)
                for i in range(10, 15):
                    await writing.publish(f"m{i}", b"after %d" % i)
                await until(15, 30)
                assert [m.seq for m in got] == list(range(1, 16))
                assert [m.payload for m in got[5:10]] == [b"during %d" % i for i in range(5, 10)]
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)

    asyncio.run(main())
    failing = [r for r in caplog.records if "reader cannot resume" in r.getMessage()]
    resumed = [r for r in caplog.records if "reader resumed" in r.getMessage()]
    # One line per change of state, not one per retry.
    assert len(failing) == len(resumed) <= 2
