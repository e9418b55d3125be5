"""Conformance suite for the :class:`~medledger.storage.ports.ChainStore` port.

Every adapter runs the same tests through the ``chain_store_factory`` fixture;
to add one (PostgreSQL), add a factory class and its name to ``ADAPTERS``.
Blocks are built by hand with :class:`NewBlock` (``BlockBuilder``) so each
test controls heights, indexes and contents exactly; expected Merkle node
hashes come from a level-by-level reference written with :mod:`hashlib`.

The last section tests what only the SQLite adapter has: a file. Opening
something that is not a medledger chain database must fail *without touching
it* (``open`` "never creates or alters one").
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from medledger.core.errors import Conflict, NotFound, StorageError
from medledger.core.hashing import ZERO_HASH, sha256
from medledger.core.keys import SigningKey
from medledger.core.merkle import CompactRange, NodeID, leaf_hash
from medledger.core.models import BlockHeader, Transaction
from medledger.ledger.private import GENESIS_TX, PrivateChain
from medledger.ledger.verify import verify_chain
from medledger.storage.ports import ChainStore, NewBlock, StoredBlock
from medledger.storage.postgres.chain import PostgresChainStore
from medledger.storage.postgres.migrations import drop_schema
from medledger.storage.sqlite.chain import SqliteChainStore

CHAIN = "private:st-mary"
T0 = 1_700_000_000_000


# -- adapters -------------------------------------------------------------------


class StoreFactory(Protocol):
    def create(self, chain: str = CHAIN) -> ChainStore:
        """A new, empty store for ``chain``."""
        ...

    def reopen(self, store: ChainStore) -> ChainStore:
        """Close ``store`` and open the same chain again from durable storage."""
        ...

    def second_handle(self, store: ChainStore) -> ChainStore:
        """Another independent handle on the same chain (``store`` stays open)."""
        ...

    def close_all(self) -> None: ...


class SqliteFactory:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._n = 0
        self._stores: list[SqliteChainStore] = []

    def _track(self, store: SqliteChainStore) -> SqliteChainStore:
        self._stores.append(store)
        return store

    def create(self, chain: str = CHAIN) -> ChainStore:
        self._n += 1
        return self._track(SqliteChainStore.create(self._dir / f"chain-{self._n}.db", chain))

    def reopen(self, store: ChainStore) -> ChainStore:
        assert isinstance(store, SqliteChainStore)
        store.close()
        return self._track(SqliteChainStore.open(store.path))

    def second_handle(self, store: ChainStore) -> ChainStore:
        assert isinstance(store, SqliteChainStore)
        return self._track(SqliteChainStore.open(store.path))

    def close_all(self) -> None:
        for store in self._stores:
            store.close()


class PostgresFactory:
    """Each store in its own schema of the session's real PostgreSQL server (dropped after)."""

    def __init__(self, directory: Path) -> None:
        from pg_server import shared_dsn

        self._dsn = shared_dsn()
        self._stores: list[PostgresChainStore] = []
        self._schemas: list[str] = []

    def _track(self, store: PostgresChainStore) -> PostgresChainStore:
        self._stores.append(store)
        return store

    def create(self, chain: str = CHAIN) -> ChainStore:
        from pg_server import unique

        schema = unique("contract")
        self._schemas.append(schema)
        return self._track(PostgresChainStore.create(self._dsn, chain, schema=schema))

    def reopen(self, store: ChainStore) -> ChainStore:
        assert isinstance(store, PostgresChainStore)
        store.close()
        return self._track(PostgresChainStore.open(self._dsn, store.chain, schema=store.schema))

    def second_handle(self, store: ChainStore) -> ChainStore:
        assert isinstance(store, PostgresChainStore)
        return self._track(PostgresChainStore.open(self._dsn, store.chain, schema=store.schema))

    def close_all(self) -> None:
        for store in self._stores:
            store.close()
        for schema in self._schemas:
            drop_schema(self._dsn, schema)


ADAPTERS: dict[str, Callable[[Path], StoreFactory]] = {
    "sqlite": SqliteFactory,
    "postgres": PostgresFactory,
}


@pytest.fixture(params=sorted(ADAPTERS))
def chain_store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    factory = ADAPTERS[request.param](tmp_path)
    yield factory
    factory.close_all()


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


# -- building blocks by hand ------------------------------------------------------


class BlockBuilder:
    """Builds valid, signed blocks of a chain; state advances only on :meth:`append`."""

    def __init__(self, key: SigningKey, chain: str = CHAIN) -> None:
        self.key = key
        self.chain = chain
        self.log = CompactRange()
        self.height = -1
        self.prev = ZERO_HASH
        self.blocks: list[NewBlock] = []
        self._serial = 0

    def tx(self, tx_type: str = "record.put", **body: object) -> bytes:
        self._serial += 1
        body = {"serial": self._serial, **body}
        return Transaction(
            type=tx_type, chain=self.chain, body=body, time_ms=T0 + self._serial
        ).encode()

    def txs(self, n: int) -> list[bytes]:
        return [self.tx(n=i) for i in range(n)]

    def genesis_tx(self) -> bytes:
        return self.tx(
            GENESIS_TX,
            signing_key=self.key.public.der().hex(),
            signing_fingerprint=self.key.fingerprint,
        )

    def make(
        self,
        tx_data: Sequence[bytes],
        *,
        height: int | None = None,
        first_index: int | None = None,
    ) -> tuple[NewBlock, CompactRange]:
        """The next block holding ``tx_data`` and the log after it (nothing is changed)."""
        log = self.log.copy()
        block_log = CompactRange()
        created: list[tuple[NodeID, bytes]] = []
        for data in tx_data:
            leaf = leaf_hash(data)
            created.extend(log.append(leaf)[1:])
            block_log.append(leaf)
        h = self.height + 1 if height is None else height
        header = BlockHeader(
            chain=self.chain,
            height=h,
            prev_hash=self.prev,
            tx_root=block_log.root(),
            tx_count=len(tx_data),
            log_size=log.size,
            log_root=log.root(),
            time_ms=T0 + 1000 * (h + 1),
            proposer="st-mary",
        )
        header_bytes = header.encode()
        block_hash = sha256(header_bytes)
        block = NewBlock(
            header=header,
            header_bytes=header_bytes,
            block_hash=block_hash,
            signatures=(self.key.sign(block_hash),),
            first_index=self.log.size if first_index is None else first_index,
            tx_data=list(tx_data),
            tx_hashes=[sha256(d) for d in tx_data],
            nodes=created,
        )
        return block, log

    def append(self, store: ChainStore, tx_data: Sequence[bytes]) -> NewBlock:
        block, log = self.make(tx_data)
        store.append_block(block)
        self.log, self.height, self.prev = log, block.header.height, block.block_hash
        self.blocks.append(block)
        return block

    def append_sizes(self, store: ChainStore, sizes: Sequence[int]) -> list[NewBlock]:
        """Append blocks with these transaction counts (a genesis block first if empty)."""
        out = []
        for n in sizes:
            if self.height < 0:
                out.append(self.append(store, [self.genesis_tx(), *self.txs(n - 1)]))
            else:
                out.append(self.append(store, self.txs(n)))
        return out

    # -- what a store must give back ---------------------------------------------

    def all_tx_data(self) -> list[bytes]:
        return [d for b in self.blocks for d in b.tx_data]

    def location(self) -> dict[int, int]:
        """log index -> height."""
        return {
            b.first_index + i: b.header.height for b in self.blocks for i in range(len(b.tx_data))
        }

    def created_nodes(self) -> list[tuple[NodeID, bytes]]:
        return [n for b in self.blocks for n in b.nodes]


def stored(block: NewBlock) -> StoredBlock:
    return StoredBlock(
        height=block.header.height,
        header_bytes=block.header_bytes,
        block_hash=block.block_hash,
        signatures=block.signatures,
        first_index=block.first_index,
        tx_data=tuple(block.tx_data),
    )


def reference_levels(tx_data: Sequence[bytes]) -> list[list[bytes]]:
    """All perfect-subtree hashes, level by level, straight from RFC 6962 with hashlib."""
    level = [hashlib.sha256(b"\x00" + d).digest() for d in tx_data]
    levels = [level]
    while len(level) > 1:
        level = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        levels.append(level)
    return levels


SIZES = [1, 3, 4, 1, 7, 16, 2, 5, 1, 9]  # 49 transactions in 10 blocks


@pytest.fixture
def filled(chain_store_factory: StoreFactory, key: SigningKey) -> tuple[ChainStore, BlockBuilder]:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, SIZES)
    return store, builder


# -- empty store ---------------------------------------------------------------------


def test_empty_store_has_nothing(chain_store_factory: StoreFactory) -> None:
    store = chain_store_factory.create()
    assert store.head() is None
    assert store.head_header_bytes() is None
    assert list(store.iter_blocks()) == []
    assert list(store.iter_nodes()) == []
    assert store.counts() == (0, 0, 0)
    with pytest.raises(NotFound):
        store.tx_by_hash(sha256(b"nothing"))
    with pytest.raises(NotFound):
        store.block(0)
    with pytest.raises(NotFound):
        store.block_hash(0)
    with pytest.raises(NotFound):
        store.tx_data(0)
    with pytest.raises(NotFound):
        store.tx_location(sha256(b"nothing"))
    with pytest.raises(NotFound):
        store.node_hashes([NodeID(0, 0)])


# -- append and read back ---------------------------------------------------------------


def test_append_then_read_back_every_block(
    chain_store_factory: StoreFactory, key: SigningKey
) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    for n, size in enumerate(SIZES):
        block = builder.append_sizes(store, [size])[0]
        assert store.head() == stored(block)
        assert store.head_header_bytes() == block.header_bytes
        assert store.counts() == (
            n + 1,
            builder.log.size,
            len(builder.created_nodes()),
        )
    for block in builder.blocks:
        got = store.block(block.header.height)
        assert got == stored(block)
        assert BlockHeader.decode(got.header_bytes) == block.header
        assert store.block_hash(block.header.height) == block.block_hash == block.header.hash()
    with pytest.raises(NotFound):
        store.block_hash(len(builder.blocks))
    with pytest.raises(NotFound):
        store.block_hash(-1)
        assert sha256(got.header_bytes) == got.block_hash


@pytest.mark.parametrize("height", [-1, len(SIZES), len(SIZES) + 1, 2**40])
def test_block_beyond_the_chain_is_not_found(
    filled: tuple[ChainStore, BlockBuilder], height: int
) -> None:
    store, _ = filled
    with pytest.raises(NotFound):
        store.block(height)


def test_signatures_round_trip_exactly(filled: tuple[ChainStore, BlockBuilder]) -> None:
    store, builder = filled
    for block in builder.blocks:
        sigs = store.block(block.header.height).signatures
        assert sigs == block.signatures
        builder.key.public.verify(sigs[0], block.block_hash)


def test_multiple_signatures_keep_their_order(
    chain_store_factory: StoreFactory, key: SigningKey
) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    block, _ = builder.make([builder.genesis_tx()])
    other = SigningKey.generate()
    cosigned = NewBlock(
        header=block.header,
        header_bytes=block.header_bytes,
        block_hash=block.block_hash,
        signatures=(other.sign(block.block_hash), key.sign(block.block_hash)),
        first_index=0,
        tx_data=block.tx_data,
        tx_hashes=block.tx_hashes,
        nodes=block.nodes,
    )
    store.append_block(cosigned)
    assert store.block(0).signatures == cosigned.signatures


# -- iter_blocks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, None),
        (0, len(SIZES)),
        (0, 1),
        (2, 5),
        (4, 5),
        (3, 3),
        (6, 2),
        (len(SIZES) - 1, None),
        (len(SIZES), None),
        (5, 10_000),
        (50, 60),
    ],
)
def test_iter_blocks_ranges(
    filled: tuple[ChainStore, BlockBuilder], start: int, end: int | None
) -> None:
    store, builder = filled
    expected = [stored(b) for b in builder.blocks[start:end]]
    assert list(store.iter_blocks(start, end)) == expected


def test_iter_blocks_default_is_everything(filled: tuple[ChainStore, BlockBuilder]) -> None:
    store, builder = filled
    assert list(store.iter_blocks()) == [stored(b) for b in builder.blocks]


def test_iter_blocks_streams_many_blocks_in_height_order(
    chain_store_factory: StoreFactory, key: SigningKey
) -> None:
    # More blocks than any sensible fetch batch, with varied transaction counts.
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, [1 + (h * 7) % 4 for h in range(300)])
    expected = [stored(b) for b in builder.blocks]

    it = store.iter_blocks()
    first = next(it)
    assert first == expected[0]
    # Other reads between steps of the stream must not disturb it.
    assert store.block(150) == expected[150]
    assert store.tx_data(builder.log.size - 1) == builder.all_tx_data()[-1]
    assert store.counts()[0] == 300
    rest = list(it)
    assert [first, *rest] == expected

    assert list(store.iter_blocks(100, 290)) == expected[100:290]


def test_iter_blocks_is_lazy(chain_store_factory: StoreFactory, key: SigningKey) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, [1, 2, 3])
    it = store.iter_blocks()
    assert iter(it) is it
    assert next(it).height == 0
    assert [b.height for b in it] == [1, 2]


def test_empty_blocks_round_trip(chain_store_factory: StoreFactory, key: SigningKey) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, [2, 0, 3, 0, 0, 1, 0])
    assert list(store.iter_blocks()) == [stored(b) for b in builder.blocks]
    for block in builder.blocks:
        assert store.block(block.header.height) == stored(block)
    for index, height in builder.location().items():
        data = builder.all_tx_data()[index]
        assert store.tx_location(sha256(data)) == (height, index)


# -- heights, conflicts, atomicity ---------------------------------------------------------


@pytest.mark.parametrize("height", [0, 1, 3, 5, 100])
def test_append_at_a_non_contiguous_height_is_a_conflict(
    chain_store_factory: StoreFactory, key: SigningKey, height: int
) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, [1, 2, 3])  # heights 0..2; next is 3
    if height == 3:
        height = 4  # one past the next: a gap
    before = (store.counts(), store.head(), list(store.iter_nodes()))
    bad, _ = builder.make(builder.txs(4), height=height)
    with pytest.raises(Conflict):
        store.append_block(bad)
    assert (store.counts(), store.head(), list(store.iter_nodes())) == before
    for index in range(builder.log.size, builder.log.size + 4):
        with pytest.raises(NotFound):
            store.tx_data(index)
    for data in bad.tx_data:
        with pytest.raises(NotFound):
            store.tx_location(sha256(data))
    # The store is still usable and the next height still fits.
    good = builder.append(store, builder.txs(2))
    assert store.head() == stored(good)


def test_first_block_must_be_height_zero(
    chain_store_factory: StoreFactory, key: SigningKey
) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    bad, _ = builder.make([builder.genesis_tx()], height=1)
    with pytest.raises(Conflict):
        store.append_block(bad)
    assert store.counts() == (0, 0, 0)
    assert store.head() is None


@pytest.mark.parametrize("overlap", ["txs", "nodes"])
def test_a_failing_append_leaves_nothing(
    chain_store_factory: StoreFactory, key: SigningKey, overlap: str
) -> None:
    """The block row would insert fine; a later part of the write fails: all of it rolls back."""
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, [4, 4])  # 8 txs, nodes up to level 3
    before = (store.counts(), store.head(), list(store.iter_blocks()), list(store.iter_nodes()))
    if overlap == "txs":
        # Claims to start at an index already stored.
        bad, _ = builder.make(builder.txs(3), first_index=builder.log.size - 1)
    else:
        good, _ = builder.make(builder.txs(2))
        bad = NewBlock(
            header=good.header,
            header_bytes=good.header_bytes,
            block_hash=good.block_hash,
            signatures=good.signatures,
            first_index=good.first_index,
            tx_data=good.tx_data,
            tx_hashes=good.tx_hashes,
            nodes=[*good.nodes, builder.blocks[-1].nodes[0]],  # an already stored node
        )
    with pytest.raises((StorageError, Conflict)):
        store.append_block(bad)
    after = (store.counts(), store.head(), list(store.iter_blocks()), list(store.iter_nodes()))
    assert after == before
    with pytest.raises(NotFound):
        store.block(2)
    # Nothing of it is half there: the proper block still appends.
    block = builder.append(store, builder.txs(2))
    assert store.head() == stored(block)
    assert store.counts() == (3, 10, len(builder.created_nodes()))


# -- Merkle nodes ---------------------------------------------------------------------------


def test_node_hashes_level_zero_are_leaf_hashes_of_tx_data(
    filled: tuple[ChainStore, BlockBuilder],
) -> None:
    store, builder = filled
    data = builder.all_tx_data()
    got = store.node_hashes([NodeID(0, i) for i in range(len(data))])
    assert got == {NodeID(0, i): leaf_hash(d) for i, d in enumerate(data)}
    assert got == {NodeID(0, i): h for i, h in enumerate(reference_levels(data)[0])}


def test_node_hashes_every_stored_level(filled: tuple[ChainStore, BlockBuilder]) -> None:
    store, builder = filled
    levels = reference_levels(builder.all_tx_data())
    ids = [NodeID(lv, i) for lv in range(len(levels)) for i in range(len(levels[lv]))]
    assert len(levels) == 6  # 49 leaves: perfect subtrees up to 32 leaves
    got = store.node_hashes(ids)
    assert got == {NodeID(lv, i): levels[lv][i] for lv, i in ids}
    # One at a time, reversed, and with duplicates: same answers.
    for node in reversed(ids):
        assert store.node_hashes([node, node]) == {node: levels[node.level][node.index]}


@pytest.mark.parametrize(
    "missing",
    [
        NodeID(0, 49),  # the next leaf
        NodeID(1, 24),  # would cover leaves 48..49: incomplete
        NodeID(4, 3),  # leaves 48..63
        NodeID(6, 0),  # 64 leaves
        NodeID(0, 10**6),
        NodeID(20, 0),
    ],
)
def test_node_hashes_missing_node_is_not_found(
    filled: tuple[ChainStore, BlockBuilder], missing: NodeID
) -> None:
    store, _ = filled
    with pytest.raises(NotFound):
        store.node_hashes([missing])
    with pytest.raises(NotFound):
        store.node_hashes([NodeID(0, 0), NodeID(1, 0), missing, NodeID(2, 0)])


def test_iter_nodes_in_creation_order(filled: tuple[ChainStore, BlockBuilder]) -> None:
    store, builder = filled
    # Creation order is what CompactRange.append returns, leaf by leaf, minus the leaves.
    reference = CompactRange()
    expected = []
    for data in builder.all_tx_data():
        expected.extend(reference.append(leaf_hash(data))[1:])
    got = list(store.iter_nodes())
    assert got == expected
    assert got == builder.created_nodes()
    assert all(node.level >= 1 for node, _ in got)
    assert len(got) == store.counts()[2]
    levels = reference_levels(builder.all_tx_data())
    assert all(levels[n.level][n.index] == h for n, h in got)


# -- transactions ----------------------------------------------------------------------------


def test_tx_location_and_tx_data(filled: tuple[ChainStore, BlockBuilder]) -> None:
    store, builder = filled
    data = builder.all_tx_data()
    for index, height in builder.location().items():
        assert store.tx_data(index) == data[index]
        assert store.tx_location(sha256(data[index])) == (height, index)
        assert store.tx_by_hash(sha256(data[index])) == (index, data[index])
        block = store.block(height)
        assert block.tx_data[index - block.first_index] == data[index]


def test_tx_lookups_not_found(filled: tuple[ChainStore, BlockBuilder]) -> None:
    store, builder = filled
    size = builder.log.size
    for index in (-1, size, size + 1, 2**40):
        with pytest.raises(NotFound):
            store.tx_data(index)
    missing = [
        sha256(b"not a transaction"),
        leaf_hash(builder.all_tx_data()[0]),  # a leaf hash is not a tx hash
    ]
    # Same first bytes as a stored tx hash, different hash: must not be confused.
    real = sha256(builder.all_tx_data()[5])
    missing += [real[:cut] + bytes(b ^ 0xFF for b in real[cut:]) for cut in (1, 8, 16, 31)]
    for tx_hash in missing:
        with pytest.raises(NotFound):
            store.tx_location(tx_hash)
        with pytest.raises(NotFound):
            store.tx_by_hash(tx_hash)


def test_identical_prefix_transactions_are_told_apart(
    chain_store_factory: StoreFactory, key: SigningKey
) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, [1])
    # Many transactions: lookups must return each one's own index.
    builder.append_sizes(store, [300, 200])
    data = builder.all_tx_data()
    for index in range(0, len(data), 7):
        assert store.tx_location(sha256(data[index])) == (builder.location()[index], index)
        assert store.tx_by_hash(sha256(data[index])) == (index, data[index])


# -- durability across handles ---------------------------------------------------------------


def test_reopen_sees_the_same_data(chain_store_factory: StoreFactory, key: SigningKey) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, SIZES)
    before = (
        store.counts(),
        store.head(),
        store.head_header_bytes(),
        list(store.iter_blocks()),
        list(store.iter_nodes()),
    )
    store = chain_store_factory.reopen(store)
    after = (
        store.counts(),
        store.head(),
        store.head_header_bytes(),
        list(store.iter_blocks()),
        list(store.iter_nodes()),
    )
    assert after == before
    assert after[3] == [stored(b) for b in builder.blocks]
    data = builder.all_tx_data()
    for index, height in builder.location().items():
        assert store.tx_location(sha256(data[index])) == (height, index)
    # It keeps growing after a reopen.
    block = builder.append(store, builder.txs(5))
    assert store.head() == stored(block)
    store = chain_store_factory.reopen(store)
    assert store.head() == stored(block)
    assert store.counts() == (len(SIZES) + 1, builder.log.size, len(builder.created_nodes()))


def test_another_handle_sees_committed_blocks(
    chain_store_factory: StoreFactory, key: SigningKey
) -> None:
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, [1])
    reader = chain_store_factory.second_handle(store)
    assert reader.head() == stored(builder.blocks[0])
    block = builder.append(store, builder.txs(3))
    assert reader.head() == stored(block)
    assert reader.tx_data(3) == block.tx_data[2]


def test_readers_never_see_a_partial_block(
    chain_store_factory: StoreFactory, key: SigningKey
) -> None:
    """A writer thread appends while this thread reads: every view is whole blocks."""
    store = chain_store_factory.create()
    builder = BlockBuilder(key)
    builder.append_sizes(store, [1])
    sizes = [1 + (h * 5) % 9 for h in range(150)]
    prepared: list[NewBlock] = []
    shadow = BlockBuilder(key)
    shadow.log, shadow.height, shadow.prev = builder.log.copy(), builder.height, builder.prev
    shadow._serial = builder._serial
    for n in sizes:
        block, log = shadow.make(shadow.txs(n))
        shadow.log, shadow.height, shadow.prev = log, block.header.height, block.block_hash
        prepared.append(block)
    # (blocks, txs, nodes) after each block: the only totals a reader may observe.
    totals = {(1, 1, 0)}
    nodes = 0
    for block in prepared:
        nodes += len(block.nodes)
        totals.add((block.header.height + 1, block.header.log_size, nodes))

    errors: list[BaseException] = []

    def write() -> None:
        try:
            for block in prepared:
                store.append_block(block)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    observations = 0
    try:
        while writer.is_alive() or observations < 3:
            observations += 1
            assert store.counts() in totals
            head = store.head()
            assert head is not None
            header = BlockHeader.decode(head.header_bytes)
            assert len(head.tx_data) == header.tx_count
            assert head.first_index + header.tx_count == header.log_size
            last = NodeID(0, header.log_size - 1)
            assert store.node_hashes([last])[last] == leaf_hash(head.tx_data[-1])
    finally:
        writer.join()
    assert errors == []
    assert store.counts() == max(totals)
    assert list(store.iter_blocks()) == [stored(builder.blocks[0]), *map(stored, prepared)]


# -- blocks written by the ledger ------------------------------------------------------------


def test_blocks_written_by_a_private_chain(
    chain_store_factory: StoreFactory, key: SigningKey
) -> None:
    store = chain_store_factory.create()
    chain = PrivateChain.create(store, key, chain_id=CHAIN, institution="st-mary", name="St Mary")

    async def write() -> list[tuple[int, int, bytes]]:
        async def one(i: int) -> tuple[int, int, bytes]:
            r = await chain.submit("record.put", {"i": i})
            return r.height, r.index, r.tx_hash

        try:
            return list(await asyncio.gather(*(one(i) for i in range(40))))
        finally:
            await chain.close()

    receipts = asyncio.run(write())
    for height, index, tx_hash in receipts:
        assert store.tx_location(tx_hash) == (height, index)
        assert sha256(store.tx_data(index)) == tx_hash
    blocks = list(store.iter_blocks())
    assert [b.height for b in blocks] == list(range(len(blocks)))
    assert store.counts()[1] == 41
    assert verify_chain(store, expected_key=key.public).log_size == 41


def test_hand_built_chain_is_a_valid_chain(filled: tuple[ChainStore, BlockBuilder]) -> None:
    store, builder = filled
    report = verify_chain(store, expected_key=builder.key.public)
    assert report.blocks == len(SIZES)
    assert report.log_size == sum(SIZES)
    assert report.log_root == builder.log.root()


# -- SQLite files: create and open ------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _plain_sqlite(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    try:
        for sql in statements:
            conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


def test_sqlite_create_refuses_an_existing_path(tmp_path: Path) -> None:
    path = tmp_path / "chain.db"
    path.write_bytes(b"precious")
    with pytest.raises(Conflict):
        SqliteChainStore.create(path, CHAIN)
    assert path.read_bytes() == b"precious"


def test_sqlite_open_keeps_the_chain_id(tmp_path: Path) -> None:
    path = tmp_path / "chain.db"
    SqliteChainStore.create(path, "private:other").close()
    store = SqliteChainStore.open(path)
    try:
        assert store.chain == "private:other"
    finally:
        store.close()


@pytest.mark.parametrize("directory", ["St Mary #2", "what?", "100%25", "50% off", "a&b=c"])
def test_sqlite_works_in_any_directory_name(tmp_path: Path, directory: str) -> None:
    """Paths are file names, not URIs: '#', '?' and '%' in a node directory are legal."""
    parent = tmp_path / "nodes"
    parent.mkdir()
    (parent / directory).mkdir()
    path = parent / directory / "chain.db"
    store = SqliteChainStore.create(path, CHAIN)
    try:
        builder = BlockBuilder(SigningKey.generate())
        builder.append_sizes(store, [1, 3])
        assert store.head() == stored(builder.blocks[-1])
    finally:
        store.close()
    store = SqliteChainStore.open(path)
    try:
        assert store.counts() == (2, 4, 3)
        assert store.head() == stored(builder.blocks[-1])
    finally:
        store.close()
    # Nothing was created beside the node directory.
    assert sorted(p.name for p in parent.iterdir()) == [directory]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_sqlite_open_of_no_database_is_not_found(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "chain.db"
    if kind == "directory":
        path.mkdir()
    before = _snapshot(tmp_path) if kind == "missing" else None
    with pytest.raises(NotFound):
        SqliteChainStore.open(path)
    if kind == "missing":
        assert not path.exists()
        assert _snapshot(tmp_path) == before
    else:
        assert path.is_dir()
        assert list(path.iterdir()) == []


def _make_garbage(path: Path) -> None:
    path.write_bytes(bytes((i * 37 + 11) % 256 for i in range(8192)))


def _make_empty(path: Path) -> None:
    path.write_bytes(b"")


def _make_header_then_garbage(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + bytes((i * 91) % 256 for i in range(4080)))


def _make_unrelated_sqlite(path: Path) -> None:
    _plain_sqlite(path, "CREATE TABLE patients(id INTEGER PRIMARY KEY, name TEXT)")


def _make_other_apps_meta(path: Path) -> None:
    # Another application's database that happens to have a key/value "meta" table.
    _plain_sqlite(
        path,
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('app', 'someone else')",
    )


def _make_rollback_journal_future_schema(path: Path) -> None:
    _plain_sqlite(
        path,
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('schema_version', '2')",
        f"INSERT INTO meta VALUES ('chain', '{CHAIN}')",
    )


def _make_medledger_with(sql: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        store = SqliteChainStore.create(path, CHAIN)
        builder = BlockBuilder(SigningKey.generate())
        builder.append_sizes(store, [1, 2])
        store.close()
        _plain_sqlite(path, sql)

    return make


def _make_truncated_medledger(path: Path) -> None:
    # A chain file in WAL mode cut short: SQLite opens it, creates its -wal and -shm
    # files beside it, and fails on the first read.
    store = SqliteChainStore.create(path, CHAIN)
    BlockBuilder(SigningKey.generate()).append_sizes(store, [1, 2, 3, 4])
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES: dict[str, Callable[[Path], None]] = {
    "garbage": _make_garbage,
    "empty-file": _make_empty,
    "sqlite-header-then-garbage": _make_header_then_garbage,
    "unrelated-sqlite": _make_unrelated_sqlite,
    "other-apps-meta-table": _make_other_apps_meta,
    "future-schema-rollback-journal": _make_rollback_journal_future_schema,
    "schema-version-2": _make_medledger_with(
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'"
    ),
    "schema-version-0": _make_medledger_with(
        "UPDATE meta SET value = '0' WHERE key = 'schema_version'"
    ),
    "no-schema-version": _make_medledger_with("DELETE FROM meta WHERE key = 'schema_version'"),
    "no-chain-id": _make_medledger_with("DELETE FROM meta WHERE key = 'chain'"),
    "truncated-to-half": _make_truncated_medledger,
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_sqlite_open_refuses_without_modifying(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "chain.db"
    BAD_FILES[kind](path)
    before = _snapshot(tmp_path)
    with pytest.raises(StorageError) as refused:
        SqliteChainStore.open(path)
    # While the error is still held (a server logs it, a caller inspects it): the
    # refused open left no connection, so nothing beside the file either.
    after = _snapshot(tmp_path)
    assert refused.value is not None
    assert after.keys() == before.keys(), "open created or removed files"
    assert after[path.name] == before[path.name], f"open modified the {kind} file"
