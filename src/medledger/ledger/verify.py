"""Full verification of a stored chain: every byte the chain commits to, re-derived.

``verify_chain`` walks the chain from genesis and checks, per block:
canonical header bytes and their hash; height, chain id and the hash link;
transaction bytes canonical and for this chain; ``tx_root``; ``log_size`` and
``log_root`` (the RFC 6962 log rebuilt incrementally); non-decreasing time;
the institution's signature over the block hash; and that the stored Merkle
nodes that serve proofs equal the rebuilt ones. It finally checks that
nothing is stored beyond the head (truncated history leaves such remains)
and that the chain is consistent with every published ``(size, root)``
checkpoint given — the only defence against an insider who rewrites history
and re-signs it with the institution's own key.

The first problem found raises a :class:`VerificationError` naming the height
and what is wrong; nothing is repaired or written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from medledger.core.errors import (
    InconsistentLog,
    IntegrityError,
    InvalidInput,
    InvalidSignature,
    MedledgerError,
    NotFound,
    VerificationError,
)
from medledger.core.hashing import ZERO_HASH, sha256
from medledger.core.keys import VerifyingKey
from medledger.core.merkle import EMPTY_ROOT, CompactRange, NodeID, leaf_hash, verify_consistency
from medledger.core.models import BlockHeader, Signature, Transaction
from medledger.ledger.private import GENESIS_TX
from medledger.ledger.proofs import consistency_proof
from medledger.storage.ports import ChainStore

__all__ = [
    "BlockPolicy",
    "Checkpoint",
    "PrivateChainPolicy",
    "VerifyReport",
    "parse_checkpoint",
    "verify_chain",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A published log state: ``size`` entries with RFC 6962 root ``root``."""

    size: int
    root: bytes


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse ``SIZE:ROOTHEX`` as given to ``verify --anchor``."""
    size_text, sep, root_text = text.partition(":")
    if not sep or not (size_text.isascii() and size_text.isdigit()):
        raise InvalidInput(f"anchor must be SIZE:ROOT (hex), got {text!r}")
    try:
        root = bytes.fromhex(root_text)
    except ValueError:
        raise InvalidInput("anchor root is not hex") from None
    if len(root) != 32:
        raise InvalidInput("anchor root must be 32 bytes (64 hex characters)")
    return Checkpoint(size=int(size_text), root=root)


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What a successful verification covered."""

    chain: str
    blocks: int
    log_size: int
    log_root: bytes
    head_hash: bytes
    signer: str
    checkpoints: int


def _fail(
    height: int, what: str, cls: type[VerificationError] = IntegrityError
) -> VerificationError:
    return cls(f"block {height}: {what}")


class BlockPolicy(Protocol):
    """What makes a block valid beyond structure: its transactions and its signatures."""

    def begin_block(self, height: int, prev_time_ms: int) -> None:
        """Called before a block's transactions are checked (with the previous block's time)."""
        ...

    def transaction(self, height: int, index: int, tx: Transaction) -> None:
        """Check (and account for) one transaction; ``index`` 0 of height 0 is the genesis tx."""
        ...

    def end_block(self, height: int, time_ms: int) -> None:
        """Called after a block's transactions, with the block's own time: check it."""
        ...

    def signatures(self, height: int, block_hash: bytes, signatures: Sequence[Signature]) -> None:
        """Check the block's signatures; raise :class:`VerificationError`."""
        ...

    def signer(self) -> str:
        """Who signs this chain, for the report."""
        ...


class PrivateChainPolicy:
    """An institution's chain: every block signed by the key its genesis names."""

    def __init__(self, expected_key: VerifyingKey | None) -> None:
        self._expected = expected_key
        self._key: VerifyingKey | None = None

    def begin_block(self, height: int, prev_time_ms: int) -> None:
        return None

    def transaction(self, height: int, index: int, tx: Transaction) -> None:
        if height == 0 and index == 0:
            self._key = _genesis_key(tx, self._expected)
        elif tx.type == GENESIS_TX:
            raise _fail(height, f"transaction {index} is a second genesis")

    def end_block(self, height: int, time_ms: int) -> None:
        return None  # the institution's own clock dates its blocks; only order is checked

    def signatures(self, height: int, block_hash: bytes, signatures: Sequence[Signature]) -> None:
        if self._key is None:
            raise _fail(height, "no genesis transaction names the institution key")
        _check_signatures(height, self._key, signatures, block_hash)

    def signer(self) -> str:
        return self._key.fingerprint if self._key else ""


def verify_chain(
    store: ChainStore,
    *,
    expected_key: VerifyingKey | None = None,
    policy: BlockPolicy | None = None,
    checkpoints: Sequence[Checkpoint] = (),
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify the whole chain in ``store``; return a report or raise at the first problem.

    ``policy`` judges transactions and signatures (default: a private chain,
    whose genesis must name ``expected_key`` when given). ``progress`` is
    called with the number of transactions verified after each block.
    """
    policy = policy if policy is not None else PrivateChainPolicy(expected_key)
    pending_checks = sorted(checkpoints, key=lambda c: c.size)
    while pending_checks and pending_checks[0].size == 0:
        if pending_checks.pop(0).root != EMPTY_ROOT:
            raise InconsistentLog("a root other than the empty tree's was published for size 0")
    log = CompactRange()
    stored_nodes: Iterator[tuple[NodeID, bytes]] = store.iter_nodes()
    chain_id = ""
    prev_hash, prev_time, height = ZERO_HASH, 0, -1
    for block in store.iter_blocks():
        height += 1
        h = block.height
        if h != height:
            raise _fail(height, f"missing (next stored block is at height {h})")
        if sha256(block.header_bytes) != block.block_hash:
            raise _fail(h, "stored block hash does not match the header")
        try:
            header = BlockHeader.decode(block.header_bytes)
        except InvalidInput as exc:
            raise _fail(h, f"header is malformed ({exc})") from None
        if header.height != h:
            raise _fail(h, f"header says height {header.height}")
        if h == 0:
            chain_id = header.chain
        elif header.chain != chain_id:
            raise _fail(h, f"header names chain {header.chain!r}, not {chain_id!r}")
        if header.prev_hash != prev_hash:
            raise _fail(h, "prev_hash does not link to the previous block")
        if header.time_ms < prev_time:
            raise _fail(h, "time goes backwards")
        if block.first_index != log.size:
            raise _fail(h, f"first transaction index {block.first_index}, expected {log.size}")
        if len(block.tx_data) != header.tx_count:
            raise _fail(
                h, f"{len(block.tx_data)} transactions stored, header says {header.tx_count}"
            )
        block_log = CompactRange()
        created: list[tuple[NodeID, bytes]] = []
        # A published root that disagrees is reported after the block's own checks,
        # so an edited block is named as such even where an anchor ends inside it.
        rewritten: InconsistentLog | None = None
        policy.begin_block(h, prev_time)
        for i, data in enumerate(block.tx_data):
            try:
                tx = Transaction.decode(data)
            except InvalidInput as exc:
                raise _fail(
                    h, f"transaction {block.first_index + i} is malformed ({exc})"
                ) from None
            if tx.chain != chain_id:
                raise _fail(h, f"transaction {block.first_index + i} names another chain")
            policy.transaction(h, block.first_index + i, tx)
            leaf = leaf_hash(data)
            block_log.push(leaf)
            created.extend(log.append(leaf)[1:])
            while pending_checks and pending_checks[0].size == log.size:
                cp = pending_checks.pop(0)
                if log.root() != cp.root and rewritten is None:
                    rewritten = InconsistentLog(
                        f"block {h}: the chain's root at size {cp.size} is {log.root().hex()}, "
                        f"but {cp.root.hex()} was published; history was rewritten"
                    )
        if h == 0 and header.tx_count == 0:
            raise _fail(0, "genesis block has no genesis transaction")
        policy.end_block(h, header.time_ms)
        if block_log.root() != header.tx_root:
            raise _fail(
                h, "tx_root does not match the block's transactions" + _where(created, stored_nodes)
            )
        if header.log_size != log.size:
            raise _fail(h, f"log_size {header.log_size}, but the log holds {log.size}")
        if log.root() != header.log_root:
            raise _fail(h, "log_root does not match the log of all transactions")
        if rewritten is not None:
            raise rewritten
        for node, node_h in created:
            if next(stored_nodes, None) != (node, node_h):
                raise _fail(
                    h,
                    f"stored Merkle node level {node.level} index {node.index} is wrong or missing",
                )
        policy.signatures(h, block.block_hash, block.signatures)
        prev_hash, prev_time = block.block_hash, header.time_ms
        if progress is not None:
            progress(log.size)
    if height < 0:
        raise NotFound("the chain has no blocks")
    extra = next(stored_nodes, None)
    if extra is not None:
        raise _fail(height, "Merkle nodes are stored beyond the head: later blocks were removed")
    blocks, txs, _ = store.counts()
    if blocks != height + 1 or txs != log.size:
        raise _fail(height, "transactions are stored beyond the head: later blocks were removed")
    for cp in pending_checks:
        raise InconsistentLog(
            f"a root at size {cp.size} was published, but the chain holds only {log.size} "
            "transactions: history was truncated"
        )
    for cp in checkpoints:
        # The served proof must agree too: proof-serving nodes are part of the contract.
        try:
            proof = consistency_proof(store, cp.size, log.size)
            verify_consistency(cp.size, log.size, proof, cp.root, log.root())
        except MedledgerError as exc:
            raise InconsistentLog(f"consistency proof from size {cp.size} fails: {exc}") from None
    return VerifyReport(
        chain=chain_id,
        blocks=height + 1,
        log_size=log.size,
        log_root=log.root(),
        head_hash=prev_hash,
        signer=policy.signer(),
        checkpoints=len(checkpoints),
    )


def _where(created: Sequence[tuple[NodeID, bytes]], stored: Iterator[tuple[NodeID, bytes]]) -> str:
    """Locate a changed transaction by the first stored node that disagrees with the rebuilt one."""
    for node, node_h in created:
        item = next(stored, None)
        if item is None or item[0] != node:
            break
        if item[1] != node_h:
            first = node.index << node.level
            last = first + (1 << node.level) - 1
            return f" (log entries {first}-{last} differ from when they were written)"
    return ""


def _genesis_key(tx: Transaction, expected: VerifyingKey | None) -> VerifyingKey:
    if tx.type != GENESIS_TX:
        raise _fail(0, "the first transaction is not the genesis transaction")
    try:
        key = VerifyingKey.from_der(bytes.fromhex(str(tx.body.get("signing_key", ""))))
    except (ValueError, InvalidInput):
        raise _fail(0, "genesis transaction has no valid signing key") from None
    if expected is not None and key != expected:
        raise _fail(
            0, "genesis names a different institution key than this node's", InvalidSignature
        )
    return key


def _check_signatures(
    height: int, key: VerifyingKey, signatures: Sequence[Signature], block_hash: bytes
) -> None:
    for sig in signatures:
        if isinstance(sig, Signature) and sig.signer == key.fingerprint:
            try:
                key.verify(sig, block_hash)
            except InvalidSignature:
                raise _fail(
                    height, "institution signature does not verify", InvalidSignature
                ) from None
            return
    raise _fail(height, "no signature by the institution key", InvalidSignature)
