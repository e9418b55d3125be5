"""How both chain adapters key and read back what they store (one layout, so they cannot drift).

Merkle nodes are keyed so that creation order is key order::

    key(level, index) = (last_leaf(level, index) << 6) | level,
    last_leaf = ((index + 1) << level) - 1

so appends go to the right edge of the B-tree, proofs fetch each node by
primary key, and full verification streams nodes in the order it rebuilds
them. Transactions are indexed by ``hkey``, the first 8 bytes of their hash as
a signed integer: a small integer index costs far less per insert than a
32-byte one; lookups confirm the full hash against the data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from medledger.core.errors import IntegrityError, InvalidInput
from medledger.core.merkle import NodeID
from medledger.core.models import Signature
from medledger.storage.ports import StoredBlock

__all__ = ["hkey", "node_from_key", "node_key", "stored_block"]


def node_key(node: NodeID) -> int:
    """Primary key of a Merkle node; increasing in creation order."""
    return ((((node.index + 1) << node.level) - 1) << 6) | node.level


def node_from_key(key: int) -> NodeID:
    """The node a :func:`node_key` names."""
    level = key & 63
    last = key >> 6
    return NodeID(level, ((last + 1) >> level) - 1)


def hkey(tx_hash: bytes) -> int:
    """The transaction-hash index key: the hash's first 8 bytes as a signed integer."""
    return int.from_bytes(tx_hash[:8], "big", signed=True)


def stored_block(row: Sequence[Any], txs: Sequence[bytes]) -> StoredBlock:
    """A block from its row (``height, hash, header, signatures, first_index``) and its
    transactions' bytes. Unreadable signatures are :class:`IntegrityError`: tampering
    evidence, not a backend failure."""
    height, block_hash, header, sigs, first = row
    try:
        signatures = tuple(Signature.from_json(s) for s in json.loads(sigs))
    except (ValueError, TypeError, InvalidInput) as exc:
        raise IntegrityError(f"block {height}: stored signatures are unreadable ({exc})") from None
    return StoredBlock(
        height=int(height),
        header_bytes=bytes(header),
        block_hash=bytes(block_hash),
        signatures=signatures,
        first_index=int(first),
        tx_data=tuple(bytes(t) for t in txs),
    )
