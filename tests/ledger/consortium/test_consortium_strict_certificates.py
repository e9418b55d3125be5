"""A member never assembles a certificate that strict verification refuses.

A vote that arrives before its block is cut is checked against the final
members, who can differ from the block's voters when a membership change is
not final yet. Here a member removed in block R publishes a vote for block R+1
right after the removal was ordered, before anyone cut R+1: the members used
to count it, so every honest member stored a block R+1 whose certificate held
a non-voter's signature — a chain ``verify --consortium`` refuses. Now a member
counts only the block's own voters.

The stream is made deterministic by ordering the removed member's vote into a
copy of a real run's stream (its blocks are cut from the stream alone, so the
members replaying the copy cut the very same block R+1).
"""

from __future__ import annotations

import json
from dataclasses import replace

from consortium_net import FAST, MakeNetwork, Network, order_messages, vote_payload

from medledger.core.models import BlockHeader
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import verify_chain

VOTERS = ("h0", "h1", "h2")


def test_a_removed_members_early_vote_is_not_in_the_next_certificate(
    network: MakeNetwork,
) -> None:
    params = replace(FAST, max_block_txs=1)  # every transaction cuts its own block
    first = network(4, params)

    async def run(net: Network) -> list[bytes]:
        await net.start(*VOTERS)  # h3 never runs: every block needs all three votes
        await net.submit_many("h0", [net.access("h0")])
        await net.submit_many("h0", [net.tx("member.remove", {"id": "h3"}, *VOTERS)])
        await net.submit_many("h1", [net.access("h1")])
        await net.settle()
        return [payload for _, payload in await order_messages(net.orderer)]

    stream = first.run(run)
    stored = first.open_store(first.consortium_path("h0"))
    removed_at = 2
    next_block = BlockHeader.decode(stored.block(removed_at + 1).header_bytes)
    # h3's vote for block R+1, ordered right after the tx that removes it (block R).
    removal = next(
        i
        for i, payload in enumerate(stream)
        if json.loads(payload).get("tx", {}).get("type") == "member.remove"
    )
    early_vote = vote_payload(next_block, first.keys["h3"].sign(next_block.hash()))
    replayed = [*stream[: removal + 1], early_vote, *stream[removal + 1 :]]

    second = network(4, params)
    second.keys, second.genesis = dict(first.keys), first.genesis

    async def replay(net: Network) -> None:
        for i, payload in enumerate(replayed):
            await net.orderer.publish(f"m{i}", payload)
        await net.start(*VOTERS)
        for mid in VOTERS:
            await net.members[mid].wait_final(removed_at + 1, timeout=15)

    second.run(replay)
    for mid in VOTERS:
        store = second.open_store(second.consortium_path(mid))
        assert store.block(removed_at + 1).block_hash == next_block.hash()  # the same block
        signers = {s.signer for s in store.block(removed_at + 1).signatures}
        assert first.keys["h3"].fingerprint not in signers
        assert len(signers) >= 2  # the quorum of the three voters left
        assert signers <= {first.keys[v].fingerprint for v in VOTERS}
        verify_chain(store, policy=ConsortiumPolicy(first.genesis))
