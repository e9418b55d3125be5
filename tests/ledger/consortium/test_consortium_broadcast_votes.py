"""Votes broadcast beside the order (decision 0063): counted from either path, safely.

Each member sends its vote through the order and broadcasts it (one hop, not
replicated). These tests take one path away at a time: a block is final from
broadcast votes alone; a broadcast vote that arrives before the block is cut
here is held until the cut; clock readings (block time) come only from the
ordered copy, so a replay cuts the same blocks; and hostile broadcasts change
nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from consortium_net import (
    MakeNetwork,
    Network,
    OrdererWrapper,
    now_ms,
    vote_payload,
    votes_in_order,
    wait_until,
)

from medledger.core.consortium import MemberSet, clock_bytes
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader
from medledger.ledger.ordering.port import OrderedMessage, Orderer


class Paths(OrdererWrapper):
    """The order as one member sees it, with the vote paths under the test's control.

    ``ordered_votes=False`` loses the member's votes on their way into the order
    (its broadcasts still go out); ``reading`` pauses its reading of the order
    while cleared; ``heard`` counts the broadcasts handed to the member — the
    member has handled broadcast *k* once ``heard`` is past *k* (it asks for the
    next one only then). ``broadcast_time`` rewrites the time (validly signed)
    of the votes it broadcasts.
    """

    def __init__(
        self,
        inner: Orderer,
        *,
        ordered_votes: bool = True,
        key: SigningKey | None = None,
        chain_id: str = "",
        broadcast_time: int | None = None,
    ) -> None:
        self._inner = inner
        self.ordered_votes = ordered_votes
        self.reading = asyncio.Event()
        self.reading.set()
        self.heard = 0
        self._key = key
        self._chain_id = chain_id
        self._broadcast_time = broadcast_time

    async def publish(self, msg_id: str, payload: bytes) -> int:
        if not self.ordered_votes and msg_id.startswith("vote-"):
            return 0
        return await self._inner.publish(msg_id, payload)

    async def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        async for msg in self._inner.read(start):
            await self.reading.wait()
            yield msg

    async def broadcast(self, payload: bytes) -> None:
        if self._broadcast_time is not None and self._key is not None:
            vote = parse_canonical(payload)
            height = BlockHeader.from_json(vote["header"]).height
            vote["time_ms"] = self._broadcast_time
            vote["clock"] = self._key.sign(
                clock_bytes(self._chain_id, height, self._broadcast_time)
            ).to_json()
            payload = canonical_bytes(vote)
        await self._inner.broadcast(payload)

    async def broadcasts(self) -> AsyncIterator[bytes]:
        async for payload in self._inner.broadcasts():
            self.heard += 1
            yield payload


def _signers(net: Network, member_id: str, height: int) -> set[str]:
    """The members whose valid signatures the stored certificate of ``height`` holds."""
    block = net.stores[member_id].block(height)
    return set(MemberSet(net.genesis.members).quorum_signers(block.block_hash, block.signatures))


def test_a_block_is_final_from_broadcast_votes_alone(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        for mid in ("h0", "h1", "h2", "h3"):
            await net.start(mid, orderer=Paths(net.orderer, ordered_votes=False))
        receipt = await net.members["h1"].submit(net.access("h1"), timeout=10)
        assert receipt.height == 1
        assert await votes_in_order(net.orderer) == []  # no vote went through the order
        await net.settle()
        for mid in net.members:
            assert len(_signers(net, mid, 1)) >= 3, mid

    net.run(scenario)


def test_a_broadcast_vote_ahead_of_the_cut_is_held_and_counted_at_the_cut(
    network: MakeNetwork,
) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        behind = Paths(net.orderer, ordered_votes=False)
        behind.reading.clear()  # h0 does not see block 1's transaction yet
        await net.start("h0", orderer=behind)
        for mid in ("h1", "h2", "h3"):
            await net.start(mid, orderer=Paths(net.orderer, ordered_votes=False))
        h0 = net.members["h0"]
        net.spawn(net.members["h1"].submit(net.access("h1"), timeout=20))
        # h1..h3 cut block 1 and finalize it with their three broadcast votes; h0
        # hears those votes before it has cut block 1.
        await wait_until(
            lambda: all(net.members[m].final_height == 1 for m in ("h1", "h2", "h3")),
            "h1..h3 to finalize block 1",
        )
        await wait_until(lambda: behind.heard >= 3, "h0 to hear the three votes")
        assert h0.status()["tip_height"] == 0 and h0.final_height == 0
        # None of those votes is in the order: held, they are h0's only way to finality.
        behind.reading.set()
        await h0.wait_final(1, timeout=10)
        assert {"h1", "h2", "h3"} <= _signers(net, "h0", 1)
        assert not h0.evidence

    net.run(scenario)


def test_block_time_comes_from_ordered_votes_only_so_a_replay_cuts_the_same_blocks(
    network: MakeNetwork,
) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        # Every broadcast vote says the time is an hour from now (validly signed);
        # the ordered copies say the real time. h3 replays later without broadcasts.
        hour_ahead = now_ms() + 3_600_000
        for mid in ("h0", "h1", "h2"):
            paths = Paths(
                net.orderer, key=net.keys[mid], chain_id=net.chain_id, broadcast_time=hour_ahead
            )
            await net.start(mid, orderer=paths)
        for rnd in range(4):
            await net.submit_many(f"h{rnd % 3}", [net.access(f"h{i % 3}") for i in range(3)])
        height = await net.settle()
        assert height >= 4
        (h3,) = await net.start("h3")
        await h3.wait_final(height, timeout=10)
        for h in range(1, height + 1):
            live = net.stores["h0"].block(h)
            assert net.stores["h3"].block(h).header_bytes == live.header_bytes, h
            assert BlockHeader.decode(live.header_bytes).time_ms < hour_ahead - 60_000
        assert h3.status()["diverged"] is None

    net.run(scenario)


def test_hostile_broadcasts_change_nothing(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        watched = Paths(net.orderer)
        await net.start("h0", orderer=watched)
        await net.start("h1")
        h0 = net.members["h0"]
        pending = net.spawn(net.members["h1"].submit(net.access("h1"), timeout=20))
        votes: list[tuple[bytes, BlockHeader, object]] = []

        async def two_votes() -> bool:
            votes[:] = await votes_in_order(net.orderer)
            return len(votes) >= 2

        deadline = asyncio.get_running_loop().time() + 10
        while not await two_votes():
            assert asyncio.get_running_loop().time() < deadline, "h0 and h1 never voted"
            await asyncio.sleep(0.01)
        header = votes[0][1]
        outsider = SigningKey.generate()
        member_key = net.keys["h2"]
        hostile = [
            b"not json",
            b'{"kind": "vote"}',  # not canonical
            canonical_bytes({"kind": "tx", "tx": {}}),
            canonical_bytes({"kind": "vote", "header": "x", "signature": "y"}),
            b"{" + b" " * 20_000 + b"}",
            # a vote for block 1 signed by a key that is no member's
            vote_payload(header, outsider.sign(header.hash())),
            # a member's key over the wrong bytes
            vote_payload(header, member_key.sign(b"something else")),
        ]
        far = BlockHeader.from_json({**header.to_json(), "height": header.height + 50})
        hostile.append(vote_payload(far, member_key.sign(far.hash())))
        # h0 has been handed h0's and h1's broadcast votes (both are in the order).
        await wait_until(lambda: watched.heard >= 2, "h0 to hear the two votes")
        before = watched.heard
        for payload in hostile:
            await net.orderer.broadcast(payload)
        sentinel = b"sentinel"
        await net.orderer.broadcast(sentinel)
        # h0 has handled every hostile broadcast once it was handed the sentinel.
        await wait_until(lambda: watched.heard > before + len(hostile), "h0 to hear them all")
        assert h0.final_height == 0, "a hostile broadcast counted as a vote"
        assert h0.status()["problems"] == {} and not h0.evidence
        await net.start("h2")  # the third real vote
        assert (await asyncio.wait_for(pending, 10)).height == 1
        await h0.wait_final(1, timeout=10)
        assert _signers(net, "h0", 1) <= {"h0", "h1", "h2"}
        assert outsider.fingerprint not in {s.signer for s in net.stores["h0"].block(1).signatures}

    net.run(scenario)
