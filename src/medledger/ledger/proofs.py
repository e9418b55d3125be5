"""Serving RFC 6962 proofs from a :class:`ChainStore`: name nodes, fetch, assemble.

Each call reads O(log n) stored node hashes by primary key; nothing is
recomputed over the whole log. Proofs are for any log size up to the head's,
since perfect subtrees never change once stored.
"""

from __future__ import annotations

from medledger.core.errors import InvalidInput, NotFound
from medledger.core.merkle import (
    assemble_proof,
    consistency_ranges,
    hash_range,
    inclusion_ranges,
    proof_node_ids,
    range_nodes,
)
from medledger.core.models import BlockHeader
from medledger.storage.ports import ChainStore

__all__ = ["consistency_proof", "head_header", "inclusion_proof", "root_at"]


def head_header(store: ChainStore) -> BlockHeader:
    """Header of the stored head block; raises :class:`NotFound` for an empty chain."""
    data = store.head_header_bytes()
    if data is None:
        raise NotFound("the chain has no blocks")
    return BlockHeader.decode(data)


def _check_size(store: ChainStore, size: int) -> None:
    log_size = head_header(store).log_size
    if not 0 <= size <= log_size:
        raise InvalidInput(f"log size {size} is outside the chain's log of {log_size}")


def inclusion_proof(store: ChainStore, index: int, size: int) -> list[bytes]:
    """Proof that log entry ``index`` is in the log of ``size`` (RFC 6962 §2.1.1)."""
    _check_size(store, size)
    ranges = inclusion_ranges(index, size)
    return assemble_proof(ranges, store.node_hashes(proof_node_ids(ranges)))


def consistency_proof(store: ChainStore, old_size: int, new_size: int) -> list[bytes]:
    """Proof that the log of ``new_size`` extends the log of ``old_size`` (RFC 6962 §2.1.2)."""
    _check_size(store, new_size)
    ranges = consistency_ranges(old_size, new_size)
    return assemble_proof(ranges, store.node_hashes(proof_node_ids(ranges)))


def root_at(store: ChainStore, size: int) -> bytes:
    """RFC 6962 root of the first ``size`` log entries."""
    _check_size(store, size)
    nodes = range_nodes(0, size)
    fetched = store.node_hashes(nodes)
    return hash_range([fetched[n] for n in nodes])
