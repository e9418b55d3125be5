"""The patient-trail index: incremental catch-up finds exactly what a full scan finds."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.core.transactions import ACCESS, ACCESS_BATCH
from medledger.ledger.private import PrivateChain
from medledger.services.trail import PATIENT_ENROLL, TrailIndex, patient_trail
from medledger.storage.sqlite.chain import SqliteChainStore

ALICE, BOB = "a" * 64, "b" * 64  # key fingerprints
ALICE_AT_HOME = "p" * 64  # the institution's keyed pseudonym for Alice


def _access(patient: str, n: int) -> dict[str, Any]:
    return {
        "reader": "beta",
        "holder": "alpha",
        "patient": patient,
        "consent": "c" * 64,
        "resource": f"Observation:{n:064x}",
        "outcome": "allowed",
    }


# One step of chain history: (tx type, body). Each inner list is one block.
_STEPS: list[tuple[str, dict[str, Any]]] = [
    (PATIENT_ENROLL, {"patient": ALICE, "pseudonym": ALICE_AT_HOME}),
    (ACCESS, _access(ALICE, 1)),
    (ACCESS, _access(ALICE_AT_HOME, 2)),
    (ACCESS, _access(BOB, 3)),
    (ACCESS_BATCH, {"holder": "alpha", "entries": [_access(BOB, 4), _access(ALICE, 5)]}),
    (ACCESS_BATCH, {"holder": "alpha", "entries": [_access(ALICE, 6), _access(ALICE, 7)]}),
    ("record.put", {"patient": ALICE_AT_HOME, "note": "not a trail tx"}),
    (ACCESS, _access("f" * 64, 8)),
]


_KEY = SigningKey.generate()


def _new_chain(path: Path) -> SqliteChainStore:
    """A private chain holding only its genesis block."""
    store = SqliteChainStore.create(path, "private:alpha")
    PrivateChain.create(store, _KEY, chain_id="private:alpha", institution="alpha", name="Alpha")
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteChainStore]:
    made = _new_chain(tmp_path / "chain.db")
    yield made
    made.close()


def _write(store: SqliteChainStore, blocks: list[list[tuple[str, dict[str, Any]]]]) -> None:
    """Append one block per inner list (same time on every tx: ties are ordered by position)."""
    chain = PrivateChain(store, _KEY, proposer="alpha")

    async def main() -> None:
        try:
            for block in blocks:
                await chain.submit_many(
                    [Transaction(type=t, chain=chain.chain_id, body=b, time_ms=1) for t, b in block]
                )
        finally:
            await chain.close()

    asyncio.run(main())


def _resources(trail: list[dict[str, Any]]) -> list[str]:
    return [item["resource"] for item in trail if item["type"] == ACCESS]


def test_enrolled_pseudonym_batches_and_single_reads_are_all_found(
    store: SqliteChainStore,
) -> None:
    _write(store, [[step] for step in _STEPS])
    trail = patient_trail([store], ALICE)
    assert _resources(trail) == [f"Observation:{n:064x}" for n in (1, 2, 5, 6, 7)]
    batch_items = [i for i in trail if "entry" in i]
    assert [i["entry"] for i in batch_items] == [1, 0, 1]
    assert all(i["holder"] == "alpha" and i["type"] == ACCESS for i in batch_items)
    assert _resources(patient_trail([store], BOB)) == [f"Observation:{n:064x}" for n in (3, 4)]
    assert patient_trail([store], "e" * 64) == []


def test_blocks_added_after_a_query_are_found_by_the_next(store: SqliteChainStore) -> None:
    _write(store, [[step] for step in _STEPS[:3]])
    index = TrailIndex([store])
    asyncio.run(index.catch_up_async())
    assert _resources(index.trail(ALICE)) == [f"Observation:{n:064x}" for n in (1, 2)]
    _write(store, [[step] for step in _STEPS[3:]])
    # Not caught up yet: the index answers from what it has read.
    assert len(_resources(index.trail(ALICE))) == 2
    asyncio.run(index.catch_up_async())
    assert index.trail(ALICE) == patient_trail([store], ALICE)
    assert len(_resources(index.trail(ALICE))) == 5


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=len(_STEPS)), max_size=4),
    slices=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=6),
)
def test_catching_up_in_any_slices_equals_one_full_scan(
    tmp_path_factory: pytest.TempPathFactory, cuts: list[int], slices: list[int]
) -> None:
    store = _new_chain(tmp_path_factory.mktemp("trail") / "chain.db")
    try:
        bounds = [0, *sorted(set(cuts)), len(_STEPS)]
        _write(store, [_STEPS[a:b] for a, b in itertools.pairwise(bounds) if b > a])
        index = TrailIndex([store])
        for size in slices:
            index.catch_up(size)
        index.catch_up()
        for who, reads in ((ALICE, (1, 2, 5, 6, 7)), (BOB, (3, 4))):
            assert index.trail(who) == patient_trail([store], who)
            assert _resources(index.trail(who)) == [f"Observation:{n:064x}" for n in reads]
    finally:
        store.close()
