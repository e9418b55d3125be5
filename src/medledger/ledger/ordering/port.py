"""The ordering port: publish messages, read them back in one total order.

Guarantees every adapter keeps (one conformance suite checks them all):

* ``publish`` returns the message's sequence number (1, 2, 3, …) only once
  the message is durable in the order; every reader sees the same message at
  the same sequence, forever.
* Publishing the same ``msg_id`` again within the de-duplication window
  returns the original sequence and adds nothing (``Nats-Msg-Id`` semantics),
  so a retried publish cannot duplicate a transaction.
* ``read(start)`` yields ``(seq, payload, time_ms)`` for every message from ``start``
  in sequence order, without gaps, then waits for new ones — a member that
  was down replays from where it stopped.
* ``broadcast`` / ``broadcasts``: a second, unordered path beside the
  order. A broadcast payload reaches the ``broadcasts()`` listeners that are
  open when it is sent (the sender's own included), at most once each,
  without being stored or ordered; it may be lost (a listener that is slow,
  disconnected or not yet listening misses it), so nothing may depend on it
  arriving. Anyone who can reach the transport can broadcast: a listener
  treats every payload as hostile. The consortium sends votes this way as
  well as through the order (decision 0063): one hop instead of a pass
  through the replicated order.
* Failures raise :class:`~medledger.core.errors.OrderingError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MAX_MESSAGE_BYTES", "OrderedMessage", "Orderer"]

#: The largest message an orderer accepts (NATS' default max_payload is 1 MiB).
MAX_MESSAGE_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderedMessage:
    """A message at its place in the total order.

    ``time_ms`` is when the ordering service stored it (ms since the epoch): the
    same for every reader, so it can date blocks deterministically.
    """

    seq: int
    payload: bytes
    time_ms: int = 0


class Orderer(Protocol):
    async def publish(self, msg_id: str, payload: bytes) -> int:
        """Append ``payload`` (de-duplicated by ``msg_id``); return its sequence once durable."""
        ...

    def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        """Every message from sequence ``start`` on, in order; waits for new ones."""
        ...

    async def last_seq(self) -> int:
        """The sequence of the last message in the order (0 if empty)."""
        ...

    async def broadcast(self, payload: bytes) -> None:
        """Send ``payload`` to the open ``broadcasts()`` listeners, best effort (see module doc).

        Raises :class:`OrderingError` only for a closed orderer or a payload over
        :data:`MAX_MESSAGE_BYTES`; a send the transport loses is not an error.
        """
        ...

    def broadcasts(self) -> AsyncIterator[bytes]:
        """Payloads broadcast from now on by anyone (unauthenticated); ends when closed."""
        ...

    async def close(self) -> None: ...
