"""An institution's private chain: one sequencer, group commit, signed blocks.

Writers call :meth:`PrivateChain.submit` concurrently. Transactions wait in
a queue; the sequencer drains whatever is queued (up to ``max_txs``), builds
one block — RFC 6962 log update, header, ECDSA signature — and writes it in
one storage transaction (one fsync). Only after that commit returns does
each writer get its :class:`~medledger.core.models.Receipt`: **an ack means
durable**. While one block commits on the storage thread, new submissions
queue up, so the previous commit is the batching window: under load blocks
grow, and at low load a lone write is committed at once (``max_wait_ms=0``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from medledger.core.encoding import canonical_bytes
from medledger.core.errors import (
    IntegrityError,
    InvalidInput,
    MedledgerError,
    StorageError,
)
from medledger.core.hashing import ZERO_HASH, sha256
from medledger.core.keys import SigningKey
from medledger.core.merkle import CompactRange, leaf_hash, range_nodes
from medledger.core.models import BlockHeader, Receipt, Transaction
from medledger.core.transactions import CHAIN_GENESIS as GENESIS_TX
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.sequencer_config import SequencerConfig
from medledger.storage.ports import ChainStore, NewBlock

__all__ = ["GENESIS_TX", "MAX_TX_BYTES", "PrivateChain", "SequencerConfig"]

#: A single transaction larger than this is refused: records live in the blob
#: store, and chains carry only hashes and pseudonyms.
MAX_TX_BYTES = 64 * 1024


def _as_storage_error(exc: BaseException) -> Exception:
    if isinstance(exc, MedledgerError):
        return exc
    return StorageError(f"block commit failed: {type(exc).__name__}: {exc}")


async def _outcome(fut: asyncio.Future[None]) -> Exception | None:
    """``None`` if the commit succeeded, else the error to give its writers."""
    try:
        await fut
    except Exception as exc:
        return _as_storage_error(exc)
    return None


def _group_outcome(futures: Sequence[asyncio.Future[Receipt]]) -> list[Receipt] | MedledgerError:
    """A finished group's receipts, or the error its block failed with."""
    for fut in futures:
        if fut.cancelled():
            return StorageError("the block commit was cancelled")
        exc = fut.exception()
        if exc is not None:
            return exc if isinstance(exc, MedledgerError) else StorageError(str(exc))
    return [fut.result() for fut in futures]


def _fail_all(batch: Sequence[_Pending], exc: Exception) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)


@dataclass(slots=True)
class _Tip:
    """The tip to return to if a block is not committed."""

    log: CompactRange
    header: BlockHeader
    block_hash: bytes


@dataclass(slots=True)
class _InFlight:
    block: NewBlock
    batch: list[_Pending]
    commit: asyncio.Future[None]
    before: _Tip


@dataclass(slots=True)
class _Pending:
    data: bytes
    tx_hash: bytes
    future: asyncio.Future[Receipt]
    group_tail: int = 0  # how many later queue entries belong to the same atomic group


class PrivateChain:
    """One institution's chain over a :class:`ChainStore`.

    Create a new chain with :meth:`create` (writes the genesis block), open an
    existing one with the constructor. Call :meth:`close` to drain the queue.
    """

    def __init__(
        self,
        store: ChainStore,
        key: SigningKey,
        *,
        proposer: str,
        config: SequencerConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._key = key
        self._proposer = proposer
        self._config = config or SequencerConfig()
        self._clock: Clock = clock or SystemClock()
        head = store.head()
        if head is None:
            raise StorageError("chain has no genesis block; create it with PrivateChain.create")
        header = BlockHeader.decode(head.header_bytes)
        self.chain_id = header.chain
        self._head, self._head_hash = header, head.block_hash
        self._tip, self._tip_hash = header, head.block_hash
        self._log = self._load_log(header)
        self._queue: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medledger-commit")

    def _load_log(self, header: BlockHeader) -> CompactRange:
        nodes = range_nodes(0, header.log_size)
        fetched = self._store.node_hashes(nodes)
        log = CompactRange(header.log_size, [fetched[n] for n in nodes])
        if log.root() != header.log_root:
            raise IntegrityError(
                f"block {header.height}: stored Merkle nodes do not give the head's log root"
            )
        return log

    @classmethod
    def create(
        cls,
        store: ChainStore,
        key: SigningKey,
        *,
        chain_id: str,
        institution: str,
        name: str,
        config: SequencerConfig | None = None,
        clock: Clock | None = None,
    ) -> PrivateChain:
        """Write the genesis block (height 0, one ``chain.genesis`` tx naming the key)."""
        clk: Clock = clock or SystemClock()
        now = clk.now_ms()
        genesis = Transaction(
            type=GENESIS_TX,
            chain=chain_id,
            body={
                "institution": institution,
                "name": name,
                "signing_key": key.public.der().hex(),
                "signing_fingerprint": key.fingerprint,
            },
            time_ms=now,
        )
        data = genesis.encode()
        log = CompactRange()
        nodes = log.append(leaf_hash(data))[1:]
        header = BlockHeader(
            chain=chain_id,
            height=0,
            prev_hash=ZERO_HASH,
            tx_root=log.root(),
            tx_count=1,
            log_size=1,
            log_root=log.root(),
            time_ms=now,
            proposer=institution,
        )
        header_bytes = header.encode()
        block_hash = sha256(header_bytes)
        store.append_block(
            NewBlock(
                header=header,
                header_bytes=header_bytes,
                block_hash=block_hash,
                signatures=(key.sign(block_hash),),
                first_index=0,
                tx_data=[data],
                tx_hashes=[sha256(data)],
                nodes=nodes,
            )
        )
        return cls(store, key, proposer=institution, config=config, clock=clk)

    # -- state ---------------------------------------------------------------

    @property
    def head(self) -> BlockHeader:
        """Header of the last durable block."""
        return self._head

    @property
    def head_hash(self) -> bytes:
        return self._head_hash

    @property
    def durable_height(self) -> int:
        """Height of the last durable block (what a crash can never take back)."""
        return self._head.height

    @property
    def store(self) -> ChainStore:
        return self._store

    # -- writing ---------------------------------------------------------------

    async def submit(self, tx_type: str, body: dict[str, Any]) -> Receipt:
        """Append a transaction of ``tx_type`` with ``body``; return once durable."""
        tx = Transaction(type=tx_type, chain=self.chain_id, body=body, time_ms=self._clock.now_ms())
        return await self.submit_tx(tx)

    async def submit_tx(self, tx: Transaction) -> Receipt:
        """Append ``tx`` (which must name this chain); return once its block is durable.

        Raises :class:`InvalidInput` for a transaction this chain refuses, and
        :class:`StorageError` if the block could not be committed (then the
        transaction is not on the chain).
        """
        return (await self.submit_many([tx]))[0]

    async def submit_many(self, txs: Sequence[Transaction]) -> list[Receipt]:
        """Append ``txs`` atomically: all in one block, in order, or none of them."""
        return await self._submit_group([self._encode(tx) for tx in txs])

    async def submit_encoded(self, encoded: Sequence[bytes]) -> list[Receipt]:
        """Append transactions given as their canonical bytes, atomically; return once durable.

        For the node's own writers that lay out a transaction's bytes directly (an
        ``access`` entry per read: ``services.access.access_tx_bytes``) rather than
        building a :class:`Transaction` to encode. The caller vouches that each item
        is the canonical encoding of an unsigned transaction naming this chain, of a
        type other than ``chain.genesis`` (what :meth:`submit_many` checks); nothing
        from outside the node reaches here. The size limit is still checked
        (:class:`InvalidInput`, nothing queued).
        """
        for data in encoded:
            if len(data) > MAX_TX_BYTES:
                raise InvalidInput(f"transaction is {len(data)} bytes; the limit is {MAX_TX_BYTES}")
        return await self._submit_group(encoded)

    async def _submit_group(self, encoded: Sequence[bytes]) -> list[Receipt]:
        """Queue checked, encoded transactions as one atomic group; their receipts once durable."""
        if not encoded:
            return []
        (futures,) = self._enqueue([encoded])
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    async def submit_groups(
        self, groups: Sequence[Sequence[Transaction]]
    ) -> list[list[Receipt] | MedledgerError]:
        """Append each group atomically, and each independently of the others.

        The groups are queued together, so they share a block when they fit in
        one (``max_txs``): one signature and one sync for all of them. A group
        this chain refuses (:meth:`_encode`: another chain, too large) gets its
        :class:`InvalidInput` and the others are still appended; a block that
        cannot be committed fails the groups in it with its storage error.
        The result is, per group in order, its receipts or its error; this
        method raises only if the chain is closing (nothing was queued then).
        """
        outcomes: list[list[bytes] | MedledgerError] = []
        for group in groups:
            try:
                encoded = [self._encode(tx) for tx in group]
            except MedledgerError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(encoded if encoded else InvalidInput("an empty group"))
        queued = [o for o in outcomes if isinstance(o, list)]
        if not queued:
            return [o for o in outcomes if not isinstance(o, list)]
        # Queued in one call: no block is cut between two of these groups' entries.
        queued_futures = self._enqueue(queued)
        await asyncio.wait([f for fs in queued_futures for f in fs])
        futures = iter(queued_futures)
        results: list[list[Receipt] | MedledgerError] = []
        for outcome in outcomes:
            if not isinstance(outcome, list):
                results.append(outcome)
                continue
            results.append(_group_outcome(next(futures)))
        return results

    def _enqueue(self, groups: Sequence[Sequence[bytes]]) -> list[list[asyncio.Future[Receipt]]]:
        """Queue each group of encoded transactions (each one atomic) and wake the sequencer;
        the futures of each group, in order."""
        if self._closing:
            raise StorageError("chain is closing; no new transactions accepted")
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop:
            if not self._task.done():
                raise StorageError("this chain's sequencer runs in another event loop")
            self._task = None
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._sequence(), name="medledger-sequencer")
        out: list[list[asyncio.Future[Receipt]]] = []
        for encoded in groups:
            futures: list[asyncio.Future[Receipt]] = []
            last = len(encoded) - 1
            for i, data in enumerate(encoded):
                fut: asyncio.Future[Receipt] = loop.create_future()
                self._queue.append(_Pending(data, sha256(data), fut, last - i))
                futures.append(fut)
            out.append(futures)
        assert self._wakeup is not None
        self._wakeup.set()
        return out

    def _encode(self, tx: Transaction) -> bytes:
        if tx.chain != self.chain_id:
            raise InvalidInput(f"transaction names chain {tx.chain!r}, not {self.chain_id!r}")
        if tx.type == GENESIS_TX:
            raise InvalidInput("a chain has exactly one genesis transaction")
        data = canonical_bytes(tx.to_json())
        if len(data) > MAX_TX_BYTES:
            raise InvalidInput(f"transaction is {len(data)} bytes; the limit is {MAX_TX_BYTES}")
        return data

    async def _sequence(self) -> None:
        """Cut, sign and commit blocks until closed.

        Two-stage pipeline: while block N is being written on the commit
        thread, block N+1 is built (hashing, signing) here. Writers of N are
        acknowledged only after N's commit returned; if it fails, N and the
        block built on top of it are both failed and the tip rolls back.
        """
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        inflight: _InFlight | None = None
        while True:
            if not self._queue:
                if inflight is not None:
                    # Wait for the commit *or* new writers, so the next block is
                    # built on this thread while the commit thread writes.
                    woken: asyncio.Future[Any] = asyncio.ensure_future(self._wakeup.wait())
                    await asyncio.wait(
                        [inflight.commit, woken], return_when=asyncio.FIRST_COMPLETED
                    )
                    if not woken.done():
                        woken.cancel()
                    self._wakeup.clear()
                    if inflight.commit.done():
                        self._finish(inflight, await _outcome(inflight.commit))
                        inflight = None
                    else:
                        await asyncio.sleep(0)  # let every writer that is ready enqueue
                    continue
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            if (
                inflight is None
                and self._config.max_wait_ms
                and len(self._queue) < self._config.max_txs
            ):
                await asyncio.sleep(self._config.max_wait_ms / 1000)
            take = min(len(self._queue), self._config.max_txs)
            take += self._queue[take - 1].group_tail  # never split a submit_many group
            batch = self._queue[:take]
            del self._queue[:take]
            saved = _Tip(self._log.copy(), self._tip, self._tip_hash)
            try:
                block = self._build(batch)
            except Exception as exc:  # a bug: never ack, never leave the tip advanced
                self._restore(saved)
                _fail_all(batch, _as_storage_error(exc))
                continue
            if inflight is not None:
                failure = await _outcome(inflight.commit)
                self._finish(inflight, failure)
                inflight = None
                if failure is not None:
                    # This block was built on the one that failed: it fails too.
                    _fail_all(batch, failure)
                    continue
            fut = loop.run_in_executor(self._executor, self._store.append_block, block)
            inflight = _InFlight(block, batch, fut, saved)

    def _finish(self, inflight: _InFlight, failure: Exception | None) -> None:
        if failure is not None:
            _fail_all(inflight.batch, failure)
            self._restore(inflight.before)
            return
        block = inflight.block
        self._head, self._head_hash = block.header, block.block_hash
        height, first = block.header.height, block.first_index
        for i, p in enumerate(inflight.batch):
            if not p.future.done():
                p.future.set_result(Receipt(height=height, index=first + i, tx_hash=p.tx_hash))

    def _restore(self, saved: _Tip) -> None:
        """Put the tip back where it was before a block that was not committed."""
        self._log, self._tip, self._tip_hash = saved.log, saved.header, saved.block_hash

    def _build(self, batch: Sequence[_Pending]) -> NewBlock:
        """Extend the log with ``batch`` and return the signed block (not yet stored)."""
        first = self._log.size
        created = []
        block_log = CompactRange()
        append, block_append = self._log.append, block_log.push
        for p in batch:
            leaf = leaf_hash(p.data)
            # Level-0 hashes are derivable from the stored transaction; keep the rest.
            created.extend(append(leaf)[1:])
            block_append(leaf)
        prev = self._tip
        header = BlockHeader(
            chain=self.chain_id,
            height=prev.height + 1,
            prev_hash=self._tip_hash,
            tx_root=block_log.root(),
            tx_count=len(batch),
            log_size=self._log.size,
            log_root=self._log.root(),
            time_ms=max(self._clock.now_ms(), prev.time_ms),
            proposer=self._proposer,
        )
        header_bytes = header.encode()
        block_hash = sha256(header_bytes)
        self._tip, self._tip_hash = header, block_hash
        return NewBlock(
            header=header,
            header_bytes=header_bytes,
            block_hash=block_hash,
            signatures=(self._key.sign(block_hash),),
            first_index=first,
            tx_data=[p.data for p in batch],
            tx_hashes=[p.tx_hash for p in batch],
            nodes=created,
        )

    def problem(self) -> str | None:
        """Health check: why the sequencer task died, if it did (writes would then wait)."""
        task = self._task
        if task is None or not task.done() or task.cancelled() or self._closing:
            return None
        exc = task.exception()
        if exc is None:
            return "sequencer ended (not restarted: restart the node)"
        return f"sequencer died: {type(exc).__name__} (not restarted: restart the node)"

    async def close(self) -> None:
        """Stop accepting writes, commit everything queued, stop the sequencer."""
        self._closing = True
        if self._task is not None and self._wakeup is not None:
            self._wakeup.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)
