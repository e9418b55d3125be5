"""An anchor still on its way through the order does not make the next round skip.

At tens of ms between institutions an anchor's pass through the replicated
order can outlast the anchor interval. The anchorer used to send nothing at
the next multiple of the interval until its previous anchor was in the order
as its own member saw it: the institution missed that round (its records
waited a whole interval more) and the round was incomplete, so the block was
cut by the timer and a marker. Now the next anchor builds on the one on its
way (at most two on their way at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from consortium_net import MakeNetwork, Network, OrdererWrapper, order_messages, wait_until

from medledger.core.encoding import parse_canonical
from medledger.ledger.ordering.port import OrderedMessage, Orderer


class PausedReads(OrdererWrapper):
    """The order as one member sees it, with its reading paused while ``reading`` is clear."""

    def __init__(self, inner: Orderer) -> None:
        self._inner = inner
        self.reading = asyncio.Event()

    async def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        async for msg in self._inner.read(start):
            await self.reading.wait()
            yield msg


async def _anchors_of(net: Network, institution: str) -> list[dict[str, Any]]:
    """The bodies of ``institution``'s anchors in the order, in order."""
    bodies = []
    for _, payload in await order_messages(net.orderer):
        doc = parse_canonical(payload)
        tx = doc.get("tx") if doc.get("kind") == "tx" else None
        if tx and tx["type"] == "anchor" and tx["body"]["institution"] == institution:
            bodies.append(tx["body"])
    return bodies


def test_the_next_anchor_builds_on_one_not_yet_in_the_order(network: MakeNetwork) -> None:
    net = network(4)

    async def scenario(net: Network) -> None:
        paused = PausedReads(net.orderer)  # h0 reads nothing of the order for now
        await net.start("h0", orderer=paused)
        await net.start("h1", "h2", "h3")  # a quorum without h0
        h0 = net.members["h0"]
        await net.write_private("h0", 3)
        anchorer = net.anchorers["h0"]
        anchorer.start()
        try:
            found: list[dict[str, Any]] = []

            async def anchors(count: int) -> None:
                deadline = asyncio.get_running_loop().time() + 10
                while len(found) < count:
                    assert asyncio.get_running_loop().time() < deadline, f"anchors: {found}"
                    found[:] = await _anchors_of(net, "h0")
                    await asyncio.sleep(0.01)

            await anchors(1)
            first = found[0]
            await net.write_private("h0", 2)
            await anchors(2)
            second = found[1]
            # h0 never saw its first anchor in the order, yet sent the next one on it.
            assert h0.ordered_anchor("h0") is None
            assert second["prev_size"] == first["log_size"] < second["log_size"]
            # Both are valid in the order: every member that reads it takes both.
            await wait_until(
                lambda: all(
                    (a := net.members[m].state.anchors.get("h0")) is not None
                    and a.log_size == second["log_size"]
                    for m in ("h1", "h2", "h3")
                ),
                "the other members to finalize both anchors",
            )
            paused.reading.set()
            await wait_until(
                lambda: (
                    (a := h0.state.anchors.get("h0")) is not None
                    and a.log_size >= second["log_size"]
                ),
                "h0 to catch up",
            )
        finally:
            await anchorer.close()

    net.run(scenario)
