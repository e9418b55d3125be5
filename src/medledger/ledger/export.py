"""The JSON a chain is shown in — one definition for the CLI and the HTTP API.

``block_json`` is the export form (``{header, hash, signatures, txs}``);
``head_json`` the head header with its hash; the proof documents carry
everything a verifier needs (leaf, sizes, roots, the RFC 6962 proof).
"""

from __future__ import annotations

from typing import Any

from medledger.core.hashing import sha256
from medledger.core.merkle import leaf_hash
from medledger.core.models import Block, BlockHeader, Transaction
from medledger.ledger.proofs import consistency_proof, head_header, inclusion_proof, root_at
from medledger.storage.ports import ChainStore, StoredBlock

__all__ = ["block_json", "consistency_proof_json", "head_json", "inclusion_proof_json"]


def block_json(block: StoredBlock) -> dict[str, Any]:
    """The export JSON of a stored block (the shape of :meth:`Block.to_json`)."""
    return Block(
        header=BlockHeader.decode(block.header_bytes),
        signatures=block.signatures,
        txs=tuple(Transaction.decode(d) for d in block.tx_data),
    ).to_json()


def head_json(store: ChainStore) -> dict[str, Any]:
    """The head header's fields plus its hash."""
    header = head_header(store)
    return {**header.to_json(), "hash": header.hash().hex()}


def inclusion_proof_json(store: ChainStore, index: int, size: int | None) -> dict[str, Any]:
    """Proof that log entry ``index`` is in the log of ``size`` (default: the head's)."""
    size = size if size is not None else head_header(store).log_size
    proof = inclusion_proof(store, index, size)
    data = store.tx_data(index)
    return {
        "index": index,
        "size": size,
        "tx_hash": sha256(data).hex(),
        "leaf_hash": leaf_hash(data).hex(),
        "root": root_at(store, size).hex(),
        "proof": [h.hex() for h in proof],
    }


def consistency_proof_json(
    store: ChainStore, old_size: int, new_size: int | None
) -> dict[str, Any]:
    """Proof that the log of ``new_size`` (default: the head's) extends the log of ``old_size``."""
    new_size = new_size if new_size is not None else head_header(store).log_size
    proof = consistency_proof(store, old_size, new_size)
    return {
        "old_size": old_size,
        "new_size": new_size,
        "old_root": root_at(store, old_size).hex(),
        "new_root": root_at(store, new_size).hex(),
        "proof": [h.hex() for h in proof],
    }
