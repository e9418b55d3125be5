"""Tests for :mod:`medledger.ledger.private` (group commit) and :mod:`medledger.ledger.proofs`.

Concurrency is real: hundreds of asyncio writers against one sequencer and a
real SQLite store. Storage failures come from ``FlakyStore``, a small
:class:`ChainStore` wrapper of our own whose ``append_block`` fails once
before writing anything. Proofs are checked with the pure verifiers of
:mod:`medledger.core.merkle` against ``root_at`` and the block headers, and
roots against a slow hashlib reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from chain_helpers import CHAIN, Chains, reference_root, write_rounds

from medledger.config import NodeConfig
from medledger.core.errors import (
    InvalidInput,
    MedledgerError,
    NotFound,
    RetryableStorageError,
    RootMismatch,
    StorageError,
)
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.merkle import (
    EMPTY_ROOT,
    NodeID,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from medledger.core.models import BlockHeader, Receipt, Transaction
from medledger.ledger.clock import Clock
from medledger.ledger.private import GENESIS_TX, MAX_TX_BYTES, PrivateChain, SequencerConfig
from medledger.ledger.proofs import consistency_proof, head_header, inclusion_proof, root_at
from medledger.ledger.verify import verify_chain
from medledger.node import open_chain, open_node
from medledger.storage.ports import ChainStore, NewBlock, StoredBlock
from medledger.storage.sqlite.chain import SqliteChainStore

Body = dict[str, Any]


def _key(body: Body) -> str:
    return json.dumps(body, sort_keys=True)


def headers(store: ChainStore) -> list[BlockHeader]:
    return [BlockHeader.decode(b.header_bytes) for b in store.iter_blocks()]


def check_receipts(store: ChainStore, acked: Sequence[tuple[Body, Receipt]]) -> None:
    """Every acknowledged transaction is durable where its receipt says, with that hash."""
    for body, receipt in acked:
        data = store.tx_data(receipt.index)
        assert sha256(data) == receipt.tx_hash
        assert Transaction.decode(data).body == body
        assert store.tx_location(receipt.tx_hash) == (receipt.height, receipt.index)
        block = store.block(receipt.height)
        assert block.first_index <= receipt.index < block.first_index + len(block.tx_data)


# -- group commit ---------------------------------------------------------------------------


def test_group_commit_with_many_concurrent_writers(chains: Chains, key: SigningKey) -> None:
    writers, per_writer = 200, 20
    chain = chains.create(key)
    store = chain.store

    async def writer(w: int) -> list[tuple[Body, Receipt]]:
        out = []
        for s in range(per_writer):
            body = {"writer": w, "seq": s}
            out.append((body, await chain.submit("record.put", body)))
        return out

    async def main() -> list[list[tuple[Body, Receipt]]]:
        try:
            return list(await asyncio.gather(*(writer(w) for w in range(writers))))
        finally:
            await chain.close()

    results = asyncio.run(main())
    total = writers * per_writer
    acked = [pair for per in results for pair in per]

    # Indexes are unique and contiguous after the genesis transaction.
    assert sorted(r.index for _, r in acked) == list(range(1, total + 1))
    assert len({r.tx_hash for _, r in acked}) == total
    # Each writer's own transactions are in the order it submitted them.
    for per in results:
        indexes = [r.index for _, r in per]
        assert indexes == sorted(indexes)
    check_receipts(store, acked)

    blocks = list(store.iter_blocks())
    hdrs = [BlockHeader.decode(b.header_bytes) for b in blocks]
    assert [h.height for h in hdrs] == list(range(len(blocks)))
    assert [b.first_index for b in blocks] == [h.log_size - h.tx_count for h in hdrs]
    assert sum(h.tx_count for h in hdrs) == total + 1
    # Batching happened: blocks hold many transactions, not one each.
    assert max(h.tx_count for h in hdrs) > 1
    assert len(blocks) - 1 <= total // 10
    assert store.counts()[:2] == (len(blocks), total + 1)
    assert chain.head == hdrs[-1]
    assert chain.head_hash == blocks[-1].block_hash

    report = verify_chain(store, expected_key=key.public)
    assert report.log_size == total + 1
    assert report.blocks == len(blocks)


@pytest.mark.parametrize("max_txs", [1, 7, 64])
def test_max_txs_caps_every_block(chains: Chains, key: SigningKey, max_txs: int) -> None:
    chain = chains.create(key, config=SequencerConfig(max_txs=max_txs))

    async def main() -> list[tuple[Body, Receipt]]:
        async def writer(w: int) -> list[tuple[Body, Receipt]]:
            out = []
            for s in range(4):
                body = {"writer": w, "seq": s}
                out.append((body, await chain.submit("record.put", body)))
            return out

        try:
            per = await asyncio.gather(*(writer(w) for w in range(100)))
        finally:
            await chain.close()
        return [pair for p in per for pair in p]

    acked = asyncio.run(main())
    assert sorted(r.index for _, r in acked) == list(range(1, 401))
    check_receipts(chain.store, acked)
    counts = [h.tx_count for h in headers(chain.store)[1:]]
    assert max(counts) == max_txs  # the cap is reached under load, never exceeded
    assert sum(counts) == 400
    verify_chain(chain.store, expected_key=key.public)


@pytest.mark.parametrize(("max_wait_ms", "batched"), [(0.0, False), (250.0, True)])
def test_max_wait_ms_gathers_later_writers(
    chains: Chains, key: SigningKey, max_wait_ms: float, batched: bool
) -> None:
    """A lone write waits ``max_wait_ms`` for company; with 0 it is committed at once."""
    chain = chains.create(key, config=SequencerConfig(max_wait_ms=max_wait_ms))

    async def main() -> list[Receipt]:
        first = asyncio.create_task(chain.submit("record.put", {"n": 0}))
        for _ in range(5):  # the sequencer starts and takes what is queued: only `first`
            await asyncio.sleep(0)
        later = [asyncio.create_task(chain.submit("record.put", {"n": n})) for n in (1, 2)]
        try:
            return list(await asyncio.gather(first, *later))
        finally:
            await chain.close()

    first, second, third = asyncio.run(main())
    assert second.height == third.height
    if batched:
        assert first.height == second.height == 1
        assert [h.tx_count for h in headers(chain.store)] == [1, 3]
    else:
        assert first.height == 1
        assert second.height == 2
        assert [h.tx_count for h in headers(chain.store)] == [1, 1, 2]
    assert [first.index, second.index, third.index] == [1, 2, 3]


def test_a_full_queue_is_cut_without_waiting(chains: Chains, key: SigningKey) -> None:
    """``max_wait_ms`` only applies below ``max_txs``: a full batch is cut at once."""
    chain = chains.create(key, config=SequencerConfig(max_txs=4, max_wait_ms=120_000))

    async def main() -> list[Receipt]:
        try:
            writes = asyncio.gather(*(chain.submit("record.put", {"n": n}) for n in range(4)))
            return list(await asyncio.wait_for(writes, timeout=30))
        finally:
            await chain.close()

    receipts = asyncio.run(main())
    assert {r.height for r in receipts} == {1}
    assert [h.tx_count for h in headers(chain.store)] == [1, 4]


def test_submit_many_lands_in_one_block_in_order(chains: Chains, key: SigningKey) -> None:
    chain = chains.create(key, config=SequencerConfig(max_txs=8))

    def group(g: int) -> list[Transaction]:
        return [
            Transaction(type="record.put", chain=CHAIN, body={"g": g, "i": i}, time_ms=g)
            for i in range(5)
        ]

    async def main() -> tuple[list[list[Receipt]], list[Receipt]]:
        try:
            singles = [chain.submit("record.put", {"single": n}) for n in range(40)]
            groups = [chain.submit_many(group(g)) for g in range(12)]
            grouped, single = await asyncio.gather(
                asyncio.gather(*groups), asyncio.gather(*singles)
            )
        finally:
            await chain.close()
        return list(grouped), list(single)

    grouped, singles = asyncio.run(main())
    assert len(singles) == 40
    for g, receipts in enumerate(grouped):
        assert len({r.height for r in receipts}) == 1, "a group was split across blocks"
        first = receipts[0].index
        assert [r.index for r in receipts] == list(range(first, first + 5))
        for i, r in enumerate(receipts):
            assert Transaction.decode(chain.store.tx_data(r.index)).body == {"g": g, "i": i}
    all_indexes = sorted([r.index for rs in grouped for r in rs] + [r.index for r in singles])
    assert all_indexes == list(range(1, 101))
    verify_chain(chain.store, expected_key=key.public)


def test_submit_many_with_one_bad_transaction_writes_none(chains: Chains, key: SigningKey) -> None:
    chain = chains.create(key)
    good = Transaction(type="record.put", chain=CHAIN, body={"n": 1}, time_ms=1)

    async def main() -> None:
        try:
            with pytest.raises(InvalidInput):
                await chain.submit_many([good, REFUSED["other-chain"], good])
        finally:
            await chain.close()

    asyncio.run(main())
    assert chain.store.counts() == (1, 1, 0)


def test_sequencer_config_rejects_bad_values() -> None:
    with pytest.raises(InvalidInput):
        SequencerConfig(max_txs=0)
    with pytest.raises(InvalidInput):
        SequencerConfig(max_wait_ms=-1)


# -- refused transactions ----------------------------------------------------------------------


def _tx(chain: str = CHAIN, tx_type: str = "record.put", body: Body | None = None) -> Transaction:
    return Transaction(type=tx_type, chain=chain, body=body or {"n": 1}, time_ms=1_700_000_000_000)


def _padded(size: int) -> Transaction:
    """A transaction whose canonical encoding is exactly ``size`` bytes."""
    overhead = len(_tx(body={"pad": ""}).encode())
    tx = _tx(body={"pad": "x" * (size - overhead)})
    assert len(tx.encode()) == size
    return tx


REFUSED: dict[str, Transaction] = {
    "other-chain": _tx(chain="private:elsewhere"),
    "consortium-chain": _tx(chain="consortium:main"),
    "genesis-type": _tx(
        tx_type=GENESIS_TX, body={"institution": "evil", "signing_key": "00", "name": "x"}
    ),
    "oversized-by-one": _padded(MAX_TX_BYTES + 1),
    "oversized": _padded(4 * MAX_TX_BYTES),
    "float-in-body": _tx(body={"dose": 1.5}),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_transactions_write_nothing(chains: Chains, key: SigningKey, case: str) -> None:
    chain = chains.create(key)
    store = chain.store
    before = (store.counts(), store.head(), chain.head, chain.head_hash)

    async def main() -> Receipt:
        try:
            with pytest.raises(InvalidInput):
                await chain.submit_tx(REFUSED[case])
            assert (store.counts(), store.head(), chain.head, chain.head_hash) == before
            # The chain is not wedged: the next good transaction takes index 1.
            return await chain.submit("record.put", {"n": 1})
        finally:
            await chain.close()

    receipt = asyncio.run(main())
    assert (receipt.height, receipt.index) == (1, 1)
    assert store.counts()[:2] == (2, 2)
    assert Transaction.decode(store.tx_data(1)).body == {"n": 1}


def test_submit_refuses_the_genesis_type(chains: Chains, key: SigningKey) -> None:
    chain = chains.create(key)

    async def main() -> None:
        try:
            with pytest.raises(InvalidInput):
                await chain.submit(GENESIS_TX, {"institution": "st-mary"})
        finally:
            await chain.close()

    asyncio.run(main())
    assert chain.store.counts() == (1, 1, 0)


def test_a_transaction_of_exactly_the_limit_is_accepted(chains: Chains, key: SigningKey) -> None:
    chain = chains.create(key)
    tx = _padded(MAX_TX_BYTES)

    async def main() -> Receipt:
        try:
            return await chain.submit_tx(tx)
        finally:
            await chain.close()

    receipt = asyncio.run(main())
    assert receipt.tx_hash == tx.hash()
    assert chain.store.tx_data(receipt.index) == tx.encode()


# -- storage failures ---------------------------------------------------------------------------


class FlakyStore:
    """A :class:`ChainStore` whose ``append_block`` raises ``error`` once, on call ``fail_on``.

    The failing call writes nothing, as the port requires of a failed append.
    With ``read_error``, the first ``node_hashes`` call after that failure
    raises it too (a failing disk rarely fails writes only). Every other call
    goes to the real store.
    """

    def __init__(
        self,
        inner: ChainStore,
        *,
        fail_on: int,
        error: Exception,
        read_error: Exception | None = None,
    ) -> None:
        self.inner = inner
        self.fail_on = fail_on
        self.error = error
        self.read_error = read_error
        self.calls = 0
        self.failed: list[NewBlock] = []

    def append_block(self, block: NewBlock) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            self.failed.append(block)
            raise self.error
        self.inner.append_block(block)

    def head(self) -> StoredBlock | None:
        return self.inner.head()

    def head_header_bytes(self) -> bytes | None:
        return self.inner.head_header_bytes()

    def check_storage(self) -> None:
        self.inner.check_storage()

    def damage(self) -> str | None:
        return self.inner.damage()

    def block(self, height: int) -> StoredBlock:
        return self.inner.block(height)

    def block_hash(self, height: int) -> bytes:
        return self.inner.block_hash(height)

    def iter_blocks(self, start: int = 0, end: int | None = None) -> Iterator[StoredBlock]:
        return self.inner.iter_blocks(start, end)

    def node_hashes(self, ids: Sequence[NodeID]) -> dict[NodeID, bytes]:
        if self.failed and self.read_error is not None:
            error, self.read_error = self.read_error, None
            raise error
        return self.inner.node_hashes(ids)

    def iter_nodes(self) -> Iterator[tuple[NodeID, bytes]]:
        return self.inner.iter_nodes()

    def tx_location(self, tx_hash: bytes) -> tuple[int, int]:
        return self.inner.tx_location(tx_hash)

    def tx_by_hash(self, tx_hash: bytes) -> tuple[int, bytes]:
        return self.inner.tx_by_hash(tx_hash)

    def tx_data(self, index: int) -> bytes:
        return self.inner.tx_data(index)

    def counts(self) -> tuple[int, int, int]:
        return self.inner.counts()

    def close(self) -> None:
        self.inner.close()


ERRORS: dict[str, tuple[Exception, type[MedledgerError]]] = {
    "storage-error": (StorageError("disk full"), StorageError),
    "retryable": (RetryableStorageError("database is locked"), RetryableStorageError),
    "os-error": (OSError(28, "No space left on device"), StorageError),
}


@pytest.mark.parametrize("fail_on", [1, 2, 5])
@pytest.mark.parametrize("error_case", sorted(ERRORS))
def test_a_failed_commit_fails_its_writers_and_loses_nothing_acked(
    chains: Chains, key: SigningKey, clock: Clock, fail_on: int, error_case: str
) -> None:
    error, expected = ERRORS[error_case]
    inner = chains.create(key).store
    flaky = FlakyStore(inner, fail_on=fail_on, error=error)
    chain = PrivateChain(flaky, key, proposer="st-mary", clock=clock)
    acked: list[tuple[Body, Receipt]] = []
    refused: list[tuple[Body, Exception]] = []

    async def writer(w: int, rounds: int, phase: str) -> None:
        for s in range(rounds):
            body = {"phase": phase, "writer": w, "seq": s}
            try:
                acked.append((body, await chain.submit("record.put", body)))
            except MedledgerError as exc:
                refused.append((body, exc))

    async def main() -> None:
        try:
            await asyncio.gather(*(writer(w, 6, "during") for w in range(100)))
            assert flaky.failed, "the failure was injected"
            # Later writes succeed on the same chain object.
            await asyncio.gather(*(writer(w, 3, "after") for w in range(50)))
        finally:
            await chain.close()

    asyncio.run(main())

    assert refused, "some writers must have seen the failure"
    for _, exc in refused:
        assert isinstance(exc, expected)
    failed_block = flaky.failed[0]
    # The writers of the failed block were refused, with nothing of it on the chain.
    assert len(refused) >= failed_block.header.tx_count
    for tx_hash in failed_block.tx_hashes:
        with pytest.raises(NotFound):
            inner.tx_location(tx_hash)
    stored_bodies = [Transaction.decode(d).body for b in inner.iter_blocks(1) for d in b.tx_data]
    refused_bodies = [b for b, _ in refused]
    assert not any(b in stored_bodies for b in refused_bodies)
    # Everything acknowledged is there, at contiguous indexes, and nothing else is.
    assert len(acked) + len(refused) == 100 * 6 + 50 * 3
    assert sorted(r.index for _, r in acked) == list(range(1, len(acked) + 1))
    assert sorted(map(_key, stored_bodies)) == sorted(_key(b) for b, _ in acked)
    check_receipts(inner, acked)
    assert all(b["phase"] == "during" for b in refused_bodies)
    report = verify_chain(inner, expected_key=key.public)
    assert report.log_size == len(acked) + 1
    assert chain.head == head_header(inner)


def test_submit_groups_shares_one_block_and_answers_each_group_alone(
    chains: Chains, key: SigningKey
) -> None:
    """A worker's frame of access groups (decision 0059): the groups the chain accepts
    go into one block, each atomic and in order; a refused group is answered with its
    own error and writes nothing; the others are not held back by it."""
    chain = chains.create(key)

    def group(g: int, size: int) -> list[Transaction]:
        return [
            Transaction(type="record.put", chain=CHAIN, body={"g": g, "i": i}, time_ms=g)
            for i in range(size)
        ]

    groups = [group(0, 1), [*group(1, 2), REFUSED["other-chain"]], group(2, 3), group(3, 1)]

    async def main() -> list[list[Receipt] | MedledgerError]:
        try:
            return await chain.submit_groups(groups)
        finally:
            await chain.close()

    results = asyncio.run(main())
    assert isinstance(results[1], InvalidInput)
    accepted = [r for r in results if isinstance(r, list)]
    assert [len(r) for r in accepted] == [1, 3, 1]
    assert len({r.height for rs in accepted for r in rs}) == 1, "one block for all groups"
    assert [r.index for rs in accepted for r in rs] == [1, 2, 3, 4, 5]
    assert chain.store.counts()[1] == 1 + 5  # the refused group left nothing behind
    for g, receipts in zip((0, 2, 3), accepted, strict=True):
        for i, r in enumerate(receipts):
            assert Transaction.decode(chain.store.tx_data(r.index)).body == {"g": g, "i": i}
    verify_chain(chain.store, expected_key=key.public)


def test_submit_groups_in_a_failed_block_all_get_its_error(
    chains: Chains, key: SigningKey, clock: Clock
) -> None:
    inner = chains.create(key).store
    flaky = FlakyStore(inner, fail_on=1, error=StorageError("disk full"))
    chain = PrivateChain(flaky, key, proposer="st-mary", clock=clock)
    groups = [[_tx(body={"n": n})] for n in range(4)]

    async def main() -> tuple[list[list[Receipt] | MedledgerError], Receipt]:
        try:
            failed = await chain.submit_groups(groups)
            return failed, await chain.submit("record.put", {"after": 1})
        finally:
            await chain.close()

    failed, after = asyncio.run(main())
    assert all(isinstance(r, StorageError) for r in failed)
    assert after.index == 1  # nothing of the failed block took an index
    assert inner.counts()[1] == 2


def test_a_lone_failed_write_does_not_consume_its_index(
    chains: Chains, key: SigningKey, clock: Clock
) -> None:
    inner = chains.create(key).store
    flaky = FlakyStore(inner, fail_on=2, error=StorageError("fsync failed"))
    chain = PrivateChain(flaky, key, proposer="st-mary", clock=clock)

    async def main() -> list[Receipt]:
        try:
            one = await chain.submit("record.put", {"n": 1})
            with pytest.raises(StorageError, match="fsync failed"):
                await chain.submit("record.put", {"n": 2})
            two = await chain.submit("record.put", {"n": 3})
            three = await chain.submit("record.put", {"n": 4})
            return [one, two, three]
        finally:
            await chain.close()

    receipts = asyncio.run(main())
    assert [(r.height, r.index) for r in receipts] == [(1, 1), (2, 2), (3, 3)]
    assert [Transaction.decode(inner.tx_data(i)).body["n"] for i in (1, 2, 3)] == [1, 3, 4]
    verify_chain(inner, expected_key=key.public)


def test_writers_are_answered_even_if_storage_reads_fail_after_a_failed_commit(
    chains: Chains, key: SigningKey, clock: Clock
) -> None:
    """After a failed commit the sequencer reloads the log; if that read fails as well,
    the failed block's writer must still get an error, and later writers an answer —
    never an await that hangs forever."""
    inner = chains.create(key).store
    flaky = FlakyStore(
        inner,
        fail_on=1,
        error=StorageError("disk I/O error"),
        read_error=StorageError("disk I/O error while reading nodes"),
    )
    chain = PrivateChain(flaky, key, proposer="st-mary", clock=clock)

    async def main() -> Receipt | None:
        with pytest.raises(StorageError):
            await asyncio.wait_for(chain.submit("record.put", {"n": 1}), timeout=5)
        later: Receipt | None = None
        with contextlib.suppress(StorageError):  # refusing is acceptable; hanging is not
            later = await asyncio.wait_for(chain.submit("record.put", {"n": 2}), timeout=5)
        with contextlib.suppress(StorageError):
            await asyncio.wait_for(chain.close(), timeout=5)
        return later

    later = asyncio.run(main())
    assert inner.counts()[:2] == ((2, 2) if later is not None else (1, 1))
    if later is not None:
        assert Transaction.decode(inner.tx_data(later.index)).body == {"n": 2}
    verify_chain(inner, expected_key=key.public)


# -- close and reopen ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_wait_ms", [0.0, 20.0])
def test_close_drains_queued_writes(chains: Chains, key: SigningKey, max_wait_ms: float) -> None:
    chain = chains.create(key, config=SequencerConfig(max_txs=16, max_wait_ms=max_wait_ms))

    async def main() -> list[Receipt]:
        tasks = [asyncio.create_task(chain.submit("record.put", {"n": n})) for n in range(300)]
        await asyncio.sleep(0)  # every task has queued its transaction
        await chain.close()
        assert all(t.done() for t in tasks), "close returned with writes still queued"
        with pytest.raises(StorageError):
            await chain.submit("record.put", {"n": "late"})
        return [t.result() for t in tasks]

    receipts = asyncio.run(main())
    assert sorted(r.index for r in receipts) == list(range(1, 301))
    for n, r in enumerate(receipts):
        assert Transaction.decode(chain.store.tx_data(r.index)).body == {"n": n}
    assert chain.head.log_size == 301
    assert head_header(chain.store) == chain.head
    assert verify_chain(chain.store).log_size == 301


def test_close_without_writes(chains: Chains, key: SigningKey) -> None:
    chain = chains.create(key)
    asyncio.run(chain.close())
    assert chain.store.counts() == (1, 1, 0)


def test_reopen_resumes_with_the_same_head(chains: Chains, key: SigningKey, clock: Clock) -> None:
    chain = chains.create(key)

    async def first() -> list[list[Receipt]]:
        try:
            return await write_rounds(chain, [3, 1, 5, 8], tag="before")
        finally:
            await chain.close()

    asyncio.run(first())
    head, head_hash = chain.head, chain.head_hash
    chain.store.close()

    store = chains.open_store()
    again = PrivateChain(store, key, proposer="st-mary", clock=clock)
    assert again.head == head
    assert again.head_hash == head_hash
    assert again.chain_id == CHAIN

    async def second() -> list[list[Receipt]]:
        try:
            return await write_rounds(again, [2, 6], tag="after")
        finally:
            await again.close()

    rounds = asyncio.run(second())
    assert [r.index for r in rounds[0]] == [18, 19]
    assert {r.height for r in rounds[0]} == {head.height + 1}
    assert BlockHeader.decode(store.block(head.height + 1).header_bytes).prev_hash == head_hash
    report = verify_chain(store, expected_key=key.public)
    assert report.log_size == 1 + 17 + 8
    assert report.blocks == 7


def test_node_reopen_resumes_and_verifies(make_node: Any, passphrase: bytes, clock: Clock) -> None:
    root, config = make_node()
    assert isinstance(config, NodeConfig)

    async def write(tag: str, n: int) -> tuple[BlockHeader, bytes, list[Receipt]]:
        node = open_node(root, passphrase, clock=clock)
        start = node.chain.head
        try:
            receipts = await asyncio.gather(
                *(node.chain.submit("record.put", {"tag": tag, "i": i}) for i in range(n))
            )
        finally:
            await node.close()
        assert node.chain.head.height > start.height
        return node.chain.head, node.chain.head_hash, list(receipts)

    head1, hash1, r1 = asyncio.run(write("one", 40))
    node = open_node(root, passphrase, clock=clock)
    assert (node.chain.head, node.chain.head_hash) == (head1, hash1)
    asyncio.run(node.close())
    head2, _, r2 = asyncio.run(write("two", 25))
    assert sorted(r.index for r in r1) == list(range(1, 41))
    assert sorted(r.index for r in r2) == list(range(41, 66))
    assert head2.log_size == 66

    cfg, store = open_chain(root)
    try:
        report = verify_chain(store, expected_key=cfg.signing_key)
        assert report.log_size == 66
        assert report.chain == config.chain
        for r in r1 + r2:
            assert sha256(store.tx_data(r.index)) == r.tx_hash
    finally:
        store.close()


# -- proofs ---------------------------------------------------------------------------------------

ROUNDS = [1, 2, 5, 3, 8, 1, 13, 4, 7, 16, 1, 2]  # 63 txs + genesis = 64 entries


@pytest.fixture
def proved(chains: Chains, key: SigningKey) -> tuple[PrivateChain, list[bytes]]:
    chain = chains.create(key)

    async def main() -> None:
        try:
            await write_rounds(chain, ROUNDS)
        finally:
            await chain.close()

    asyncio.run(main())
    data = [chain.store.tx_data(i) for i in range(sum(ROUNDS) + 1)]
    return chain, data


def _sizes(total: int) -> list[int]:
    return sorted({1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, total - 1, total})


def test_each_round_became_one_block(proved: tuple[PrivateChain, list[bytes]]) -> None:
    chain, _ = proved
    assert [h.tx_count for h in headers(chain.store)] == [1, *ROUNDS]


def test_root_at_matches_headers_and_reference(proved: tuple[PrivateChain, list[bytes]]) -> None:
    chain, data = proved
    store = chain.store
    assert root_at(store, 0) == EMPTY_ROOT
    for size in range(1, len(data) + 1):
        assert root_at(store, size) == reference_root(data[:size])
    for header in headers(store):
        assert root_at(store, header.log_size) == header.log_root


def test_inclusion_proofs_for_every_index(proved: tuple[PrivateChain, list[bytes]]) -> None:
    chain, data = proved
    store = chain.store
    header_roots = {h.log_size: h.log_root for h in headers(store)}
    sizes = sorted(set(_sizes(len(data))) | set(header_roots))
    checked = 0
    for size in sizes:
        root = root_at(store, size)
        assert header_roots.get(size, root) == root
        for index in range(size):
            proof = inclusion_proof(store, index, size)
            verify_inclusion(leaf_hash(data[index]), index, size, proof, root)
            checked += 1
            if size > 1:
                # The same proof must not prove a neighbour or another transaction.
                other = (index + 1) % size
                with pytest.raises((RootMismatch, InvalidInput)):
                    verify_inclusion(leaf_hash(data[other]), other, size, proof, root)
                with pytest.raises(RootMismatch):
                    verify_inclusion(leaf_hash(data[other]), index, size, proof, root)
    assert checked > 500


def test_consistency_proofs_between_many_sizes(proved: tuple[PrivateChain, list[bytes]]) -> None:
    chain, data = proved
    store = chain.store
    hdrs = headers(store)
    sizes = sorted(set(_sizes(len(data))) | {h.log_size for h in hdrs})
    roots = {s: root_at(store, s) for s in sizes}
    pairs = 0
    for old, new in itertools.combinations_with_replacement(sizes, 2):
        proof = consistency_proof(store, old, new)
        verify_consistency(old, new, proof, roots[old], roots[new])
        pairs += 1
        if old < new and old & (old - 1):  # a proof that claims something; tamper with it
            bad_old = bytes(32)
            with pytest.raises(MedledgerError):
                verify_consistency(old, new, proof, bad_old, roots[new])
    assert pairs > 200
    # Between consecutive block headers, exactly as an anchor would prove it.
    for a, b in itertools.pairwise(hdrs):
        proof = consistency_proof(store, a.log_size, b.log_size)
        verify_consistency(a.log_size, b.log_size, proof, a.log_root, b.log_root)


def test_proofs_for_old_sizes_do_not_change_as_the_log_grows(
    chains: Chains, key: SigningKey
) -> None:
    chain = chains.create(key)

    async def main() -> tuple[dict[tuple[int, int], list[bytes]], dict[int, list[bytes]]]:
        try:
            await write_rounds(chain, [4, 6, 9], tag="a")
            size = chain.head.log_size
            inc = {(i, size): inclusion_proof(chain.store, i, size) for i in range(size)}
            con = {old: consistency_proof(chain.store, old, size) for old in range(size + 1)}
            await write_rounds(chain, [11, 3, 30], tag="b")
            return inc, con
        finally:
            await chain.close()

    inc, con = asyncio.run(main())
    for (index, size), proof in inc.items():
        assert inclusion_proof(chain.store, index, size) == proof
    for old, proof in con.items():
        assert consistency_proof(chain.store, old, 20) == proof


def test_proof_requests_outside_the_log_are_refused(
    proved: tuple[PrivateChain, list[bytes]],
) -> None:
    chain, data = proved
    store = chain.store
    size = len(data)
    with pytest.raises(InvalidInput):
        inclusion_proof(store, 0, size + 1)
    with pytest.raises(InvalidInput):
        inclusion_proof(store, size, size)
    with pytest.raises(InvalidInput):
        inclusion_proof(store, -1, size)
    with pytest.raises(InvalidInput):
        consistency_proof(store, 3, size + 1)
    with pytest.raises(InvalidInput):
        consistency_proof(store, 9, 4)
    with pytest.raises(InvalidInput):
        root_at(store, size + 1)
    with pytest.raises(InvalidInput):
        root_at(store, -1)
    assert consistency_proof(store, size, size) == []
    assert consistency_proof(store, 0, size) == []


def test_head_header_of_an_empty_store_is_not_found(tmp_path: Path) -> None:
    store = SqliteChainStore.create(tmp_path / "empty.db", CHAIN)
    try:
        with pytest.raises(NotFound):
            head_header(store)
        with pytest.raises(MedledgerError):
            PrivateChain(store, SigningKey.generate(), proposer="st-mary")
    finally:
        store.close()
