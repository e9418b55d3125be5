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

Each check is a named step (:data:`STEPS`, in the order taken), one
function whose docstring says what it checks, so an auditor can follow the
walk and re-implement it step by step. The first problem found raises a
:class:`VerificationError` naming the height and what is wrong, and its
``step`` names the step; nothing is repaired or written.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar

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
from medledger.core.transactions import CHAIN_GENESIS as GENESIS_TX
from medledger.ledger.proofs import consistency_proof
from medledger.storage.ports import ChainStore, StoredBlock

__all__ = [
    "BlockPolicy",
    "Checkpoint",
    "STEPS",
    "PrivateChainPolicy",
    "VerifyReport",
    "chain_label",
    "parse_checkpoint",
    "verify_chain",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A published log state: ``size`` entries with RFC 6962 root ``root``.

    ``source`` says where it was published (e.g. "consortium chain c, block 12"),
    for messages: its heights are of another chain than the one verified.
    """

    size: int
    root: bytes
    source: str = ""

    def published(self) -> str:
        return f" in {self.source}" if self.source else ""


def chain_label(chain_id: str) -> str:
    """How messages name a chain: "private chain of X" or "consortium chain Y"."""
    kind, _, name = chain_id.partition(":")
    if kind == "private" and name:
        return f"private chain of {name}"
    if kind == "consortium" and name:
        return f"consortium chain {name}"
    return f"chain {chain_id!r}" if chain_id else "the chain"


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

    def chain_id(self) -> str:
        """The chain's id where the rules know it before block 0 is read ("" if not)."""
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

    def chain_id(self) -> str:
        return ""  # the genesis block names it


#: The steps of :func:`verify_chain`, in the order it takes them. A failure names its
#: step (``VerificationError.step``), so an auditor can look up what was checked.
STEPS = (
    "published-empty-roots",
    "block-order",
    "block-hash",
    "header",
    "link",
    "transaction-positions",
    "transactions",
    "roots",
    "published-roots",
    "merkle-nodes",
    "signatures",
    "head",
    "checkpoints",
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _step(name: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Mark a function as the step ``name``: its failures are tagged with the step."""
    assert name in STEPS, name

    def mark(check: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(check)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return check(*args, **kwargs)
            except VerificationError as exc:
                if exc.step is None:
                    exc.step = name
                raise

        return run

    return mark


@dataclass(slots=True, kw_only=True)
class _Walk:
    """What the walk has re-derived so far, from genesis up to the block it is at."""

    policy: BlockPolicy
    #: Published checkpoints not yet reached, smallest first.
    pending: list[Checkpoint]
    log: CompactRange = field(default_factory=CompactRange)
    stored_nodes: Iterator[tuple[NodeID, bytes]] = field(default_factory=lambda: iter(()))
    chain_id: str = ""
    prev_hash: bytes = ZERO_HASH
    prev_time: int = 0
    height: int = -1


@dataclass(slots=True, kw_only=True)
class _BlockLog:
    """One block's transactions as rebuilt by the ``transactions`` step."""

    #: The Merkle tree of this block's transactions alone (its ``tx_root``).
    txs: CompactRange = field(default_factory=CompactRange)
    #: The log's perfect subtrees this block completed, to compare with the stored ones.
    created: list[tuple[NodeID, bytes]] = field(default_factory=list)
    #: A published root this block's log contradicts; reported after the block's own checks.
    rewritten: InconsistentLog | None = None


@_step("published-empty-roots")
def check_empty_roots(pending: list[Checkpoint]) -> None:
    """A root published for size 0 must be the empty tree's (and is then used up)."""
    while pending and pending[0].size == 0:
        if pending.pop(0).root != EMPTY_ROOT:
            raise InconsistentLog("a root other than the empty tree's was published for size 0")


@_step("block-order")
def check_block_order(walk: _Walk, block: StoredBlock) -> None:
    """Blocks are stored at heights 0, 1, 2, … with none missing."""
    if block.height != walk.height:
        raise _fail(walk.height, f"missing (next stored block is at height {block.height})")


@_step("block-hash")
def check_block_hash(block: StoredBlock) -> None:
    """The stored block hash is the SHA-256 of the stored header bytes."""
    if sha256(block.header_bytes) != block.block_hash:
        raise _fail(block.height, "stored block hash does not match the header")


@_step("header")
def decode_header(block: StoredBlock) -> BlockHeader:
    """The header bytes are a canonical block header that states the block's own height."""
    try:
        header = BlockHeader.decode(block.header_bytes)
    except InvalidInput as exc:
        raise _fail(block.height, f"header is malformed ({exc})") from None
    if header.height != block.height:
        raise _fail(block.height, f"header says height {header.height}")
    return header


@_step("link")
def check_link(walk: _Walk, header: BlockHeader) -> None:
    """The header names the genesis block's chain, links to the previous block's hash,
    and its time does not go back before the previous block's."""
    h = header.height
    if h == 0:
        walk.chain_id = header.chain
    elif header.chain != walk.chain_id:
        raise _fail(h, f"header names chain {header.chain!r}, not {walk.chain_id!r}")
    if header.prev_hash != walk.prev_hash:
        raise _fail(h, "prev_hash does not link to the previous block")
    if header.time_ms < walk.prev_time:
        raise _fail(h, "time goes backwards")


@_step("transaction-positions")
def check_transaction_positions(walk: _Walk, block: StoredBlock, header: BlockHeader) -> None:
    """The block's transactions continue the log where the previous block ended, and as
    many are stored as the header counts."""
    if block.first_index != walk.log.size:
        raise _fail(
            block.height, f"first transaction index {block.first_index}, expected {walk.log.size}"
        )
    if len(block.tx_data) != header.tx_count:
        raise _fail(
            block.height,
            f"{len(block.tx_data)} transactions stored, header says {header.tx_count}",
        )


@_step("transactions")
def check_transactions(walk: _Walk, block: StoredBlock, header: BlockHeader) -> _BlockLog:
    """Every transaction is canonical, names this chain and is valid under the chain's
    rules (the policy: e.g. a single genesis; for the consortium, signatures, quorums and
    anchors); the genesis block has its genesis transaction; the policy accepts the
    block's time. Each transaction is appended to the rebuilt log."""
    h = block.height
    built = _BlockLog()
    walk.policy.begin_block(h, walk.prev_time)
    for i, data in enumerate(block.tx_data):
        try:
            tx = Transaction.decode(data)
        except InvalidInput as exc:
            raise _fail(h, f"transaction {block.first_index + i} is malformed ({exc})") from None
        if tx.chain != walk.chain_id:
            raise _fail(h, f"transaction {block.first_index + i} names another chain")
        walk.policy.transaction(h, block.first_index + i, tx)
        leaf = leaf_hash(data)
        built.txs.push(leaf)
        built.created.extend(walk.log.append(leaf)[1:])
        # A published root that disagrees is reported after the block's own checks,
        # so an edited block is named as such even where an anchor ends inside it.
        while walk.pending and walk.pending[0].size == walk.log.size:
            cp = walk.pending.pop(0)
            if walk.log.root() != cp.root and built.rewritten is None:
                built.rewritten = InconsistentLog(
                    f"block {h}: the chain's root at size {cp.size} is {walk.log.root().hex()}, "
                    f"but {cp.root.hex()} was published{cp.published()}; history was rewritten"
                )
    if h == 0 and header.tx_count == 0:
        raise _fail(0, "genesis block has no genesis transaction")
    walk.policy.end_block(h, header.time_ms)
    return built


@_step("roots")
def check_roots(walk: _Walk, header: BlockHeader, built: _BlockLog) -> None:
    """``tx_root`` is the Merkle root of the block's transactions; ``log_size`` and
    ``log_root`` are the size and RFC 6962 root of the log of every transaction so far."""
    h = header.height
    if built.txs.root() != header.tx_root:
        where = _where(built.created, walk.stored_nodes)
        raise _fail(h, "tx_root does not match the block's transactions" + where)
    if header.log_size != walk.log.size:
        raise _fail(h, f"log_size {header.log_size}, but the log holds {walk.log.size}")
    if walk.log.root() != header.log_root:
        raise _fail(h, "log_root does not match the log of all transactions")


@_step("published-roots")
def check_published_roots(built: _BlockLog) -> None:
    """Every published root whose size ends inside this block equals the rebuilt log's
    root at that size: otherwise history was rewritten after it was published."""
    if built.rewritten is not None:
        raise built.rewritten


@_step("merkle-nodes")
def check_stored_nodes(walk: _Walk, height: int, built: _BlockLog) -> None:
    """The stored Merkle nodes that serve proofs equal the ones rebuilt from the log."""
    for node, node_h in built.created:
        if next(walk.stored_nodes, None) != (node, node_h):
            raise _fail(
                height,
                f"stored Merkle node level {node.level} index {node.index} is wrong or missing",
            )


@_step("signatures")
def check_signatures(walk: _Walk, block: StoredBlock) -> None:
    """The block hash is signed as the chain's rules require (the policy: the institution's
    key for a private chain; a quorum certificate for the consortium)."""
    walk.policy.signatures(block.height, block.block_hash, block.signatures)


@_step("head")
def check_head(walk: _Walk, store: ChainStore) -> None:
    """The chain has blocks, and nothing is stored beyond its head (no Merkle node, block
    or transaction): deleting the last blocks leaves such remains."""
    if walk.height < 0:
        raise NotFound("the chain has no blocks")
    if next(walk.stored_nodes, None) is not None:
        raise _fail(
            walk.height, "Merkle nodes are stored beyond the head: later blocks were removed"
        )
    blocks, txs, _ = store.counts()
    if blocks != walk.height + 1 or txs != walk.log.size:
        raise _fail(
            walk.height, "transactions are stored beyond the head: later blocks were removed"
        )


@_step("checkpoints")
def check_checkpoints(walk: _Walk, store: ChainStore, checkpoints: Sequence[Checkpoint]) -> None:
    """No published root is beyond the head (the chain was truncated otherwise), and the
    consistency proof this store serves from each published root to the head verifies."""
    for cp in walk.pending:
        raise InconsistentLog(
            f"a root at size {cp.size} was published{cp.published()}, but the chain holds only "
            f"{walk.log.size} transactions: history was truncated"
        )
    for cp in checkpoints:
        # The served proof must agree too: proof-serving nodes are part of the contract.
        try:
            proof = consistency_proof(store, cp.size, walk.log.size)
            verify_consistency(cp.size, walk.log.size, proof, cp.root, walk.log.root())
        except MedledgerError as exc:
            raise InconsistentLog(
                f"consistency proof from size {cp.size} (published{cp.published()}) fails: {exc}"
            ) from None


def verify_chain(
    store: ChainStore,
    *,
    expected_key: VerifyingKey | None = None,
    policy: BlockPolicy | None = None,
    checkpoints: Sequence[Checkpoint] = (),
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify the whole chain in ``store``; return a report or raise at the first problem.

    Takes the :data:`STEPS` in order — per block from ``block-order`` to
    ``signatures``, then ``head`` and ``checkpoints`` — and raises the first
    failure as a :class:`VerificationError` whose ``step`` names the step.
    ``policy`` judges transactions and signatures (default: a private chain,
    whose genesis must name ``expected_key`` when given). ``progress`` is
    called with the number of transactions verified after each block.
    """
    walk = _Walk(
        policy=policy if policy is not None else PrivateChainPolicy(expected_key),
        pending=sorted(checkpoints, key=lambda c: c.size),
    )
    try:
        check_empty_roots(walk.pending)
        walk.stored_nodes = store.iter_nodes()
        for block in store.iter_blocks():
            walk.height += 1
            check_block_order(walk, block)
            check_block_hash(block)
            header = decode_header(block)
            check_link(walk, header)
            check_transaction_positions(walk, block, header)
            built = check_transactions(walk, block, header)
            check_roots(walk, header, built)
            check_published_roots(built)
            check_stored_nodes(walk, block.height, built)
            check_signatures(walk, block)
            walk.prev_hash, walk.prev_time = block.block_hash, header.time_ms
            if progress is not None:
                progress(walk.log.size)
        check_head(walk, store)
        check_checkpoints(walk, store, checkpoints)
        return VerifyReport(
            chain=walk.chain_id,
            blocks=walk.height + 1,
            log_size=walk.log.size,
            log_root=walk.log.root(),
            head_hash=walk.prev_hash,
            signer=walk.policy.signer(),
            checkpoints=len(checkpoints),
        )
    except VerificationError as exc:
        # Every message names the chain its heights are of (an auditor checks two
        # kinds of chain, and an anchor carries heights of both).
        if exc.chain is None:
            exc.chain = chain_label(
                walk.policy.chain_id() or walk.chain_id or _claimed_chain(store)
            )
        raise


def _claimed_chain(store: ChainStore) -> str:
    """The chain block 0's header names, read leniently (for a message about a bad block 0)."""
    try:
        header = json.loads(store.block(0).header_bytes)
    except (MedledgerError, ValueError):
        return ""
    chain = header.get("chain") if isinstance(header, dict) else None
    return chain if isinstance(chain, str) else ""


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
