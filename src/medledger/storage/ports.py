"""Storage ports: what the ledger needs from a backend, and what each call guarantees.

Adapters (``sqlite``, later ``postgres``) implement these Protocols; one
conformance suite in ``tests/storage`` runs against every adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from medledger.core.merkle import NodeID
from medledger.core.models import BlockHeader, Signature

__all__ = ["ChainStore", "StoredBlock", "NewBlock"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewBlock:
    """Everything one block adds to a chain, written in one storage transaction.

    ``nodes`` are the perfect Merkle subtrees of level >= 1 completed by this
    block's leaves (from :class:`~medledger.core.merkle.CompactRange`), so
    proofs can later be served by fetching O(log n) stored hashes. Level-0
    (leaf) hashes are not stored twice: they derive from the transaction data.
    """

    header: BlockHeader
    header_bytes: bytes
    block_hash: bytes
    signatures: tuple[Signature, ...]
    first_index: int
    tx_data: Sequence[bytes]
    tx_hashes: Sequence[bytes]
    nodes: Sequence[tuple[NodeID, bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredBlock:
    """A block as stored: raw header bytes and raw transaction bytes, for verification."""

    height: int
    header_bytes: bytes
    block_hash: bytes
    signatures: tuple[Signature, ...]
    first_index: int
    tx_data: tuple[bytes, ...]


class ChainStore(Protocol):
    """Durable, append-only storage of one chain: blocks, transactions, Merkle nodes.

    Guarantees every adapter must keep:

    * ``append_block`` is atomic and durable: when it returns, the whole block
      survives a crash or power loss; if it raises, nothing of it is visible.
    * Heights are contiguous from 0; ``append_block`` raises
      :class:`~medledger.core.errors.Conflict` if the height is not head + 1.
    * Readers never see a partially written block.
    * Failures raise :class:`~medledger.core.errors.StorageError` (or
      ``RetryableStorageError`` when the same call may succeed later).
    """

    def append_block(self, block: NewBlock) -> None: ...

    def head(self) -> StoredBlock | None:
        """The highest block, or ``None`` for an empty chain."""
        ...

    def head_header_bytes(self) -> bytes | None:
        """Canonical header bytes of the highest block (cheap: no transactions read)."""
        ...

    def block(self, height: int) -> StoredBlock:
        """The block at ``height``; raises ``NotFound``."""
        ...

    def block_hash(self, height: int) -> bytes:
        """The hash of the block at ``height`` (no transactions read); raises ``NotFound``."""
        ...

    def iter_blocks(self, start: int = 0, end: int | None = None) -> Iterator[StoredBlock]:
        """Blocks with ``start <= height < end`` in height order, streamed."""
        ...

    def node_hashes(self, ids: Sequence[NodeID]) -> dict[NodeID, bytes]:
        """Hashes of the given perfect subtrees (each fetched by primary key).

        Level-0 ids are answered with the leaf hash of the stored transaction.
        Raises ``NotFound`` naming the first node that is not stored.
        """
        ...

    def iter_nodes(self) -> Iterator[tuple[NodeID, bytes]]:
        """Every stored node (level >= 1) in creation order (for full verification)."""
        ...

    def tx_location(self, tx_hash: bytes) -> tuple[int, int]:
        """``(height, log index)`` of a transaction; raises ``NotFound``."""
        ...

    def tx_by_hash(self, tx_hash: bytes) -> tuple[int, bytes]:
        """``(log index, canonical bytes)`` of a transaction; raises ``NotFound``."""
        ...

    def tx_data(self, index: int) -> bytes:
        """Canonical bytes of the transaction at log ``index``; raises ``NotFound``."""
        ...

    def check_storage(self) -> None:
        """A fast check of the backend's own structures (SQLite: ``PRAGMA quick_check``).

        Raises :class:`~medledger.core.errors.DamagedStore` naming the damage.
        """
        ...

    def damage(self) -> str | None:
        """Why this store can no longer be trusted (the backend reported corruption), or ``None``."""
        ...

    def counts(self) -> tuple[int, int, int]:
        """``(blocks, transactions, nodes)`` stored — lets verification spot leftovers."""
        ...

    def close(self) -> None: ...
