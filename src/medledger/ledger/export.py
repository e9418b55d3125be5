"""The JSON a chain is shown in — one definition for the CLI and the HTTP API.

``block_json`` is the export form (``{header, hash, signatures, txs}``, one
JSON line per block: ``chain export``, ``consortium export``,
``/chain/{private|consortium}/export``); ``head_json`` the head header with its
hash; the proof documents carry everything a verifier needs (leaf, sizes,
roots, the RFC 6962 proof). :class:`ExportedChain` reads an export back as a
read-only :class:`~medledger.storage.ports.ChainStore`, so ``verify_chain``
checks an export exactly as it checks a node's store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn

from medledger.core.encoding import canonical_bytes, parse_strict
from medledger.core.errors import Conflict, IntegrityError, InvalidInput, NotFound
from medledger.core.hashing import sha256
from medledger.core.merkle import CompactRange, NodeID, leaf_hash
from medledger.core.models import Block, BlockHeader, Signature, Transaction
from medledger.ledger.proofs import consistency_proof, head_header, inclusion_proof, root_at
from medledger.storage.ports import ChainStore, NewBlock, StoredBlock

__all__ = [
    "MAX_EXPORT_LINE_BYTES",
    "ExportedChain",
    "block_json",
    "block_line",
    "consistency_proof_json",
    "head_json",
    "inclusion_proof_json",
]

#: A consortium block is at most ``max_block_bytes`` (1 MiB by default) of transactions
#: plus its certificate; a line this long is no block medledger writes.
MAX_EXPORT_LINE_BYTES = 64 * 1024 * 1024


def block_json(block: StoredBlock) -> dict[str, Any]:
    """The export JSON of a stored block (the shape of :meth:`Block.to_json`)."""
    return Block(
        header=BlockHeader.decode(block.header_bytes),
        signatures=block.signatures,
        txs=tuple(Transaction.decode(d) for d in block.tx_data),
    ).to_json()


def block_line(block: StoredBlock) -> bytes:
    """One line of an export: the block's export JSON (UTF-8, compact) and a newline."""
    return canonical_bytes(block_json(block)) + b"\n"


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


class ExportedChain:
    """A chain read back from its export (JSON lines), as a read-only ``ChainStore``.

    The export is hostile until verified: each line must be a JSON object with
    exactly ``header``, ``hash``, ``signatures`` and ``txs`` in the canonical
    JSON subset (otherwise :class:`IntegrityError` names the line), but nothing
    else is checked here — header bytes are the canonical bytes of the given
    header and the block hash is the given one, so ``verify_chain`` re-derives
    and compares everything as it does for a stored chain. An export holds no
    Merkle nodes; those a verifier needs are rebuilt from the transactions.
    """

    def __init__(self, lines: Iterable[bytes], *, label: str = "export") -> None:
        self._blocks: list[StoredBlock] = []
        self._node_cache: dict[NodeID, bytes] | None = None
        self._label = label
        first_index = 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            block = self._parse(number, line, first_index)
            first_index += len(block.tx_data)
            self._blocks.append(block)
        self._tx_count = first_index

    def _fail(self, number: int, what: str) -> NoReturn:
        raise IntegrityError(f"{self._label} line {number}: {what}")

    def _parse(self, number: int, line: bytes, first_index: int) -> StoredBlock:
        if len(line) > MAX_EXPORT_LINE_BYTES:
            self._fail(number, f"longer than {MAX_EXPORT_LINE_BYTES} bytes")
        try:
            value = parse_strict(line.decode("utf-8"))
        except UnicodeDecodeError:
            self._fail(number, "not UTF-8")
        except InvalidInput as exc:
            self._fail(number, f"not a block ({exc})")
        if not isinstance(value, dict) or set(value) != {"header", "hash", "signatures", "txs"}:
            self._fail(number, "a block must have exactly header, hash, signatures and txs")
        header, txs, sigs = value["header"], value["txs"], value["signatures"]
        height = header.get("height") if isinstance(header, dict) else None
        if type(height) is not int or height < 0:
            self._fail(number, "the header has no height")
        if not isinstance(txs, list) or not isinstance(sigs, list):
            self._fail(number, f"block {height}: signatures and txs must be lists")
        try:
            header_bytes = canonical_bytes(header)
            tx_data = tuple(canonical_bytes(tx) for tx in txs)
            block_hash = bytes.fromhex(value["hash"]) if isinstance(value["hash"], str) else b""
            signatures = tuple(Signature.from_json(s) for s in sigs)
        except (InvalidInput, ValueError) as exc:
            self._fail(number, f"block {height}: {exc}")
        return StoredBlock(
            height=height,
            header_bytes=header_bytes,
            block_hash=block_hash,
            signatures=signatures,
            first_index=first_index,
            tx_data=tx_data,
        )

    # -- ChainStore, read-only --------------------------------------------------------

    def append_block(self, block: NewBlock) -> None:
        raise Conflict("an exported chain is read-only")

    def head(self) -> StoredBlock | None:
        return self._blocks[-1] if self._blocks else None

    def head_header_bytes(self) -> bytes | None:
        return self._blocks[-1].header_bytes if self._blocks else None

    def block(self, height: int) -> StoredBlock:
        for block in self._blocks:
            if block.height == height:
                return block
        raise NotFound(f"the {self._label} has no block {height}")

    def block_hash(self, height: int) -> bytes:
        return self.block(height).block_hash

    def iter_blocks(self, start: int = 0, end: int | None = None) -> Iterator[StoredBlock]:
        # In file order: a verifier must see blocks that are out of order as they are.
        for block in self._blocks:
            if block.height >= start and (end is None or block.height < end):
                yield block

    def _nodes(self) -> dict[NodeID, bytes]:
        """Every node of the log (leaves included), in creation order; built once."""
        if self._node_cache is None:
            log = CompactRange()
            self._node_cache = {}
            for _, index, data in self._txs():
                leaf = leaf_hash(data)
                self._node_cache[NodeID(0, index)] = leaf
                self._node_cache.update(log.append(leaf)[1:])
        return self._node_cache

    def node_hashes(self, ids: Sequence[NodeID]) -> dict[NodeID, bytes]:
        nodes = self._nodes()
        return {node: nodes[node] for node in ids if node in nodes}

    def iter_nodes(self) -> Iterator[tuple[NodeID, bytes]]:
        return ((node, h) for node, h in self._nodes().items() if node.level >= 1)

    def _txs(self) -> Iterator[tuple[int, int, bytes]]:
        for block in self._blocks:
            for i, data in enumerate(block.tx_data):
                yield block.height, block.first_index + i, data

    def tx_location(self, tx_hash: bytes) -> tuple[int, int]:
        for height, index, data in self._txs():
            if sha256(data) == tx_hash:
                return height, index
        raise NotFound("no such transaction in the export")

    def tx_by_hash(self, tx_hash: bytes) -> tuple[int, bytes]:
        _, index = self.tx_location(tx_hash)
        return index, self.tx_data(index)

    def tx_data(self, index: int) -> bytes:
        for _, i, data in self._txs():
            if i == index:
                return data
        raise NotFound(f"the {self._label} has no transaction {index}")

    def check_storage(self) -> None:
        return None

    def damage(self) -> str | None:
        return None

    def counts(self) -> tuple[int, int, int]:
        return len(self._blocks), self._tx_count, sum(1 for _ in self.iter_nodes())

    def close(self) -> None:
        return None


def _is_chain_store(chain: ExportedChain) -> ChainStore:
    return chain  # mypy holds ExportedChain to the ChainStore protocol here
