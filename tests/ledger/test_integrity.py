"""The start-up checks of a private chain store (``ledger.integrity``).

Each check passes on an intact chain and names the damage on a changed one:
a changed committed transaction, a chain behind the institution's own final
anchor or with a different history at the anchored size, a chain behind the
record index, and a SQLite file whose pages are corrupt.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from chain_helpers import Chains, write_rounds

from medledger.core.errors import DamagedStore
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.ledger.consortium.rules import AnchorRecord
from medledger.ledger.integrity import (
    check_against_anchor,
    check_blocks,
    check_private_store,
    log_root_at,
)
from medledger.ledger.private import PrivateChain


def _chain_with_blocks(chains: Chains, key: SigningKey, sizes: list[int]) -> PrivateChain:
    chain = chains.create(key)
    asyncio.run(write_rounds(chain, sizes))
    asyncio.run(chain.close())
    return chain


def _anchor_of(chain: PrivateChain, height: int) -> AnchorRecord:
    header = chain.store.block(height)
    from medledger.core.models import BlockHeader

    decoded = BlockHeader.decode(header.header_bytes)
    return AnchorRecord(
        institution="st-mary",
        height=height,
        log_size=decoded.log_size,
        log_root=decoded.log_root,
        block_hash=header.block_hash,
    )


def test_an_intact_chain_passes_and_every_checked_tx_hash_is_returned(
    chains: Chains, key: SigningKey
) -> None:
    chain = _chain_with_blocks(chains, key, [3, 2, 4])
    hashes = check_blocks(chain.store, 2, key=key.public)
    assert hashes == {sha256(chain.store.tx_data(i)) for i in range(4, 10)}
    report = check_private_store(
        chain.store, key=key.public, indexed_height=3, anchor=_anchor_of(chain, 2)
    )
    assert (report.head_height, report.log_size, report.checked_from) == (3, 10, 0)
    assert log_root_at(chain.store, 10) == chain.head.log_root


def test_a_changed_committed_transaction_is_named_by_its_block(
    chains: Chains, key: SigningKey
) -> None:
    chain = _chain_with_blocks(chains, key, [3, 2, 4])
    conn = sqlite3.connect(chains.path("chain.db"))
    data = bytes(conn.execute("SELECT data FROM txs WHERE idx = 5").fetchone()[0])
    conn.execute("UPDATE txs SET data = ? WHERE idx = 5", (data.replace(b'"i":1', b'"i":7'),))
    conn.commit()
    conn.close()
    with pytest.raises(DamagedStore, match=r"block 2: .*tx_root .*docs/reliability\.md"):
        check_blocks(chain.store, 0)
    assert check_blocks(chain.store, 3)  # blocks above the change still check out
    with pytest.raises(DamagedStore, match="block 2"):
        check_private_store(chain.store, key=key.public)


def test_a_chain_behind_its_own_final_anchor_is_refused(chains: Chains, key: SigningKey) -> None:
    chain = _chain_with_blocks(chains, key, [3, 2, 4])
    anchor = _anchor_of(chain, 3)
    check_against_anchor(chain.store, anchor)
    conn = sqlite3.connect(chains.path("chain.db"))
    conn.execute("DELETE FROM blocks WHERE height = 3")
    conn.execute("DELETE FROM txs WHERE idx >= 6")
    conn.commit()
    conn.close()
    with pytest.raises(DamagedStore, match=r"ends at height 2 \(6 transactions\), behind"):
        check_against_anchor(chain.store, anchor)


def test_a_different_history_at_the_anchored_size_is_refused(
    chains: Chains, key: SigningKey
) -> None:
    chain = _chain_with_blocks(chains, key, [3, 2])
    anchor = _anchor_of(chain, 2)
    other = AnchorRecord(
        institution="st-mary",
        height=anchor.height,
        log_size=anchor.log_size,
        log_root=sha256(b"another history"),
        block_hash=anchor.block_hash,
    )
    with pytest.raises(DamagedStore, match="log root at size 6 is not the one"):
        check_against_anchor(chain.store, other)
    moved = AnchorRecord(
        institution="st-mary",
        height=1,
        log_size=anchor.log_size,
        log_root=anchor.log_root,
        block_hash=anchor.block_hash,
    )
    with pytest.raises(DamagedStore, match="block 1 is not the block its final anchor published"):
        check_against_anchor(chain.store, moved)


def test_a_chain_behind_the_record_index_is_refused(chains: Chains, key: SigningKey) -> None:
    chain = _chain_with_blocks(chains, key, [1, 1])
    with pytest.raises(DamagedStore, match="ends at height 2, but record versions were written"):
        check_private_store(chain.store, key=key.public, indexed_height=3)


def test_a_corrupt_sqlite_file_fails_the_storage_check(chains: Chains, key: SigningKey) -> None:
    _chain_with_blocks(chains, key, [50] * 20)
    path = chains.path("chain.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    assert pages > 4
    with path.open("r+b") as f:  # garble the newest pages (transactions, nodes), not meta
        for page in range(pages // 2, pages):
            f.seek(page * page_size + 8)
            f.write(b"\xa5" * 64)
    store = chains.open_store()
    with pytest.raises(DamagedStore, match=r"chain\.db"):
        store.check_storage()
    assert store.damage() is not None
