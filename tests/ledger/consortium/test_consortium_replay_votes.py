"""A restarted member does not vote again where its vote is already in the order.

On JetStream a vote re-sent after the 2-minute de-duplication window is stored
again, so a member that re-voted every block while replaying filled the order
with repeated votes, growing with chain height. A block the member holds is
final (no vote needed); a block cut during the replay gets its vote only if the
member's own vote is not further on in the order, once the replay is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from consortium_net import MakeNetwork, Network, OrdererWrapper, votes_in_order, wait_until

from medledger.ledger.ordering.port import OrderedMessage, Orderer


class PublishLog(OrdererWrapper):
    """The order as one member sees it: its publishes written down, how far it read.

    ``drop_votes`` loses the member's votes on the way out, as a crash between
    cutting a block and sending the vote would.
    """

    def __init__(self, inner: Orderer, *, drop_votes: bool = False) -> None:
        self._inner = inner
        self.drop_votes = drop_votes
        self.ids: list[str] = []
        self.read_seq = 0

    def vote_heights(self) -> list[int]:
        return [int(i.split("-")[2]) for i in self.ids if i.startswith("vote-")]

    async def publish(self, msg_id: str, payload: bytes) -> int:
        self.ids.append(msg_id)
        if self.drop_votes and msg_id.startswith("vote-"):
            return 0
        return await self._inner.publish(msg_id, payload)

    async def broadcast(self, payload: bytes) -> None:
        if not self.drop_votes:  # a member broadcasts only votes
            await self._inner.broadcast(payload)

    async def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        async for msg in self._inner.read(start):
            yield msg
            self.read_seq = msg.seq  # the member is done with it


async def _caught_up(net: Network, log: PublishLog) -> None:
    last = await net.orderer.last_seq()
    await wait_until(lambda: log.read_seq >= last, "the member to replay the order")


def test_a_restarted_member_does_not_vote_again_for_final_blocks(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1", "h2", "h3")
        for _ in range(5):  # five blocks
            await net.submit_many("h1", [net.access("h1")])
        height = await net.settle()
        await net.stop("h3")
        log = PublishLog(net.orderer)
        (h3,) = await net.start("h3", orderer=log)
        await h3.wait_final(height, timeout=10)
        await _caught_up(net, log)
        assert log.vote_heights() == []
        # Live again, it votes once on each new block.
        await net.submit_many("h1", [net.access("h1")])
        await net.settle()
        assert log.vote_heights() == [height + 1]

    net.run(scenario)


def test_a_vote_already_in_the_order_for_a_pending_block_is_not_repeated(
    network: MakeNetwork,
) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        await net.start("h0", "h1")  # 2 of 4: nothing becomes final
        h0 = net.members["h0"]
        pending = net.spawn(h0.submit(net.access("h0"), timeout=20))
        await wait_until(lambda: h0.status()["tip_height"] == 1, "block 1 to be cut")

        async def h0_voted() -> bool:
            return any(
                header.height == 1 and sig.signer == net.keys["h0"].fingerprint
                for _, header, sig in await votes_in_order(net.orderer)
            )

        deadline = asyncio.get_running_loop().time() + 10
        while not await h0_voted():
            assert asyncio.get_running_loop().time() < deadline, "h0 never voted on block 1"
            await asyncio.sleep(0.01)
        await net.stop("h0")
        pending.cancel()
        log = PublishLog(net.orderer)
        (h0,) = await net.start("h0", orderer=log)
        await _caught_up(net, log)
        await net.start("h2")  # the third vote: block 1 becomes final with h0's first vote
        await h0.wait_final(1, timeout=10)
        assert log.vote_heights() == []
        signers = {s.signer for s in net.stores["h0"].block(1).signatures}
        assert net.keys["h0"].fingerprint in signers

    net.run(scenario)


def test_a_vote_missing_from_the_order_is_sent_after_the_replay(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        lost = PublishLog(net.orderer, drop_votes=True)
        await net.start("h0", orderer=lost)
        await net.start("h1", "h2")  # h3 is down: h0's vote is needed
        h1 = net.members["h1"]
        pending = net.spawn(h1.submit(net.access("h1"), timeout=20))
        h0 = net.members["h0"]
        await wait_until(lambda: h0.status()["tip_height"] == 1, "block 1 to be cut")
        await wait_until(lambda: lost.vote_heights() == [1], "h0's vote to be lost")
        assert h1.final_height == 0
        await net.stop("h0")
        log = PublishLog(net.orderer)
        await net.start("h0", orderer=log)
        receipt = await asyncio.wait_for(pending, 10)
        assert receipt.height == 1
        assert log.vote_heights() == [1]

    net.run(scenario)
