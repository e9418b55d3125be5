"""When the private chain's sequencer cuts a block: its two settings, apart from the sequencer.

``node.toml`` names them (``medledger.config``), so reading a node's
configuration needs this class but not the sequencer itself (asyncio, the
storage thread): commands that only read a store start without them.
"""

from __future__ import annotations

from dataclasses import dataclass

from medledger.core.errors import InvalidInput

__all__ = ["SequencerConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SequencerConfig:
    """When the sequencer cuts a block.

    ``max_txs``: most transactions in one block. ``max_wait_ms``: how long to
    wait for more transactions when fewer than ``max_txs`` are queued (0 = cut
    at once; the previous commit is already a batching window).
    """

    max_txs: int = 4096
    max_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.max_txs < 1:
            raise InvalidInput("max_txs must be at least 1")
        if self.max_wait_ms < 0:
            raise InvalidInput("max_wait_ms must not be negative")
