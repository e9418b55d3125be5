"""An orderer that counts: how far its readers got, what it published.

``node start`` wraps its ordering connection in :class:`ObservedOrderer` so
``/readyz`` can tell when the node has replayed the order that existed when
it started (caught up), and ``/metrics`` can count the anchors it submitted.
It changes nothing in what passes through.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from medledger.core.transactions import ANCHOR
from medledger.ledger.ordering.port import OrderedMessage, Orderer

__all__ = ["ObservedOrderer"]


def _is_anchor(payload: bytes) -> bool:
    try:
        envelope = json.loads(payload)
    except ValueError:
        return False
    tx = envelope.get("tx") if isinstance(envelope, dict) else None
    return isinstance(tx, dict) and envelope.get("kind") == "tx" and tx.get("type") == ANCHOR


class ObservedOrderer:
    """Delegates to ``inner``; counts published anchors and the highest sequence read."""

    def __init__(self, inner: Orderer) -> None:
        self.inner = inner
        #: The highest sequence any reader of this orderer has been given.
        self.read_seq = 0
        #: Messages published, and of those the consortium ``anchor`` transactions.
        self.published = 0
        self.anchors_published = 0
        #: Publishes that failed (ordering service unreachable, closed, …).
        self.publish_errors = 0

    async def publish(self, msg_id: str, payload: bytes) -> int:
        try:
            seq = await self.inner.publish(msg_id, payload)
        except BaseException:
            self.publish_errors += 1
            raise
        self.published += 1
        if msg_id.startswith("tx-") and _is_anchor(payload):
            self.anchors_published += 1
        return seq

    async def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        async for message in self.inner.read(start):
            self.read_seq = max(self.read_seq, message.seq)
            yield message

    async def broadcast(self, payload: bytes) -> None:
        await self.inner.broadcast(payload)

    def broadcasts(self) -> AsyncIterator[bytes]:
        return self.inner.broadcasts()

    async def last_seq(self) -> int:
        return await self.inner.last_seq()

    async def close(self) -> None:
        await self.inner.close()
