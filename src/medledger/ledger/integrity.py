"""Start-up checks of a private chain store: is it whole, and is it where it must be?

A node must not serve, recover or extend a chain it cannot trust. Before it
opens for writing it checks, in order of cost:

* the backend's own structures (SQLite ``PRAGMA quick_check``);
* that the chain is not behind a height the record index saw durable (a record
  version is indexed only after the block it builds on was committed);
* the most recent blocks, re-derived from stored bytes (:func:`check_blocks`);
* that the chain still holds the history the institution's own last final
  anchor published (:func:`check_against_anchor`).

Every failure raises :class:`~medledger.core.errors.DamagedStore` naming what
is wrong; nothing is repaired or written here. The repair procedures are in
``docs/reliability.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from medledger.core.errors import DamagedStore, InvalidInput, InvalidSignature, NotFound
from medledger.core.hashing import ZERO_HASH, sha256
from medledger.core.keys import VerifyingKey
from medledger.core.merkle import CompactRange, leaf_hash, range_nodes
from medledger.core.models import BlockHeader, Signature, Transaction
from medledger.core.transactions import ANCHOR
from medledger.ledger.consortium.rules import AnchorRecord
from medledger.storage.ports import ChainStore

__all__ = [
    "REPAIR_HINT",
    "RECENT_BLOCKS",
    "StoreCheck",
    "check_against_anchor",
    "check_blocks",
    "check_private_store",
    "last_anchor",
    "log_root_at",
]

#: Appended to every refusal: where an operator finds what to do.
REPAIR_HINT = "the node refuses to serve; see docs/reliability.md, 'Repair'"
#: The start-up check re-derives the newest blocks: at most this many ...
RECENT_BLOCKS = 64
#: ... and no more than needed to cover this many of the newest transactions.
RECENT_TXS = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreCheck:
    """What a passed start-up check covered."""

    head_height: int
    log_size: int
    checked_from: int
    anchored_size: int | None


def _damaged(what: str) -> DamagedStore:
    return DamagedStore(f"{what}; {REPAIR_HINT}")


def _header(height: int, header_bytes: bytes, block_hash: bytes) -> BlockHeader:
    if sha256(header_bytes) != block_hash:
        raise _damaged(f"private chain block {height}: stored hash does not match its header")
    try:
        header = BlockHeader.decode(header_bytes)
    except InvalidInput as exc:
        raise _damaged(f"private chain block {height}: header is malformed ({exc})") from None
    if header.height != height:
        raise _damaged(f"private chain block {height}: header says height {header.height}")
    return header


def log_root_at(store: ChainStore, size: int) -> bytes:
    """The RFC 6962 root of the first ``size`` transactions, from stored Merkle nodes."""
    nodes = range_nodes(0, size)
    fetched = store.node_hashes(nodes)
    return CompactRange(size, [fetched[n] for n in nodes]).root()


def check_blocks(
    store: ChainStore, start: int, *, key: VerifyingKey | None = None
) -> frozenset[bytes]:
    """Re-derive blocks ``start`` .. head from stored bytes; return their transaction hashes.

    Per block: header hash and height, the link to the previous block (from
    block ``start - 1``'s stored header), transaction count, ``tx_root``, and
    ``log_size`` / ``log_root`` continuing the log rebuilt from the stored
    Merkle nodes before ``start``; with ``key``, the institution's signature.
    No transaction may be stored beyond the head. Raises :class:`DamagedStore`.
    Because every transaction of those blocks is re-hashed, a transaction hash
    absent from the result is provably not committed at a height >= ``start``.
    """
    start = max(start, 0)
    head_bytes = store.head_header_bytes()
    if head_bytes is None:
        raise _damaged("the private chain has no blocks")
    try:
        if start == 0:
            prev_hash, log, prev_time = ZERO_HASH, CompactRange(), 0
        else:
            prev = store.block(start - 1)
            prev_header = _header(prev.height, prev.header_bytes, prev.block_hash)
            prev_hash, prev_time = prev.block_hash, prev_header.time_ms
            size = prev_header.log_size
            nodes = range_nodes(0, size)
            fetched = store.node_hashes(nodes)
            log = CompactRange(size, [fetched[n] for n in nodes])
            if log.root() != prev_header.log_root:
                raise _damaged(
                    f"private chain block {start - 1}: stored Merkle nodes do not give its log root"
                )
        hashes: set[bytes] = set()
        height = start - 1
        for block in store.iter_blocks(start):
            height += 1
            if block.height != height:
                raise _damaged(f"private chain block {height} is missing")
            header = _header(height, block.header_bytes, block.block_hash)
            if header.prev_hash != prev_hash:
                raise _damaged(f"private chain block {height} does not link to block {height - 1}")
            if header.time_ms < prev_time:
                raise _damaged(f"private chain block {height}: time goes backwards")
            if block.first_index != log.size or len(block.tx_data) != header.tx_count:
                raise _damaged(f"private chain block {height}: its transactions are not all stored")
            block_log = CompactRange()
            for data in block.tx_data:
                leaf = leaf_hash(data)
                block_log.push(leaf)
                log.push(leaf)
                hashes.add(sha256(data))
            if block_log.root() != header.tx_root:
                raise _damaged(
                    f"private chain block {height}: its transactions do not match its tx_root"
                    " (a committed transaction was changed)"
                )
            if header.log_size != log.size or header.log_root != log.root():
                raise _damaged(f"private chain block {height}: log_size/log_root do not match")
            if key is not None:
                _check_signature(height, key, block.signatures, block.block_hash)
            prev_hash, prev_time = block.block_hash, header.time_ms
        if height < start:
            raise _damaged(f"the private chain ends below height {start}")
        if sha256(head_bytes) != prev_hash:
            raise _damaged("the private chain's head changed while it was checked")
    except NotFound as exc:
        raise _damaged(f"the private chain is incomplete ({exc})") from None
    try:
        store.tx_data(log.size)
    except NotFound:
        return frozenset(hashes)
    raise _damaged(
        f"transactions are stored beyond the head of the private chain (log size {log.size})"
    )


def _check_signature(
    height: int, key: VerifyingKey, signatures: Iterable[Signature], block_hash: bytes
) -> None:
    for sig in signatures:
        if sig.signer == key.fingerprint:
            try:
                key.verify(sig, block_hash)
            except InvalidSignature:
                break
            return
    raise _damaged(f"private chain block {height}: no valid institution signature")


def last_anchor(consortium: ChainStore, institution: str) -> AnchorRecord | None:
    """The newest ``anchor`` of ``institution`` in a (final) consortium chain store, or ``None``.

    Scans backwards from the head, so a member that anchors regularly finds its
    anchor in the last few blocks.
    """
    head = consortium.head_header_bytes()
    if head is None:
        return None
    # Stored transactions are canonical JSON: a byte search skips all others undecoded.
    kind = b'"type":"' + ANCHOR.encode() + b'"'
    who = b'"institution":' + json.dumps(institution, ensure_ascii=False).encode()
    for height in range(BlockHeader.decode(head).height, 0, -1):
        block = consortium.block(height)
        for data in reversed(block.tx_data):
            if kind not in data or who not in data:
                continue
            try:
                tx = Transaction.decode(data)
            except InvalidInput:
                continue  # `verify` reports a malformed consortium chain
            if tx.type != ANCHOR or tx.body.get("institution") != institution:
                continue
            body = tx.body
            try:
                return AnchorRecord(
                    institution=institution,
                    height=int(body["height"]),
                    log_size=int(body["log_size"]),
                    log_root=bytes.fromhex(str(body["log_root"])),
                    block_hash=bytes.fromhex(str(body["block_hash"])),
                    tx_hash=sha256(data),
                )
            except (KeyError, TypeError, ValueError):
                continue
    return None


def check_against_anchor(store: ChainStore, anchor: AnchorRecord) -> None:
    """The chain must still hold what ``anchor`` (final on the consortium) published.

    Its log reaches the anchored size, the block at the anchored height has the
    anchored hash, and the log root at the anchored size is the anchored root.
    A chain behind its own anchor lost acknowledged blocks (e.g. a deleted or
    truncated SQLite WAL); extending it would fork the published history.
    """
    head_bytes = store.head_header_bytes()
    if head_bytes is None:
        raise _damaged("the private chain has no blocks")
    head = BlockHeader.decode(head_bytes)
    if head.log_size < anchor.log_size or head.height < anchor.height:
        raise _damaged(
            f"the private chain ends at height {head.height} ({head.log_size} transactions),"
            f" behind its own final anchor at height {anchor.height} ({anchor.log_size}"
            " transactions): acknowledged blocks were lost"
        )
    try:
        if store.block_hash(anchor.height) != anchor.block_hash:
            raise _damaged(
                f"private chain block {anchor.height} is not the block its final anchor published"
            )
        root = log_root_at(store, anchor.log_size)
    except NotFound as exc:
        raise _damaged(f"the private chain is incomplete ({exc})") from None
    if root != anchor.log_root:
        raise _damaged(
            f"the private chain's log root at size {anchor.log_size} is not the one its"
            " final anchor published"
        )


def check_private_store(
    store: ChainStore,
    *,
    key: VerifyingKey | None,
    indexed_height: int | None = None,
    anchor: AnchorRecord | None = None,
    recent_blocks: int = RECENT_BLOCKS,
    full: bool = False,
) -> StoreCheck:
    """The start-up check of a private chain store (see the module docstring).

    ``indexed_height``: the highest chain height the record index saw durable.
    ``anchor``: the institution's own last final anchor, if any. ``full``
    re-derives every block instead of the newest (``recent_blocks`` at most,
    fewer once they hold :data:`RECENT_TXS` transactions).
    """
    store.check_storage()
    head_bytes = store.head_header_bytes()
    if head_bytes is None:
        raise _damaged("the private chain has no blocks")
    head = _header_of_head(head_bytes)
    if indexed_height is not None and head.height < indexed_height:
        raise _damaged(
            f"the private chain ends at height {head.height}, but record versions were written"
            f" after block {indexed_height} was committed: acknowledged blocks were lost"
        )
    start = 0 if full else _recent_start(store, head, recent_blocks)
    check_blocks(store, start, key=key)
    if anchor is not None:
        check_against_anchor(store, anchor)
    return StoreCheck(
        head_height=head.height,
        log_size=head.log_size,
        checked_from=start,
        anchored_size=anchor.log_size if anchor is not None else None,
    )


def _recent_start(store: ChainStore, head: BlockHeader, blocks: int) -> int:
    """The lowest height of the newest ``blocks`` blocks, fewer once they hold RECENT_TXS."""
    start, covered = head.height, head.tx_count
    while start > 0 and head.height - start + 1 < blocks and covered < RECENT_TXS:
        start -= 1
        try:
            covered += BlockHeader.decode(store.block(start).header_bytes).tx_count
        except (InvalidInput, NotFound):
            break  # check_blocks names the damage
    return start


def _header_of_head(head_bytes: bytes) -> BlockHeader:
    try:
        return BlockHeader.decode(head_bytes)
    except InvalidInput as exc:
        raise _damaged(f"the private chain's head header is malformed ({exc})") from None
