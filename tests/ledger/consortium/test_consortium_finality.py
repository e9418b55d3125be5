"""Determinism and finality of the consortium chain with in-process members."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from consortium_net import (
    MakeNetwork,
    Network,
    now_ms,
    publish_marker,
    publish_tx,
    wait_until,
)

from medledger.core.consortium import ConsortiumParams, MemberSet
from medledger.core.errors import NotFound, StorageError
from medledger.core.models import BlockHeader
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import verify_chain
from medledger.storage.sqlite.chain import SqliteChainStore


def assert_identical_chains(net: Network, stores: dict[str, SqliteChainStore], height: int) -> None:
    """Every store holds exactly blocks 0..height with byte-identical headers and txs."""
    reference_id = next(iter(stores))
    reference = stores[reference_id]
    for mid, store in stores.items():
        head = store.head()
        assert head is not None and head.height == height, (mid, head and head.height)
        for h in range(height + 1):
            mine, ref = store.block(h), reference.block(h)
            assert mine.header_bytes == ref.header_bytes, f"{mid} block {h} header differs"
            assert mine.block_hash == ref.block_hash
            assert mine.tx_data == ref.tx_data, f"{mid} block {h} transactions differ"
            assert mine.first_index == ref.first_index


def assert_certificates(net: Network, store: SqliteChainStore) -> None:
    """Each stored block >= 1 carries >= quorum distinct valid founding-member signatures."""
    members = MemberSet(net.genesis.members)
    for block in store.iter_blocks(1):
        signers = members.quorum_signers(block.block_hash, block.signatures)
        assert len(signers) >= members.quorum, (block.height, signers)
        assert len(block.signatures) == len({s.signer for s in block.signatures})


def test_late_member_builds_byte_identical_blocks(network: MakeNetwork) -> None:
    net = network(4)
    late = "h3"

    async def scenario(net: Network) -> int:
        await net.start("h0", "h1", "h2")
        # 50 transactions ordered and final before h3 exists, in several blocks.
        for rnd in range(5):
            await net.submit_many(
                f"h{rnd % 3}", [net.access(f"h{i % 3}", f"h{(i + 1) % 4}") for i in range(10)]
            )
        before = await net.settle()
        assert before >= 5
        assert sum(h.tx_count for h in _headers(net.stores["h0"])[1:]) == 50
        (h3,) = await net.start(late)
        await h3.wait_final(before, timeout=10)
        # Ordering continues with all four members, h3 submitting too.
        for rnd in range(3):
            await net.submit_many(
                f"h{rnd + 1}", [net.access(f"h{(rnd + i) % 4}") for i in range(7)]
            )
        height = await net.settle()
        assert height > before
        for member in net.members.values():
            assert member.status()["diverged"] is None
        return height

    height = net.run(scenario)
    stores = {mid: net.open_store(net.consortium_path(mid)) for mid in ("h0", "h1", "h2", "h3")}
    assert_identical_chains(net, stores, height)
    total = sum(h.tx_count for h in _headers(stores["h3"])[1:])
    assert total == 50 + 21
    for store in stores.values():
        report = verify_chain(store, policy=ConsortiumPolicy(net.genesis))
        assert report.blocks == height + 1
        assert report.log_size == total + 1
        assert_certificates(net, store)


def _headers(store: SqliteChainStore) -> list[BlockHeader]:
    return [BlockHeader.decode(b.header_bytes) for b in store.iter_blocks()]


def test_block_times_come_from_the_order_and_never_go_backwards(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3")
        for _ in range(4):
            await net.submit_many("h0", [net.access("h1"), net.access("h2")])
        await net.settle()

    net.run(scenario)
    headers = _headers(net.open_store(net.consortium_path("h2")))
    assert headers[0].time_ms == net.genesis.time_ms
    times = [h.time_ms for h in headers]
    assert times == sorted(times)
    assert all(h.proposer == net.genesis.consortium for h in headers)


#: Timers that never fire within a test: blocks are cut by the test's markers only.
SLOW = ConsortiumParams(cut_after_ms=600_000)
DAY_MS = 24 * 3600 * 1000


async def cut_block(net: Network, times: list[int], marker_by: str = "h0") -> int:
    """Publish access txs with these ``time_ms``, then one member's marker; wait until final."""
    h0 = net.members["h0"]
    height = h0.status()["tip_height"] + 1
    txs = [net.tx("access", net.access_body("h1"), "h1", time_ms=t) for t in times]
    for tx in txs:
        await publish_tx(net.orderer, tx)
    await wait_until(
        lambda: all(tx.hash() in m.state.seen for m in net.members.values() for tx in txs),
        "every member to accept the transactions",
    )
    await publish_marker(net.orderer, net.chain_id, height, net.keys[marker_by], f"marker-{height}")
    for member in net.members.values():
        await member.wait_final(height, timeout=5)
    header = BlockHeader.decode(net.stores["h0"].block(height).header_bytes)
    assert header.tx_count == len(times)
    return header.time_ms


def test_block_time_is_the_members_clocks_not_the_transactions(network: MakeNetwork) -> None:
    """Block time = the lower median of the members' clock readings signed in their votes
    (capped at max_clock_skew_ms after the block's newest tx, never before the previous
    block): the same on every member, and no signed tx time_ms — a day ahead or seconds
    behind — moves it."""
    net = network(4, params=SLOW)
    t = now_ms()

    async def scenario(net: Network) -> list[tuple[int, int, int]]:
        await net.start("h0", "h1", "h2", "h3")
        out = []
        for tx_times in ([t + DAY_MS], [t - 5000, t + 10], [t + 40, t + 20, t - 29_000], [t + 50]):
            before = now_ms()
            block_time = await cut_block(net, tx_times)
            out.append((before, block_time, now_ms()))
        return out

    results = net.run(scenario)
    # Block 1 has no readings yet (no votes before it): it is dated by the genesis.
    assert results[0][1] == net.genesis.time_ms
    # Every later block by the votes on the block before it: cast after that block's
    # transactions were published, and before this block was final.
    for (before, _, _), (_, block_time, after) in itertools.pairwise(results):
        assert before <= block_time <= after
    times = [block_time for _, block_time, _ in results]
    assert times == sorted(times)
    for mid in ("h0", "h1", "h2", "h3"):
        store = net.open_store(net.consortium_path(mid))
        assert [BlockHeader.decode(b.header_bytes).time_ms for b in store.iter_blocks(1)] == times
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))


def test_a_far_future_transaction_cannot_stall_later_blocks(network: MakeNetwork) -> None:
    """One member's transaction dated a day ahead (alone in its block, as the cut timer
    leaves it) must not make every honest transaction after it "older than the allowed
    clock skew": either it is refused, or it does not set the block time."""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3")
        await net.submit_many("h0", [net.access("h0")])
        ahead = net.tx("access", net.access_body("h3"), "h3", time_ms=now_ms() + DAY_MS)
        await publish_tx(net.orderer, ahead)
        await asyncio.sleep(0.1)  # cut on its own by the timers (and final if accepted)
        await net.settle()
        receipts = await net.submit_many("h1", [net.access("h1"), net.access("h2")])
        assert all(r.height > 1 for r in receipts)
        await net.settle()

    net.run(scenario)
    skew = net.genesis.params.max_clock_skew_ms
    store = net.open_store(net.consortium_path("h2"))
    for block in store.iter_blocks(1):
        assert BlockHeader.decode(block.header_bytes).time_ms <= now_ms() + skew


def test_finality_with_one_member_down(network: MakeNetwork) -> None:
    """3 of 4 is a quorum: h3 never runs, every block is still final and stored."""
    net = network(4)

    async def scenario(net: Network) -> int:
        await net.start("h0", "h1", "h2")
        receipts = await net.submit_many("h0", [net.access("h1") for _ in range(5)])
        receipts += await net.submit_many("h2", [net.access("h0", "h3") for _ in range(5)])
        assert all(r.height >= 1 for r in receipts)
        return await net.settle()

    height = net.run(scenario)
    h3_fp = net.keys["h3"].fingerprint
    for mid in ("h0", "h1", "h2"):
        store = net.open_store(net.consortium_path(mid))
        assert_certificates(net, store)
        for block in store.iter_blocks(1):
            signers = {s.signer for s in block.signatures}
            assert h3_fp not in signers
            assert len(signers) == 3
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))
        assert store.head() is not None
        assert store.head().height == height  # type: ignore[union-attr]


def test_no_finality_below_quorum_then_recovery(network: MakeNetwork) -> None:
    """With 2 of 4 up a block is cut but neither final nor stored; a restart completes it."""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2")
        await net.submit_many("h0", [net.access("h0") for _ in range(3)])
        final = await net.settle()
        await net.stop("h2")  # now 2 of 4: h0, h1
        h0, h1 = net.members["h0"], net.members["h1"]
        pending = net.spawn(h0.submit(net.access("h1"), timeout=20))
        await wait_until(lambda: h0.status()["tip_height"] == final + 1, "the block to be cut")
        await wait_until(lambda: h1.status()["tip_height"] == final + 1, "the block to be cut")
        await asyncio.sleep(0.3)  # dozens of cut periods
        assert not pending.done()
        for member in (h0, h1):
            assert member.final_height == final
            store = net.stores[member.member_id]
            with pytest.raises(NotFound):
                store.block(final + 1)
            head = store.head()
            assert head is not None and head.height == final
        # h2 comes back on its old store and replays the stream from seq 1.
        (h2,) = await net.start("h2")
        receipt = await asyncio.wait_for(pending, 10)
        assert receipt.height == final + 1
        await h2.wait_final(final + 1, timeout=10)
        await net.settle()
        # Finality continues with these three.
        more = await net.submit_many("h2", [net.access("h2") for _ in range(3)])
        assert min(r.height for r in more) > final + 1
        await net.settle()
        assert h2.status()["diverged"] is None

    net.run(scenario)
    stores = {mid: net.open_store(net.consortium_path(mid)) for mid in ("h0", "h1", "h2")}
    head = stores["h0"].head()
    assert head is not None
    assert_identical_chains(net, stores, head.height)
    for store in stores.values():
        assert_certificates(net, store)
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))


def test_crashed_member_rejoins_on_a_fresh_store(network: MakeNetwork) -> None:
    """A member that lost its store rebuilds the whole chain from the order."""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2")
        await net.submit_many("h1", [net.access("h1") for _ in range(4)])
        await net.stop("h2")
        net.consortium_path("h2").rename(net.consortium_path("h2").with_suffix(".lost"))
        (h2,) = await net.start("h2")
        await net.settle("h0", "h1", "h2")
        assert h2.final_height >= 1
        await net.submit_many("h0", [net.access("h0") for _ in range(2)])
        await net.settle()
        assert h2.status()["diverged"] is None

    net.run(scenario)
    stores = {mid: net.open_store(net.consortium_path(mid)) for mid in ("h0", "h1", "h2")}
    head = stores["h0"].head()
    assert head is not None
    assert_identical_chains(net, stores, head.height)
    verify_chain(stores["h2"], policy=ConsortiumPolicy(net.genesis))


def test_a_member_whose_store_failed_catches_up_without_another_write(
    network: MakeNetwork,
) -> None:
    """Disk full while a final block was stored: once the disk is back, the member stores
    it on its own. (It used to wait for the next block's votes, one block behind, with a
    stale view of anchors that made its own anchors be refused.)"""
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3")
        store = net.stores["h3"]
        real_append = store.append_block
        failures: list[int] = []

        def disk_full(block: Any) -> None:
            failures.append(block.header.height)
            raise StorageError(f"{store.path}: database or disk is full")

        store.append_block = disk_full  # type: ignore[method-assign]
        await net.submit_many("h0", [net.access("h0")])
        final = net.members["h0"].final_height
        await wait_until(lambda: len(failures) >= 1, "h3's store to fail")
        assert net.members["h3"].final_height < final
        store.append_block = real_append  # type: ignore[method-assign]
        await wait_until(
            lambda: net.members["h3"].final_height == final, "h3 to store the final block"
        )
        head = store.head()
        assert head is not None and head.height == final
        assert head.block_hash == net.stores["h0"].block_hash(final)

    net.run(scenario)
