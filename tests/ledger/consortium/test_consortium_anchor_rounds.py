"""Anchor-round cuts (decision 0053): a block is cut once every member that anchored in
the previous block with anchors has anchored again, without a cut marker.

With ``SLOW`` parameters no member's cut timer fires during a test, so a block cut
here without a published marker was cut by the anchor-round rule, and nothing else.
"""

from __future__ import annotations

import asyncio

from consortium_net import (
    FakeMonotonic,
    MakeNetwork,
    Network,
    anchor,
    anchors_in_order,
    block_tx_hashes,
    now_ms,
    order_messages,
    publish_marker,
    publish_tx,
    seen_by_all,
    tips,
)

from medledger.core.consortium import ConsortiumParams
from medledger.core.encoding import parse_canonical
from medledger.core.models import BlockHeader
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import verify_chain

#: Cut timers that never fire within a test.
SLOW = ConsortiumParams(cut_after_ms=600_000)
#: Parameters as a genesis document written before ``anchor_round_cut`` existed reads.
SLOW_OLD_RULE = ConsortiumParams.from_json({"cut_after_ms": 600_000})
MEMBERS = ("h0", "h1", "h2", "h3")


async def cut_by_marker(net: Network, height: int, by: str) -> None:
    """Publish ``by``'s marker for ``height`` and wait until the block is final everywhere."""
    await publish_marker(net.orderer, net.chain_id, height, net.keys[by], f"marker-{height}")
    for member in net.members.values():
        await member.wait_final(height, timeout=5)


async def first_round_by_marker(net: Network, members: tuple[str, ...]) -> None:
    """Round 0: nothing anchored before, so only a marker cuts block 1."""
    await anchors_in_order(net, members, 0)
    assert tips(net) == {0}, "a first round of anchors was cut without a marker"
    await cut_by_marker(net, 1, "h0")


def test_the_last_anchor_of_a_round_cuts_the_block(network: MakeNetwork) -> None:
    net = network(4, params=SLOW)
    second_round: list[bytes] = []

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await first_round_by_marker(net, MEMBERS)
        second_round.extend(await anchors_in_order(net, MEMBERS[:-1], 1))
        assert tips(net) == {1}, "the block was cut before the round was complete"
        second_round.append(await anchor(net, MEMBERS[-1], 1))
        # No marker: the fourth anchor completes the round and cuts block 2.
        for member in net.members.values():
            await member.wait_final(2, timeout=5)
        assert tips(net) == {2}

    net.run(scenario)
    for mid in MEMBERS:
        store = net.open_store(net.consortium_path(mid))
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))
        assert block_tx_hashes(net, mid, 2) == second_round
        assert BlockHeader.decode(store.block(2).header_bytes).tx_count == 4


def test_a_genesis_without_the_parameter_keeps_waiting_for_a_marker(
    network: MakeNetwork,
) -> None:
    """A consortium founded before the rule existed replays to the same blocks."""
    net = network(4, params=SLOW_OLD_RULE)
    assert "anchor_round_cut" not in net.genesis.to_json()["params"]
    assert not net.genesis.params.anchor_round_cut

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await first_round_by_marker(net, MEMBERS)
        await anchors_in_order(net, MEMBERS, 1)
        assert tips(net) == {1}, "a complete round was cut under the old rule"
        await cut_by_marker(net, 2, "h1")

    net.run(scenario)


def test_a_member_that_stops_anchoring_leaves_the_round(network: MakeNetwork) -> None:
    """h3 stops anchoring: one block waits for a marker, then the round is h0, h1 and h2."""
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await first_round_by_marker(net, MEMBERS)
        await anchors_in_order(net, MEMBERS[:-1], 1)
        assert tips(net) == {1}, "h3's anchor is still expected in this round"
        await cut_by_marker(net, 2, "h2")
        # The round is now h0, h1, h2: their next anchors cut block 3 without a marker.
        for mid in MEMBERS[:-1]:
            await anchor(net, mid, 2)
        for member in net.members.values():
            await member.wait_final(3, timeout=5)
        assert tips(net) == {3}

    net.run(scenario)
    for mid in MEMBERS:
        verify_chain(net.open_store(net.consortium_path(mid)), policy=ConsortiumPolicy(net.genesis))


def test_other_transactions_neither_complete_nor_reset_the_round(network: MakeNetwork) -> None:
    """A block of other transactions keeps the round; they ride with the anchors."""
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await first_round_by_marker(net, MEMBERS)
        access = net.access("h1")
        await publish_tx(net.orderer, access)
        await seen_by_all(net, access.hash())
        assert tips(net) == {1}, "a non-anchor transaction completed a round"
        await cut_by_marker(net, 2, "h0")
        # Block 2 had no anchors: the expected round is still all four members.
        await anchors_in_order(net, MEMBERS[:-1], 1)
        assert tips(net) == {2}
        await anchor(net, MEMBERS[-1], 1)
        for member in net.members.values():
            await member.wait_final(3, timeout=5)

    net.run(scenario)


#: A short cut timer and a long interval: a marker for a block of anchors alone
#: waits half the interval (10 s on the test's clock), any other block ``cut_after_ms``.
PATIENT = ConsortiumParams(cut_after_ms=50, anchor_interval_ms=20_000)


async def markers_for(net: Network, height: int) -> int:
    """How many cut markers for ``height`` are in the order."""
    count = 0
    for _, payload in await order_messages(net.orderer):
        doc = parse_canonical(payload)
        if isinstance(doc, dict) and doc.get("kind") == "cut" and doc.get("height") == height:
            count += 1
    return count


async def next_slot_anchors(net: Network, members: tuple[str, ...]) -> list[bytes]:
    """Anchors of ``members`` signed one interval from now, once every member has them."""
    slot = now_ms() + PATIENT.anchor_interval_ms
    hashes = [await anchor(net, mid, 1, time_ms=slot) for mid in members]
    for tx_hash in hashes:
        await seen_by_all(net, tx_hash)
    return hashes


def test_a_block_of_anchors_waits_half_an_interval_for_its_round(network: MakeNetwork) -> None:
    """Decision 0067: three of four anchors are in; no marker overtakes the fourth at
    ``cut_after_ms``, only once half an anchor interval has passed."""
    net = network(4, params=PATIENT)
    clock = FakeMonotonic()

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS, monotonic=clock)
        await first_round_by_marker(net, MEMBERS)
        # The next slot's anchors: h3's is still to come.
        second_round = await next_slot_anchors(net, MEMBERS[:-1])
        clock.now = 20 * PATIENT.cut_after_ms / 1000
        await asyncio.sleep(0.3)  # many checks of every member's cut timer
        assert tips(net) == {1}, "a marker cut the round before half an interval"
        assert await markers_for(net, 2) == 0
        clock.now = PATIENT.anchor_interval_ms / 2000 + 0.01
        for member in net.members.values():
            await member.wait_final(2, timeout=5)
        assert await markers_for(net, 2) >= 1
        assert block_tx_hashes(net, "h0", 2) == second_round

    net.run(scenario)


def test_a_block_with_other_transactions_is_cut_after_cut_after_ms(network: MakeNetwork) -> None:
    """Another tx beside the anchors is not kept waiting for the round."""
    net = network(4, params=PATIENT)
    clock = FakeMonotonic()

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS, monotonic=clock)
        await first_round_by_marker(net, MEMBERS)
        anchors = await anchors_in_order(net, MEMBERS[:-1], 1)
        access = net.access("h1")
        await publish_tx(net.orderer, access)
        await seen_by_all(net, access.hash())
        clock.now = PATIENT.cut_after_ms / 1000 + 0.01
        for member in net.members.values():
            await member.wait_final(2, timeout=5)
        assert block_tx_hashes(net, "h0", 2) == [*anchors, access.hash()]

    net.run(scenario)


def test_a_round_whose_missing_member_already_anchored_this_slot_is_cut_after_cut_after_ms(
    network: MakeNetwork,
) -> None:
    """h0's slot-2 anchor joined block 2 with the others' slot-1 anchors. Waiting for h0
    again would cut the others' slot-2 anchors only with h0's slot-3 one, a slot late,
    and so on for every later block; the marker goes out after ``cut_after_ms``."""
    net = network(4, params=PATIENT)
    clock = FakeMonotonic()
    interval = PATIENT.anchor_interval_ms

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS, monotonic=clock)
        await first_round_by_marker(net, MEMBERS)
        slot = now_ms()
        await anchors_in_order(net, MEMBERS[1:], 1)
        await anchor(net, "h0", 2, time_ms=slot + interval)  # early: completes the round
        for member in net.members.values():
            await member.wait_final(2, timeout=5)
        late = [await anchor(net, mid, 2, time_ms=slot + interval) for mid in MEMBERS[1:]]
        for tx_hash in late:
            await seen_by_all(net, tx_hash)
        clock.now = PATIENT.cut_after_ms / 1000 + 0.01
        for member in net.members.values():
            await member.wait_final(3, timeout=5)
        assert block_tx_hashes(net, "h0", 3) == late

    net.run(scenario)
