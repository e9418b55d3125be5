"""Helpers shared by the ledger tests (imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path

from medledger.core.keys import SigningKey
from medledger.core.models import Receipt
from medledger.ledger.clock import Clock
from medledger.ledger.private import PrivateChain, SequencerConfig
from medledger.storage.sqlite.chain import SqliteChainStore

__all__ = ["CHAIN", "Chains", "reference_root", "write_rounds"]

CHAIN = "private:st-mary"


class Chains:
    """Creates chains and opens stores under one directory; closes every store at teardown."""

    def __init__(self, directory: Path, clock: Clock) -> None:
        self.directory = directory
        self.clock = clock
        self._stores: list[SqliteChainStore] = []

    def path(self, name: str) -> Path:
        return self.directory / name

    def create(
        self,
        key: SigningKey,
        *,
        name: str = "chain.db",
        chain_id: str = CHAIN,
        config: SequencerConfig | None = None,
    ) -> PrivateChain:
        store = SqliteChainStore.create(self.path(name), chain_id)
        self._stores.append(store)
        return PrivateChain.create(
            store,
            key,
            chain_id=chain_id,
            institution="st-mary",
            name="St. Mary Hospital",
            config=config,
            clock=self.clock,
        )

    def open_store(self, name: str = "chain.db") -> SqliteChainStore:
        store = SqliteChainStore.open(self.path(name))
        self._stores.append(store)
        return store

    def close_all(self) -> None:
        for store in self._stores:
            store.close()


async def write_rounds(
    chain: PrivateChain, sizes: Sequence[int], tag: str = "r"
) -> list[list[Receipt]]:
    """For each size, submit that many transactions at once and wait for all of them.

    Submissions of one round are queued before the sequencer runs, so with the
    default configuration each round becomes one block of exactly that size.
    """
    rounds = []
    for r, n in enumerate(sizes):
        receipts = await asyncio.gather(
            *(chain.submit("record.put", {"tag": tag, "round": r, "i": i}) for i in range(n))
        )
        rounds.append(list(receipts))
    return rounds


def reference_root(tx_data: Sequence[bytes]) -> bytes:
    """RFC 6962 MTH(D[n]) straight from §2.1, with hashlib only (slow, for cross-checks)."""
    if not tx_data:
        return hashlib.sha256(b"").digest()
    if len(tx_data) == 1:
        return hashlib.sha256(b"\x00" + tx_data[0]).digest()
    k = 1 << ((len(tx_data) - 1).bit_length() - 1)
    return hashlib.sha256(
        b"\x01" + reference_root(tx_data[:k]) + reference_root(tx_data[k:])
    ).digest()
