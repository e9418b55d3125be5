"""Cut markers: ``{"kind": "cut", "height": h, "signature": <member over the marker bytes>}``.

The marker bytes are ``canonical_bytes({"chain": chain_id, "kind": "cut", "height": h})``.
Only a member's valid marker for the next height cuts the pending block; anything else
is ignored by every member. With ``SLOW`` parameters no member's timer ever sends a
marker during a test, so every cut below comes from a marker the test publishes.
"""

from __future__ import annotations

from typing import Any

import pytest
from consortium_net import (
    FAST,
    MakeNetwork,
    Network,
    marker_bytes,
    order_messages,
    publish_marker,
    publish_tx,
    wait_until,
)

from medledger.core.consortium import ConsortiumParams
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Signature
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import verify_chain

#: Timers that never fire within a test: blocks are cut by the test's markers only.
SLOW = ConsortiumParams(cut_after_ms=600_000)
MEMBERS = ("h0", "h1", "h2", "h3")
OUTSIDER = SigningKey.generate()


def tips(net: Network) -> set[int]:
    return {m.status()["tip_height"] for m in net.members.values()}


async def publish_bad_marker(net: Network, bad: str, height: int) -> None:
    chain, key = net.chain_id, net.keys["h1"]
    if bad == "unsigned":
        await publish_marker(net.orderer, chain, height, None, "bad-marker")
    elif bad == "outsider":
        await publish_marker(net.orderer, chain, height, OUTSIDER, "bad-marker")
    elif bad == "other-chain":  # a member's marker for its private chain's id
        await publish_marker(
            net.orderer, chain, height, key, "bad-marker", signed_chain="private:h1"
        )
    elif bad == "other-height-signature":  # signed for another height than it names
        sig = key.sign(marker_bytes(chain, height + 1))
        doc: dict[str, Any] = {"kind": "cut", "height": height, "signature": sig.to_json()}
        await net.orderer.publish("bad-marker", canonical_bytes(doc))
    elif bad == "forged-signer":  # an outsider's signature claiming to be h1's
        forged = OUTSIDER.sign(marker_bytes(chain, height))
        sig = Signature(signer=key.fingerprint, alg=forged.alg, sig=forged.sig)
        doc = {"kind": "cut", "height": height, "signature": sig.to_json()}
        await net.orderer.publish("bad-marker", canonical_bytes(doc))
    else:  # "not-next-height": a valid member marker, for a height after the next one
        await publish_marker(net.orderer, chain, height + 1, key, "bad-marker")


@pytest.mark.parametrize(
    "bad",
    [
        "unsigned",
        "outsider",
        "other-chain",
        "other-height-signature",
        "forged-signer",
        "not-next-height",
    ],
)
def test_only_a_members_marker_for_the_next_height_cuts(network: MakeNetwork, bad: str) -> None:
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> list[bytes]:
        await net.start(*MEMBERS)
        first, second = net.access("h0"), net.access("h2")
        await publish_tx(net.orderer, first)
        await publish_bad_marker(net, bad, 1)
        await publish_tx(net.orderer, second)
        await wait_until(
            lambda: all(second.hash() in m.state.seen for m in net.members.values()),
            "every member to see the second tx",
        )
        assert tips(net) == {0}, "an invalid marker cut a block"
        # A member's marker cuts both transactions into block 1, which becomes final.
        await publish_marker(net.orderer, net.chain_id, 1, net.keys["h3"], "good-marker")
        for member in net.members.values():
            await member.wait_final(1, timeout=5)
        assert tips(net) == {1}
        return [first.hash(), second.hash()]

    hashes = net.run(scenario)
    for mid in MEMBERS:
        store = net.open_store(net.consortium_path(mid))
        verify_chain(store, policy=ConsortiumPolicy(net.genesis))
        block = store.block(1)
        assert [BlockHeader.decode(block.header_bytes).tx_count] == [2]
        assert [sha256(d) for d in block.tx_data] == hashes


def test_a_marker_with_nothing_pending_cuts_nothing(network: MakeNetwork) -> None:
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        await publish_marker(net.orderer, net.chain_id, 1, net.keys["h0"], "early")
        tx = net.access("h1")
        await publish_tx(net.orderer, tx)
        await wait_until(
            lambda: all(tx.hash() in m.state.seen for m in net.members.values()),
            "every member to see the tx",
        )
        assert tips(net) == {0}
        await publish_marker(net.orderer, net.chain_id, 1, net.keys["h2"], "later")
        for member in net.members.values():
            await member.wait_final(1, timeout=5)
        assert tips(net) == {1}

    net.run(scenario)


def test_marker_of_a_member_removed_by_the_pending_block_still_cuts(
    network: MakeNetwork,
) -> None:
    """Block 1 is voted on by the genesis members, h3 among them, even though it removes
    h3: h3 may ask for it to be cut. (Members race to publish the marker for a height
    under one message id, so whichever member's marker is stored first must count.)"""
    net = network(4, params=SLOW)

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        remove = net.tx("member.remove", {"id": "h3"}, "h0", "h1", "h2")
        await publish_tx(net.orderer, remove)
        await wait_until(
            lambda: all(remove.hash() in m.state.seen for m in net.members.values()),
            "every member to see the removal",
        )
        await publish_marker(net.orderer, net.chain_id, 1, net.keys["h3"], "h3-marker")
        for member in net.members.values():
            await member.wait_final(1, timeout=3)
            assert [m.id for m in member.state.members.members] == ["h0", "h1", "h2"]

    net.run(scenario)


def test_a_non_member_marker_under_the_members_message_id_does_not_block_cutting(
    network: MakeNetwork,
) -> None:
    """Members publish the marker for height h under the predictable id
    ``cut-{consortium}-{h}``. An outsider who publishes an (ignored) marker under that id
    first must not suppress the members' markers, or no block is ever cut by time."""
    net = network(4, params=FAST)

    async def scenario(net: Network) -> None:
        await net.start(*MEMBERS)
        squat = f"cut-{net.genesis.consortium}-1"
        await publish_marker(net.orderer, net.chain_id, 1, OUTSIDER, squat)
        receipt = await net.members["h0"].submit(net.access("h0"), timeout=3)
        assert receipt.height == 1

    net.run(scenario)


def test_members_markers_are_signed_and_carry_no_time(network: MakeNetwork) -> None:
    net = network(4, params=FAST)

    async def scenario(net: Network) -> list[bytes]:
        await net.start(*MEMBERS)
        for via in MEMBERS:
            await net.submit_many(via, [net.access(via)])
        await net.settle()
        return [payload for _, payload in await order_messages(net.orderer)]

    payloads = net.run(scenario)
    by_fp = {k.fingerprint: k for k in net.keys.values()}
    markers = [doc for doc in map(parse_canonical, payloads) if doc.get("kind") == "cut"]
    assert markers, "no block was cut by time"
    for doc in markers:
        assert set(doc) == {"kind", "height", "signature"}
        sig = Signature.from_json(doc["signature"])
        by_fp[sig.signer].public.verify(sig, marker_bytes(net.chain_id, doc["height"]))
