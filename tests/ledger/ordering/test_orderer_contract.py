"""One conformance suite for every orderer (port.py): solo in memory, solo on SQLite, JetStream.

The same tests run against each adapter through the parametrized
``backend`` fixture. JetStream runs on a real 3-node nats-server cluster
(conftest.py) with an R3 stream per test; the last tests kill and restart
nodes of a cluster of their own.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from medledger.core.errors import OrderingError
from medledger.ledger.ordering.jetstream import JetStreamOrderer
from medledger.ledger.ordering.port import MAX_MESSAGE_BYTES, OrderedMessage, Orderer
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.localnet.natsserver import NatsCluster

T = TypeVar("T")


@dataclass
class Backend:
    """How to open (and re-open) one order of one adapter."""

    kind: str
    opener: Callable[[], Awaitable[Orderer]]
    #: True if re-opening sees what an earlier instance published.
    durable: bool

    async def open(self) -> Orderer:
        return await self.opener()


def jetstream_backend(cluster: NatsCluster) -> Backend:
    """A fresh R3 stream on ``cluster``; each ``open()`` is a new connection to it."""
    tag = uuid.uuid4().hex[:12]

    async def opener() -> Orderer:
        return await JetStreamOrderer.connect(
            cluster.client_urls(), stream=f"ORDER_{tag}", subject=f"order.{tag}", replicas=3
        )

    return Backend(kind="jetstream", opener=opener, durable=True)


@pytest.fixture(params=["solo-memory", "solo-sqlite", "jetstream"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    kind: str = request.param
    if kind == "solo-memory":
        shared: list[SoloOrderer] = []  # an in-memory order cannot be re-opened

        async def memory() -> Orderer:
            if not shared:
                shared.append(SoloOrderer())
            return shared[0]

        return Backend(kind=kind, opener=memory, durable=False)
    if kind == "solo-sqlite":
        path = tmp_path / "order.db"

        async def sqlite() -> Orderer:
            return SoloOrderer(path)

        return Backend(kind=kind, opener=sqlite, durable=True)
    return jetstream_backend(request.getfixturevalue("nats_cluster"))


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapped() -> T:
        return await main()

    return asyncio.run(wrapped())


async def take(
    orderer: Orderer, start: int, count: int, timeout: float = 20.0
) -> list[OrderedMessage]:
    """The first ``count`` messages ``read(start)`` yields (fails after ``timeout`` s)."""
    got: list[OrderedMessage] = []
    reader = orderer.read(start)
    try:
        async with asyncio.timeout(timeout):
            async for message in reader:
                got.append(message)
                if len(got) == count:
                    break
    except TimeoutError:
        pytest.fail(f"read({start}) gave {len(got)} of {count} messages in {timeout} s")
    finally:
        aclose = getattr(reader, "aclose", None)  # both adapters' readers are generators
        if aclose is not None:
            await aclose()
    return got


def payload(i: int) -> bytes:
    return f"tx-{i}".encode()


# -- the contract, for every adapter ---------------------------------------------------------


def test_sequences_start_at_one_and_are_contiguous(backend: Backend) -> None:
    async def main() -> None:
        order = await backend.open()
        try:
            assert await order.last_seq() == 0
            seqs = [await order.publish(f"m{i}", payload(i)) for i in range(10)]
            assert seqs == list(range(1, 11))
            assert await order.last_seq() == 10
        finally:
            await order.close()

    run(main)


def _pairs(messages: list[OrderedMessage]) -> list[tuple[int, bytes]]:
    return [(m.seq, m.payload) for m in messages]


def test_times_are_the_orders_own_and_never_go_back(backend: Backend) -> None:
    async def main() -> None:
        order = await backend.open()
        try:
            before = time.time_ns() // 1_000_000
            for i in range(8):
                await order.publish(f"t{i}", payload(i))
            after = time.time_ns() // 1_000_000
            first, second = await take(order, 1, 8), await take(order, 1, 8)
            times = [m.time_ms for m in first]
            assert times == sorted(times), "the order's clock went back"
            assert before - 5_000 <= times[0] and times[-1] <= after + 5_000
            assert times == [m.time_ms for m in second], "readers disagree on a message's time"
        finally:
            await order.close()

    run(main)


def test_read_from_start_and_from_the_middle(backend: Backend) -> None:
    async def main() -> None:
        order = await backend.open()
        try:
            for i in range(12):
                await order.publish(f"m{i}", payload(i))
            everything = await take(order, 1, 12)
            assert _pairs(everything) == [(i + 1, payload(i)) for i in range(12)]
            middle = await take(order, 7, 6)
            assert middle == everything[6:]
            # start below 1 means from the beginning
            assert (await take(order, 0, 1))[0].seq == 1
        finally:
            await order.close()

    run(main)


def test_concurrent_publishers_get_distinct_seqs_and_readers_see_one_order(
    backend: Backend,
) -> None:
    count = 200

    async def main() -> None:
        order = await backend.open()
        try:
            seqs = await asyncio.gather(*(order.publish(f"c{i}", payload(i)) for i in range(count)))
            assert sorted(seqs) == list(range(1, count + 1))
            by_seq = {seq: payload(i) for i, seq in enumerate(seqs)}
            first, second = await asyncio.gather(take(order, 1, count), take(order, 1, count))
            assert first == second
            assert [m.seq for m in first] == list(range(1, count + 1))
            assert all(m.payload == by_seq[m.seq] for m in first)
            assert await order.last_seq() == count
        finally:
            await order.close()

    run(main)


def test_duplicate_msg_id_returns_the_same_seq_and_adds_nothing(backend: Backend) -> None:
    async def main() -> None:
        order = await backend.open()
        try:
            # racing publishes of one new id (a retried send, members agreeing on a marker)
            racing = await asyncio.gather(*(order.publish("race", b"zero") for _ in range(10)))
            assert racing == [1] * 10
            first = await order.publish("same", b"one")
            await order.publish("other", b"two")
            again = await order.publish("same", b"one")
            retried = await asyncio.gather(*(order.publish("same", b"one") for _ in range(5)))
            assert first == again == 2
            assert retried == [2] * 5
            assert await order.last_seq() == 3
            assert [m.payload for m in await take(order, 1, 3)] == [b"zero", b"one", b"two"]
        finally:
            await order.close()

    run(main)


def test_payload_limit(backend: Backend) -> None:
    async def main() -> None:
        order = await backend.open()
        try:
            with pytest.raises(OrderingError, match="exceeds"):
                await order.publish("big", b"x" * (MAX_MESSAGE_BYTES + 1))
            assert await order.last_seq() == 0
            largest = b"y" * MAX_MESSAGE_BYTES
            assert await order.publish("largest", largest) == 1
            assert (await take(order, 1, 1))[0].payload == largest
        finally:
            await order.close()

    run(main)


def test_a_reader_started_first_sees_later_messages(backend: Backend) -> None:
    async def main() -> None:
        order = await backend.open()
        try:
            reader = asyncio.create_task(take(order, 1, 5))
            await asyncio.sleep(0.2)  # the reader is waiting on an empty order
            assert not reader.done()
            for i in range(5):
                await order.publish(f"m{i}", payload(i))
                await asyncio.sleep(0.01)
            got = await reader
            assert _pairs(got) == [(i + 1, payload(i)) for i in range(5)]
            # a reader at the tail gets only what comes next
            tail = asyncio.create_task(take(order, 6, 1))
            await asyncio.sleep(0.1)
            await order.publish("m5", payload(5))
            assert _pairs(await tail) == [(6, payload(5))]
        finally:
            await order.close()

    run(main)


def test_a_reader_ends_when_the_orderer_closes(backend: Backend) -> None:
    async def main() -> None:
        order = await backend.open()
        await order.publish("m0", payload(0))
        seen: list[int] = []

        async def read_all() -> None:
            async for message in order.read(1):
                seen.append(message.seq)

        reader = asyncio.create_task(read_all())
        # Closed once the reader has the message and waits for the next: a fixed pause
        # was too short on a loaded machine (the reader had seen nothing yet).
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await order.close()
        await asyncio.wait_for(reader, 5)
        assert seen == [1]
        with pytest.raises(OrderingError):
            await order.publish("m1", payload(1))

    run(main)


# Only the durable backends: the in-memory solo order is, by design, gone with its process.
@pytest.mark.parametrize("backend", ["solo-sqlite", "jetstream"], indirect=True)
def test_reopening_keeps_everything(backend: Backend) -> None:
    assert backend.durable

    async def main() -> None:
        order = await backend.open()
        for i in range(20):
            await order.publish(f"m{i}", payload(i))
        before = await take(order, 1, 20)
        await order.close()

        order = await backend.open()
        try:
            assert await order.last_seq() == 20
            assert await take(order, 1, 20) == before
            assert await order.publish("m3", payload(3)) == 4  # still de-duplicated
            assert await order.publish("m20", payload(20)) == 21
        finally:
            await order.close()

    run(main)


async def _hear(
    sender: Orderer, listeners: list[Orderer], message: bytes, timeout: float = 20.0
) -> list[list[bytes]]:
    """Broadcast ``message`` from ``sender`` until every listener heard it; what each heard.

    Sent again until heard: a listener starts listening when its iterator first
    runs (and on NATS once its subscription reached the servers).
    """
    heard: list[list[bytes]] = [[] for _ in listeners]

    async def listen(order: Orderer, into: list[bytes]) -> None:
        async for payload in order.broadcasts():
            into.append(payload)

    tasks = [asyncio.create_task(listen(o, into)) for o, into in zip(listeners, heard, strict=True)]
    try:
        deadline = time.monotonic() + timeout
        while not all(heard):
            assert time.monotonic() < deadline, f"not heard within {timeout} s: {heard}"
            await sender.broadcast(message)
            await asyncio.sleep(0.02)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return heard


def test_a_broadcast_reaches_every_listener_and_stays_out_of_the_order(
    backend: Backend,
) -> None:
    async def main() -> None:
        order = await backend.open()
        try:
            await order.publish("m0", payload(0))
            heard = await _hear(order, [order, order], b"vote for block 1")
            assert all(set(got) == {b"vote for block 1"} for got in heard), heard
            assert await order.last_seq() == 1, "a broadcast went into the order"
            assert _pairs(await take(order, 1, 1)) == [(1, payload(0))]
            with pytest.raises(OrderingError):
                await order.broadcast(b"x" * (MAX_MESSAGE_BYTES + 1))
        finally:
            await order.close()

    run(main)


def test_broadcast_listeners_end_when_the_orderer_closes(backend: Backend) -> None:
    async def main() -> None:
        order = await backend.open()
        heard: list[bytes] = []

        async def listen() -> None:
            async for message in order.broadcasts():
                heard.append(message)

        listener = asyncio.create_task(listen())
        deadline = time.monotonic() + 20
        while not heard:  # listening (on NATS: subscribed) before the close
            assert time.monotonic() < deadline, "the broadcast was never heard"
            await order.broadcast(b"hello")
            await asyncio.sleep(0.02)
        await order.close()
        await asyncio.wait_for(listener, 5)
        with pytest.raises(OrderingError):
            await order.broadcast(b"after close")

    run(main)


@pytest.mark.parametrize("backend", ["jetstream"], indirect=True)
def test_a_jetstream_broadcast_reaches_other_connections(backend: Backend) -> None:
    async def main() -> None:
        sender, other = await backend.open(), await backend.open()
        try:
            heard = await _hear(sender, [other, sender], b"vote")
            assert all(set(got) == {b"vote"} for got in heard), heard
            assert await other.last_seq() == 0
        finally:
            await sender.close()
            await other.close()

    run(main)


# -- JetStream only: failover and durability on a real cluster -------------------------------


def test_jetstream_connect_failures_are_clear(nats_cluster: NatsCluster) -> None:
    async def main() -> None:
        with pytest.raises(
            OrderingError, match=r"cannot connect to NATS at nats://127\.0\.0\.1:1 "
        ):
            await JetStreamOrderer.connect(
                ["nats://127.0.0.1:1"], stream="NOPE", subject="nope", retry_for=1
            )
        urls = nats_cluster.client_urls()
        tag = uuid.uuid4().hex[:12]
        with pytest.raises(OrderingError, match=f"stream M_{tag} does not exist"):
            await JetStreamOrderer.connect(
                urls, stream=f"M_{tag}", subject=f"m.{tag}", create=False
            )
        order = await JetStreamOrderer.connect(urls, stream=f"M_{tag}", subject=f"m.{tag}")
        await order.close()
        with pytest.raises(OrderingError, match="exists with subjects"):
            await JetStreamOrderer.connect(urls, stream=f"M_{tag}", subject=f"other.{tag}")

    run(main)


def _stream_leader(cluster: NatsCluster, stream: str) -> int:
    """Index of the node leading ``stream``, from the monitoring endpoint."""
    for node in cluster.nodes:
        if not node.running:
            continue
        url = f"{node.monitor_url}/jsz?streams=true"
        with urllib.request.urlopen(url, timeout=2) as resp:
            info = json.load(resp)
        for account in info.get("account_details", []):
            for entry in account.get("stream_detail", []):
                if entry["name"] == stream:
                    leader = entry.get("cluster", {}).get("leader")
                    return [n.name for n in cluster.nodes].index(leader)
    raise AssertionError(f"no leader found for {stream}")


def test_jetstream_survives_killing_the_stream_leader(fault_cluster: NatsCluster) -> None:
    backend = jetstream_backend(fault_cluster)

    async def main() -> None:
        order = await backend.open()
        assert isinstance(order, JetStreamOrderer)
        try:
            reader = asyncio.create_task(take(order, 1, 60, timeout=40))
            for i in range(20):
                await order.publish(f"m{i}", payload(i))
            victim = _stream_leader(fault_cluster, order.stream)
            fault_cluster.kill_node(victim)
            # publishing and reading go on with 2 of 3 nodes
            for i in range(20, 40):
                assert await order.publish(f"m{i}", payload(i)) == i + 1
            fault_cluster.start_node(victim)
            for i in range(40, 60):
                assert await order.publish(f"m{i}", payload(i)) == i + 1
            expected = [(i + 1, payload(i)) for i in range(60)]
            assert _pairs(await reader) == expected
            # the restarted node serves the same order on its own
            other = await JetStreamOrderer.connect(
                [fault_cluster.nodes[victim].client_url],
                stream=order.stream,
                subject=order.subject,
                create=False,
            )
            try:
                assert await other.last_seq() == 60
                assert _pairs(await take(other, 1, 60)) == expected
            finally:
                await other.close()
        finally:
            await order.close()

    run(main)


def test_jetstream_keeps_every_acknowledged_message_when_all_nodes_restart(
    fault_cluster: NatsCluster,
) -> None:
    backend = jetstream_backend(fault_cluster)

    async def main() -> list[int]:
        order = await backend.open()
        try:
            return list(
                await asyncio.gather(*(order.publish(f"m{i}", payload(i)) for i in range(100)))
            )
        finally:
            await order.close()

    acked = run(main)
    assert sorted(acked) == list(range(1, 101))
    for node in fault_cluster.nodes:  # every ack was fsynced on a quorum before it was sent
        with urllib.request.urlopen(f"{node.monitor_url}/varz", timeout=2) as resp:
            assert json.load(resp)["jetstream"]["config"]["sync_always"] is True
    for index in range(len(fault_cluster.nodes)):
        fault_cluster.kill_node(index)
    assert fault_cluster.pids() == []
    fault_cluster.start()

    async def after() -> None:
        order = await backend.open()
        try:
            assert await order.last_seq() == 100
            got = await take(order, 1, 100)
            by_seq = {seq: payload(i) for i, seq in enumerate(acked)}
            assert [(m.seq, m.payload) for m in got] == sorted(by_seq.items())
            assert await order.publish("m100", payload(100)) == 101
        finally:
            await order.close()

    run(after)
