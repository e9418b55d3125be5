"""How both chain adapters key what they store (one layout, so they cannot drift).

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

from medledger.core.merkle import NodeID

__all__ = ["hkey", "node_from_key", "node_key"]


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
