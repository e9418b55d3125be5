"""Idle notices (decision 0066): a member with nothing new to anchor at a slot says so.

``{"kind": "idle", "height": h, "time_ms": t, "signature": <member over
idle_notice_bytes>}`` goes through the order, is in no block, and completes the
anchor round for the pending block ``h`` in place of that member's anchor, if ``t``
is within half an interval of the newest pending anchor's time. With ``SLOW`` parameters no member's
cut timer fires during a test, so a block cut here without a published marker was
cut by the round rule.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from consortium_net import (
    FakeMonotonic,
    MakeNetwork,
    Network,
    OrdererWrapper,
    anchor,
    anchors_in_order,
    block_tx_hashes,
    idle_notice_bytes,
    idle_payload,
    marker_bytes,
    marker_payload,
    now_ms,
    order_messages,
    publish_marker,
    publish_tx,
    seen_by_all,
    tips,
    wait_until,
)

from medledger.core.consortium import ConsortiumParams, clock_bytes
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Signature
from medledger.ledger.anchoring import Anchorer
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.ordering.port import Orderer
from medledger.ledger.verify import verify_chain

#: Cut timers that never fire within a test; anchor rounds and idle notices on. The
#: minute-long anchor interval keeps every anchor a test stamps "now" in the slot
#: it notifies at (a member names the block after the pending one if that still
#: collects an earlier slot's anchors).
SLOW = ConsortiumParams(cut_after_ms=600_000, anchor_interval_ms=60_000)
INTERVAL_MS = SLOW.anchor_interval_ms
#: A genesis written after anchor rounds (0053) but before idle notices existed.
SLOW_ROUNDS_ONLY = ConsortiumParams.from_json({"cut_after_ms": 600_000, "anchor_round_cut": True})
MEMBERS = ("h0", "h1", "h2", "h3")
OUTSIDER = SigningKey.generate()
#: The genesis anchor interval in seconds: notices are sent for two of them after
#: the newest block with anchors was cut.
INTERVAL_S = SLOW.anchor_interval_ms / 1000


async def everyone_read_so_far(net: Network) -> bytes:
    """Publish an access tx and wait until every member has it: all before it is read.

    The tx joins the pending block; it neither completes nor resets a round.
    """
    tx = net.access("h1")
    await publish_tx(net.orderer, tx)
    await seen_by_all(net, tx.hash())
    return tx.hash()


async def final_everywhere(net: Network, height: int) -> None:
    for member in net.members.values():
        await member.wait_final(height, timeout=5)


async def first_round_by_marker(net: Network) -> None:
    """Round 0: every member anchors; nothing anchored before, so a marker cuts block 1."""
    await anchors_in_order(net, MEMBERS, 0)
    assert tips(net) == {0}, "a first round of anchors was cut without a marker"
    await publish_marker(net.orderer, net.chain_id, 1, net.keys["h0"], "marker-1")
    await final_everywhere(net, 1)


async def publish_notice(net: Network, mid: str, height: int) -> None:
    payload = idle_payload(net.chain_id, height, net.keys[mid])
    await net.orderer.publish(f"test-idle-{height}-{mid}", payload)


async def idle_notices(net: Network) -> list[dict[str, Any]]:
    """Every idle notice in the order, parsed."""
    out = []
    for _, payload in await order_messages(net.orderer):
        doc = parse_canonical(payload)
        if isinstance(doc, dict) and doc.get("kind") == "idle":
            out.append(doc)
    return out


async def round_with_an_idle_member(net: Network) -> list[bytes]:
    """Rounds 0-2; in round 1 h3 has nothing new and sends a notice first."""
    await first_round_by_marker(net)
    await publish_notice(net, "h3", 2)
    second_round = await anchors_in_order(net, MEMBERS[:2], 1)
    assert tips(net) == {1}, "the block was cut before the round was complete"
    second_round.append(await anchor(net, "h2", 1))
    # No marker: h2's anchor, the last of (anchors + notice), cuts block 2.
    await final_everywhere(net, 2)
    assert tips(net) == {2}
    # The idle member stayed in the round: round 2 is cut by the last of four anchors.
    await anchors_in_order(net, MEMBERS[:3], 2)
    assert tips(net) == {2}, "round 2 was cut without h3's anchor"
    await anchor(net, "h3", 2)
    await final_everywhere(net, 3)
    return second_round


def test_an_idle_members_notice_completes_the_round(network: MakeNetwork) -> None:
    net = network(4, params=SLOW)
    assert net.genesis.to_json()["params"]["anchor_idle_notice"] is True

    async def scenario(net: Network) -> list[bytes]:
        await net.start(*MEMBERS)
        return await round_with_an_idle_member(net)

    second_round = net.run(scenario)
    for mid in MEMBERS:
        store = net.open_store(net.consortium_path(mid))
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))
        # The notice is in no block: block 2 holds exactly the three anchors.
        assert block_tx_hashes(net, mid, 2) == second_round
        assert BlockHeader.decode(store.block(3).header_bytes).tx_count == 4


def test_a_replay_from_the_start_cuts_the_same_blocks(network: MakeNetwork) -> None:
    """An observer reading the stream from the start counts the notice where the members did."""
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await round_with_an_idle_member(net)
        (observer,) = await net.start("h9")  # not in the genesis: replays, never votes
        await observer.wait_final(3, timeout=5)
        assert observer.status()["tip_height"] == 3

    net.run(scenario)
    replayed = net.open_store(net.consortium_path("h9"))
    original = net.open_store(net.consortium_path("h0"))
    verify_chain(replayed, policy=ConsortiumPolicy(net.genesis))
    for height in range(4):
        assert replayed.block(height).block_hash == original.block(height).block_hash


def test_without_the_parameter_a_notice_cuts_nothing(network: MakeNetwork) -> None:
    """A consortium founded before idle notices keeps the 0053 rule and sends none."""
    net = network(4, params=SLOW_ROUNDS_ONLY)
    assert "anchor_idle_notice" not in net.genesis.to_json()["params"]
    assert net.genesis.params.anchor_round_cut and not net.genesis.params.anchor_idle_notice

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await first_round_by_marker(net)
        await anchors_in_order(net, MEMBERS[:3], 1)
        await publish_notice(net, "h3", 2)
        assert not net.members["h3"].notify_idle()
        await everyone_read_so_far(net)
        assert tips(net) == {1}, "an idle notice counted where the genesis has them off"
        await publish_marker(net.orderer, net.chain_id, 2, net.keys["h1"], "marker-2")
        await final_everywhere(net, 2)
        assert len(await idle_notices(net)) == 1  # the test's own, nothing from a member

    net.run(scenario)


async def publish_bad_notice(net: Network, bad: str) -> None:
    """Something that is not h3's idle notice for the pending height 2."""
    chain, key, height = net.chain_id, net.keys["h3"], 2
    now = now_ms()
    if bad == "early":
        payload = idle_payload(chain, height + 1, key)
    elif bad == "earlier-slot":  # a notice that waited from a slot before the anchors'
        payload = idle_payload(chain, height, key, time_ms=now - INTERVAL_MS)
    elif bad == "later-slot":
        payload = idle_payload(chain, height, key, time_ms=now + INTERVAL_MS)
    elif bad == "late":
        payload = idle_payload(chain, height - 1, key)
    elif bad == "unsigned":
        payload = idle_payload(chain, height, None)
    elif bad == "outsider":
        payload = idle_payload(chain, height, OUTSIDER)
    elif bad == "forged-signer":  # an outsider's signature claiming to be h3's
        forged = OUTSIDER.sign(idle_notice_bytes(chain, height, now))
        sig = Signature(signer=key.fingerprint, alg=forged.alg, sig=forged.sig)
        doc = {"kind": "idle", "height": height, "time_ms": now, "signature": sig.to_json()}
        payload = canonical_bytes(doc)
    elif bad == "other-chain":
        other = idle_notice_bytes("private:h3", height, now)
        payload = idle_payload(chain, height, key, time_ms=now, signed=other)
    elif bad == "other-height-signature":
        other = idle_notice_bytes(chain, height + 1, now)
        payload = idle_payload(chain, height, key, time_ms=now, signed=other)
    elif bad == "other-time-signature":
        other = idle_notice_bytes(chain, height, now - 1)
        payload = idle_payload(chain, height, key, time_ms=now, signed=other)
    elif bad == "cut-marker-signature":  # a marker's signature does not make a notice
        payload = idle_payload(chain, height, key, signed=marker_bytes(chain, height))
    elif bad == "clock-signature":
        clock = clock_bytes(chain, height, now)
        payload = idle_payload(chain, height, key, time_ms=now, signed=clock)
    elif bad == "no-time":
        sig = key.sign(idle_notice_bytes(chain, height, now))
        doc = {"kind": "idle", "height": height, "signature": sig.to_json()}
        payload = canonical_bytes(doc)
    else:  # "string-height"
        payload = idle_payload(chain, str(height), key)
    await net.orderer.publish(f"bad-idle-{bad}", payload)


@pytest.mark.parametrize(
    "bad",
    [
        "early",
        "late",
        "earlier-slot",
        "later-slot",
        "unsigned",
        "outsider",
        "forged-signer",
        "other-chain",
        "other-height-signature",
        "other-time-signature",
        "cut-marker-signature",
        "clock-signature",
        "no-time",
        "string-height",
    ],
)
def test_only_a_members_notice_for_the_pending_height_counts(
    network: MakeNetwork, bad: str
) -> None:
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await first_round_by_marker(net)
        await anchors_in_order(net, MEMBERS[:3], 1)
        await publish_bad_notice(net, bad)
        await everyone_read_so_far(net)
        assert tips(net) == {1}, f"a bad idle notice ({bad}) completed the round"
        await publish_notice(net, "h3", 2)
        await final_everywhere(net, 2)
        assert tips(net) == {2}

    net.run(scenario)


def test_a_notice_signature_does_not_make_a_cut_marker(network: MakeNetwork) -> None:
    """Domain separation the other way: h3's notice signature in a cut marker cuts nothing."""
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await first_round_by_marker(net)
        await anchors_in_order(net, MEMBERS[:3], 1)
        doc = parse_canonical(marker_payload(net.chain_id, 2, None))
        notice_sig = net.keys["h3"].sign(idle_notice_bytes(net.chain_id, 2, now_ms()))
        doc["signature"] = notice_sig.to_json()
        await net.orderer.publish("marker-with-notice-signature", canonical_bytes(doc))
        await everyone_read_so_far(net)
        assert tips(net) == {1}, "an idle notice's signature cut a block as a marker"

    net.run(scenario)


def test_a_member_sends_notices_only_while_anchoring_is_active(network: MakeNetwork) -> None:
    net = network(4, params=SLOW)
    clock = FakeMonotonic()

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS, monotonic=clock)
        h3 = net.members["h3"]
        assert not h3.notify_idle(), "a notice before anyone ever anchored"
        await first_round_by_marker(net)  # block 1, with anchors, cut at 0.0
        await anchors_in_order(net, MEMBERS[:3], 1)
        clock.now = INTERVAL_S * 1.5
        assert h3.notify_idle()
        assert not h3.notify_idle(), "a second notice for the same height"
        await final_everywhere(net, 2)  # cut by h3's notice
        sent = await idle_notices(net)
        assert [n["height"] for n in sent] == [2]
        # Quiet: no anchors for longer than two intervals. Blocks of other
        # transactions go on being cut; nobody sends a notice for them.
        clock.now += 2 * INTERVAL_S + 0.01
        for height in (3, 4, 5):
            await everyone_read_so_far(net)
            assert not any(m.notify_idle() for m in net.members.values())
            await publish_marker(net.orderer, net.chain_id, height, net.keys["h0"], f"m{height}")
            await final_everywhere(net, height)
        assert len(await idle_notices(net)) == 1
        # Anchors pending again: the others' notices for this slot, held back while it
        # was quiet, go out as h0's anchor reaches them and complete the round.
        await anchors_in_order(net, ("h0",), 2)
        await final_everywhere(net, 6)
        assert [n["height"] for n in await idle_notices(net)] == [2, 6, 6, 6]

    net.run(scenario)


def test_after_a_quiet_spell_a_notice_follows_the_first_anchor_of_its_slot(
    network: MakeNetwork,
) -> None:
    """Decision 0070: the first block after a quiet spell is cut by its round, no marker."""
    net = network(4, params=SLOW)
    clock = FakeMonotonic()

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS, monotonic=clock)
        await first_round_by_marker(net)  # block 1, with anchors, cut at 0.0
        clock.now = 2 * INTERVAL_S + 0.01  # quiet
        # h1-h3 have nothing new at this slot; h0 has (its anchorer would not call).
        assert not any(net.members[mid].notify_idle() for mid in MEMBERS[1:])
        await everyone_read_so_far(net)
        assert await idle_notices(net) == [], "a quiet consortium stays quiet"
        assert tips(net) == {1}
        await anchors_in_order(net, ("h0",), 1)
        await final_everywhere(net, 2)  # no marker was published: the round cut it
        notices = await idle_notices(net)
        assert sorted(n["height"] for n in notices) == [2, 2, 2]
        member_of = {net.keys[mid].fingerprint: mid for mid in MEMBERS}
        assert sorted(member_of[n["signature"]["signer"]] for n in notices) == list(MEMBERS[1:])
        assert len(block_tx_hashes(net, "h0", 2)) == 2  # the access tx and h0's anchor

    net.run(scenario)


def test_the_anchorer_sends_a_notice_at_a_slot_with_nothing_new_while_active(
    network: MakeNetwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = network(4, params=SLOW)
    clock = FakeMonotonic()

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS, monotonic=clock)
        await first_round_by_marker(net)  # block 1 holds h3's anchor: nothing new since
        member = net.members["h3"]
        calls: list[bool] = []
        notify = member.notify_idle

        def counting_notify(*, anchor_on_the_way: bool = False) -> bool:
            sent = notify(anchor_on_the_way=anchor_on_the_way)
            calls.append(sent)
            return sent

        monkeypatch.setattr(member, "notify_idle", counting_notify)
        anchorer = Anchorer(
            institution="h3",
            chain=net.chains["h3"],
            member=member,
            key=net.keys["h3"],
            interval_ms=10,
        )
        anchorer.start()
        try:
            # Active (block 1 was cut "now"): h3's notice and the others' anchors cut block 2.
            await anchors_in_order(net, MEMBERS[:3], 1)
            await final_everywhere(net, 2)
            assert [n["height"] for n in await idle_notices(net)][:1] == [2]
            # Quiet for longer than two intervals (until then the anchorer may have
            # sent its notice for height 3 too); a block without anchors is cut.
            clock.now = 2 * INTERVAL_S + 0.01
            await everyone_read_so_far(net)
            await publish_marker(net.orderer, net.chain_id, 3, net.keys["h0"], "marker-3")
            await final_everywhere(net, 3)
            seen = len(calls)
            await wait_until(lambda: len(calls) >= seen + 3, "three more slots of the anchorer")
            assert not any(calls[seen:])
            quiet = [n["height"] for n in await idle_notices(net)]
            assert quiet in ([2], [2, 3])
            # Something new: the anchorer anchors at its next slot instead.
            await net.write_private("h3", 1, tag="new")
            await wait_until(
                lambda: (
                    (a := member.ordered_anchor("h3")) is not None
                    and a.log_size == net.chains["h3"].head.log_size
                ),
                "h3's new anchor in the order",
            )
            assert [n["height"] for n in await idle_notices(net)] == quiet
        finally:
            await anchorer.close()

    net.run(scenario)


class HeldNotices(OrdererWrapper):
    """The order as one member sees it: its idle notices wait until released.

    A notice then reaches the order after what the test publishes meanwhile, as
    one sent from a view that lags the order does.
    """

    def __init__(self, inner: Orderer) -> None:
        self._inner = inner
        self.released = asyncio.Event()
        self.held: list[str] = []

    async def publish(self, msg_id: str, payload: bytes) -> int:
        if msg_id.startswith("idle-"):
            self.held.append(msg_id)
            await self.released.wait()
        return await self._inner.publish(msg_id, payload)


async def start_with_held_notices(net: Network) -> HeldNotices:
    held = HeldNotices(net.orderer)
    await net.start(*MEMBERS[:3])
    await net.start("h3", orderer=held)
    return held


async def release(net: Network, held: HeldNotices, count: int) -> None:
    """Let h3's held notices (``count`` of them) into the order; wait until all read them."""
    await wait_until(lambda: len(held.held) == count, f"h3 to send {count} notice(s)")
    held.released.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(await idle_notices(net)) < count:
        assert loop.time() < deadline, "h3's released notices did not reach the order"
        await asyncio.sleep(0.005)
    await everyone_read_so_far(net)


@pytest.mark.parametrize("behind", ["earlier-anchor-pending", "own-anchor-on-the-way"])
def test_a_member_whose_view_lags_names_the_block_after(network: MakeNetwork, behind: str) -> None:
    """The pending block still collects an earlier slot's anchors: the notice names the
    next one, and counts there once it arrives after the earlier block was cut."""
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        held = await start_with_held_notices(net)
        await first_round_by_marker(net)
        earlier = now_ms() - 2 * INTERVAL_MS
        if behind == "earlier-anchor-pending":
            await seen_by_all(net, await anchor(net, "h0", 1, time_ms=earlier))
            assert net.members["h3"].notify_idle()
            await anchors_in_order(net, ("h1", "h2"), 1)
            await anchor(net, "h3", 1, time_ms=earlier)
        else:
            assert net.members["h3"].notify_idle(anchor_on_the_way=True)
            for mid in MEMBERS:
                await anchor(net, mid, 1, time_ms=earlier)
        await final_everywhere(net, 2)  # the earlier slot's round, complete
        await release(net, held, 1)
        assert [n["height"] for n in await idle_notices(net)] == [3]
        # This slot's anchors: h3's notice completes the round with the other three.
        await anchors_in_order(net, MEMBERS[:2], 2)
        assert tips(net) == {2}
        await anchor(net, "h2", 2)
        await final_everywhere(net, 3)

    net.run(scenario)


def test_a_notice_overtaken_by_an_earlier_slots_cut_is_sent_again(network: MakeNetwork) -> None:
    """h3 names block 2, which is cut with an earlier slot's anchors before its notice
    arrives: the notice for 2 changes nothing, the one sent again for 3 counts."""
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        held = await start_with_held_notices(net)
        await first_round_by_marker(net)
        assert net.members["h3"].notify_idle()  # names 2: nothing pending in its view
        # The earlier slot's anchors reach the order first (h3's own among them):
        # they complete the round and cut block 2 before h3's notice arrives.
        earlier = now_ms() - 2 * INTERVAL_MS
        for mid in MEMBERS:
            await anchor(net, mid, 1, time_ms=earlier)
        await final_everywhere(net, 2)
        await release(net, held, 2)
        assert [n["height"] for n in await idle_notices(net)] == [2, 3]
        await anchors_in_order(net, MEMBERS[:2], 2)
        assert tips(net) == {2}
        await anchor(net, "h2", 2)
        await final_everywhere(net, 3)

    net.run(scenario)


def test_a_notice_is_not_sent_again_once_its_slots_block_is_cut(network: MakeNetwork) -> None:
    """The block h3 named is cut holding this slot's anchors: no second notice."""
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        held = await start_with_held_notices(net)
        await first_round_by_marker(net)
        assert net.members["h3"].notify_idle()
        await anchors_in_order(net, MEMBERS[:3], 1)
        await publish_marker(net.orderer, net.chain_id, 2, net.keys["h0"], "marker-2")
        await final_everywhere(net, 2)
        await release(net, held, 1)
        assert [n["height"] for n in await idle_notices(net)] == [2]

    net.run(scenario)


class SteppedClock:
    """The members' wall clock: the system's, moved ahead by whole slots by the test."""

    def __init__(self) -> None:
        self.ahead_ms = 0

    def now_ms(self) -> int:
        return now_ms() + self.ahead_ms


def test_a_member_idle_again_at_the_next_slot_says_so_again_for_the_same_block(
    network: MakeNetwork,
) -> None:
    """A slot where every member is idle leaves a block of notices alone, still pending.
    The next slot's anchors join that block, and a member idle again must say so for
    that slot: its first notice is a slot too old to count beside them."""
    params = ConsortiumParams(cut_after_ms=600_000, anchor_interval_ms=1000)
    net = network(4, params=params)
    clock, wall = FakeMonotonic(), SteppedClock()

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS, monotonic=clock, clock=wall)
        await first_round_by_marker(net)  # every member anchored: all four in the round
        # Slot 1: nobody has anything new. Four notices for block 2, nothing to cut.
        assert all(net.members[mid].notify_idle() for mid in MEMBERS)
        for _ in range(500):  # bounded: 5 s
            if len(await idle_notices(net)) == 4:
                break
            await asyncio.sleep(0.01)
        await everyone_read_so_far(net)  # the notices are in every member's order
        assert tips(net) == {1}
        # Slot 2: three anchor, h3 is idle again and says so for the same block.
        wall.ahead_ms += params.anchor_interval_ms
        for mid in MEMBERS[:3]:
            await anchor(net, mid, 2, time_ms=wall.now_ms())
        assert net.members["h3"].notify_idle()
        await final_everywhere(net, 2)  # by the round: no marker was published
        notices = await idle_notices(net)
        assert [n["height"] for n in notices] == [2] * 5
        assert len(block_tx_hashes(net, "h0", 2)) == 4  # the access tx and three anchors

    net.run(scenario)
