"""An ``access`` entry's transaction bytes, laid out directly, are its canonical bytes.

Every read writes one access entry, so the node lays out the entry's
transaction bytes from its fields (``access_tx_bytes``) instead of building a
``Transaction`` and walking it. The bytes on the chain are a fixed format:
these tests hold the layout to ``Transaction(...).encode()`` (canonical JSON)
for any field values, unicode and control characters included, and check that
an ``AccessLog`` over the institution's chain writes the very bytes it wrote
through transaction objects.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from access_values import HEX, VALID
from hypothesis import given
from hypothesis import strategies as st

from medledger.core.errors import InvalidInput
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader, Receipt, Transaction
from medledger.core.transactions import ACCESS
from medledger.ledger.private import MAX_TX_BYTES, PrivateChain
from medledger.services.access import (
    ALLOWED,
    REASONS,
    REFUSED,
    AccessEntry,
    AccessLog,
    access_tx_bytes,
)
from medledger.services.fhir import is_resource_type
from medledger.storage.sqlite.chain import SqliteChainStore

FIELDS = (
    "reader",
    "holder",
    "patient",
    "consent",
    "resource",
    "outcome",
    "reason",
    "actor",
    "request",
)


def unchecked_entry(**fields: str) -> AccessEntry:
    """An entry holding any text (the layout must be right for every string, not only
    for the shapes ``AccessEntry`` admits), built without its field checks."""
    entry = object.__new__(AccessEntry)
    for name in FIELDS:
        object.__setattr__(entry, name, fields[name])
    return entry


def reference_bytes(entry: AccessEntry, chain: Any, time_ms: Any) -> bytes:
    return Transaction(
        type=ACCESS, chain=chain, body=entry.private_body(), time_ms=time_ms
    ).encode()


#: Any text: every unicode category but lone surrogates (those are below), control
#: characters, quotes and backslashes included.
ANY_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('"\\\x00\x1f\x7f/'),
    max_size=40,
)


@given(
    fields=st.fixed_dictionaries({name: ANY_TEXT for name in FIELDS}),
    chain=ANY_TEXT,
    time_ms=st.integers(min_value=-(2**60), max_value=2**60),
)
def test_the_layout_is_the_canonical_encoding_for_any_values(
    fields: dict[str, str], chain: str, time_ms: int
) -> None:
    entry = unchecked_entry(**fields)
    try:
        expected = reference_bytes(entry, chain, time_ms)
    except InvalidInput:
        with pytest.raises(InvalidInput):
            access_tx_bytes(entry, chain=chain, time_ms=time_ms)
        return
    assert access_tx_bytes(entry, chain=chain, time_ms=time_ms) == expected


@pytest.mark.parametrize(
    "chain, time_ms",
    [
        ("private:st-mary", 1_700_000_000_000),
        ("private:st-mary", 0),
        ("private:st-mary", 2**53 - 1),
        ("private:st-mary", 2**53),  # beyond JSON's safe integers
        ("private:st-mary", -1),
        ("private:st-mary", True),
        ("private:st-mary", 1.5),
        ("", 1),
        (None, 1),
        ("private:\ud800", 1),  # a lone surrogate
    ],
)
def test_edge_values_are_encoded_or_refused_as_the_transaction_does(
    chain: Any, time_ms: Any
) -> None:
    entry = AccessEntry(**VALID)
    try:
        expected = reference_bytes(entry, chain, time_ms)
    except InvalidInput:
        with pytest.raises(InvalidInput):
            access_tx_bytes(entry, chain=chain, time_ms=time_ms)
        return
    assert access_tx_bytes(entry, chain=chain, time_ms=time_ms) == expected


@pytest.mark.parametrize("field", FIELDS)
def test_a_lone_surrogate_in_any_field_is_refused(field: str) -> None:
    entry = unchecked_entry(**{**VALID, field: "a\udc00b"})
    with pytest.raises(InvalidInput):
        reference_bytes(entry, "private:st-mary", 1)
    with pytest.raises(InvalidInput):
        access_tx_bytes(entry, chain="private:st-mary", time_ms=1)


def test_a_fixed_vector_of_a_read_entry() -> None:
    entry = AccessEntry(
        reader="st-mary",
        holder="st-mary",
        patient=HEX,
        consent="",
        resource=f"Observation:{'ef' * 32}",
        outcome=ALLOWED,
        actor="clinician:tok-1",
    )
    assert access_tx_bytes(entry, chain="private:st-mary", time_ms=1_700_000_000_123) == (
        b'{"body":{"actor":"clinician:tok-1","consent":"","holder":"st-mary",'
        b'"outcome":"allowed","patient":"' + HEX.encode() + b'","reader":"st-mary",'
        b'"reason":"","request":"","resource":"Observation:' + b"ef" * 32 + b'"},'
        b'"chain":"private:st-mary","time_ms":1700000000123,"type":"access"}'
    )


_MEMBER = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_HASH = re.compile(r"[0-9a-f]{64}")
_RESOURCE = re.compile(r"[A-Z][A-Za-z]{0,63}:[0-9a-f]{64}")
_ACTOR = re.compile(r"[a-z]{1,16}:[A-Za-z0-9-]{1,64}")


def first_refused_field(fields: dict[str, str]) -> str | None:
    """The entry's field checks as first written: every check, in declaration order."""
    checks = (
        ("reader", _MEMBER.fullmatch(fields["reader"])),
        ("holder", _MEMBER.fullmatch(fields["holder"])),
        ("patient", not fields["patient"] or _HASH.fullmatch(fields["patient"])),
        ("consent", not fields["consent"] or _HASH.fullmatch(fields["consent"])),
        ("request", not fields["request"] or _HASH.fullmatch(fields["request"])),
        (
            "resource",
            fields["resource"] in ("", "list")
            or (
                _RESOURCE.fullmatch(fields["resource"]) is not None
                and is_resource_type(fields["resource"].split(":", 1)[0])
            ),
        ),
        ("outcome", fields["outcome"] in (ALLOWED, REFUSED)),
        ("reason", not fields["reason"] or fields["reason"] in REASONS),
        ("actor", not fields["actor"] or _ACTOR.fullmatch(fields["actor"])),
    )
    return next((name for name, ok in checks if not ok), None)


SHAPED = st.sampled_from(
    [
        *("", "list", "st-mary", HEX, "Observation:" + "ef" * 32, "Foo:" + "ef" * 32),
        *(ALLOWED, REFUSED, "the consent has expired", "clinician:x-1", "a b", "Z" * 70),
    ]
)


@given(changes=st.dictionaries(st.sampled_from(FIELDS), SHAPED | ANY_TEXT, max_size=4))
def test_the_entry_refuses_exactly_what_its_checks_refused(changes: dict[str, str]) -> None:
    """The checks stop at the first bad field now (and test the holder only when it is
    not the reader): the same entries are refused, naming the same field."""
    fields = {**VALID, **changes}
    bad = first_refused_field(fields)
    if bad is None:
        assert AccessEntry(**fields).private_body() == fields
        return
    with pytest.raises(InvalidInput, match=f"access entry {bad} is not a value"):
        AccessEntry(**fields)


class StepClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def now_ms(self) -> int:
        self.now += 7
        return self.now


class TransactionsOnly:
    """The chain as a worker's sequencer link offers it: transaction objects only."""

    def __init__(self, chain: PrivateChain) -> None:
        self._chain = chain

    @property
    def chain_id(self) -> str:
        return self._chain.chain_id

    @property
    def store(self) -> SqliteChainStore:
        store = self._chain.store
        assert isinstance(store, SqliteChainStore)
        return store

    @property
    def durable_height(self) -> int:
        return self._chain.durable_height

    async def submit(self, tx_type: str, body: dict[str, Any]) -> Receipt:
        return await self._chain.submit(tx_type, body)

    async def submit_many(self, txs: list[Transaction]) -> list[Receipt]:
        return await self._chain.submit_many(txs)


def read_entries(n: int) -> list[AccessEntry]:
    return [
        AccessEntry(
            reader="st-mary",
            holder="st-mary",
            patient=f"{i:064x}",
            consent="",
            resource=f"Patient:{i + 1:064x}",
            outcome=ALLOWED,
            actor="clinician:tok-1",
        )
        for i in range(n)
    ]


def test_the_access_log_writes_the_same_bytes_as_through_transactions(tmp_path: Path) -> None:
    """Two chains, the same entries and clock readings: one log lays the bytes out, the
    other goes through transaction objects; each read's group lands in one block."""
    key = SigningKey.generate()
    stores, chains = [], []
    for name in ("laid-out", "objects"):
        store = SqliteChainStore.create(tmp_path / f"{name}.db", "private:st-mary")
        stores.append(store)
        chains.append(
            PrivateChain.create(
                store, key, chain_id="private:st-mary", institution="st-mary", name="St. Mary"
            )
        )
    laid_out = AccessLog(institution="st-mary", chain=chains[0], clock=StepClock())
    objects = AccessLog(institution="st-mary", chain=TransactionsOnly(chains[1]), clock=StepClock())
    assert laid_out._submit_encoded is not None and objects._submit_encoded is None

    async def main() -> None:
        try:
            for log in (laid_out, objects):
                entries = read_entries(5)
                await log.record_many(entries[:1])
                await log.record_many(entries[1:])
                await log.record_many([])
        finally:
            for chain in chains:
                await chain.close()

    try:
        asyncio.run(main())
        written = [[s.tx_data(i) for i in range(1, 6)] for s in stores]
        assert written[0] == written[1]
        for i, data in enumerate(written[0]):
            tx = Transaction.decode(data)
            assert (tx.type, tx.chain, tx.signatures) == (ACCESS, "private:st-mary", ())
            assert tx.body == read_entries(5)[i].private_body()
        assert [s.counts()[1] for s in stores] == [6, 6]
        tx_counts = [BlockHeader.decode(b.header_bytes).tx_count for b in stores[0].iter_blocks()]
        assert tx_counts == [1, 1, 4]  # genesis, then each read's group in one block
    finally:
        for store in stores:
            store.close()


def test_the_chain_refuses_an_oversized_encoded_transaction_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store = SqliteChainStore.create(tmp_path / "chain.db", "private:st-mary")
    chain = PrivateChain.create(
        store, SigningKey.generate(), chain_id="private:st-mary", institution="st-mary", name="S"
    )
    small = access_tx_bytes(read_entries(1)[0], chain="private:st-mary", time_ms=1)

    async def main() -> None:
        try:
            with pytest.raises(InvalidInput, match="the limit is"):
                await chain.submit_encoded([small, b"x" * (MAX_TX_BYTES + 1)])
            assert await chain.submit_encoded([]) == []
        finally:
            await chain.close()

    try:
        asyncio.run(main())
        assert store.counts() == (1, 1, 0)
    finally:
        store.close()


def test_remembered_values_change_no_answer() -> None:
    """Values that passed are remembered (every read builds an entry from values seen
    before); what was refused is refused again, and a full memory is forgotten, not
    trusted past its bound."""
    from medledger.services import access

    for _ in range(3):
        assert AccessEntry(**VALID).private_body() == VALID
        for field in FIELDS:
            with pytest.raises(InvalidInput, match=f"access entry {field} is not a value"):
                AccessEntry(**{**VALID, field: "Jane Roe, HIV positive"})
    for i in range(access._SEEN_MAX + 10):  # fills and overflows the memory of hashes
        AccessEntry(**{**VALID, "patient": f"{i:064x}"})
    assert len(access._HASH._seen) <= access._SEEN_MAX
    AccessEntry(**VALID)
    with pytest.raises(InvalidInput, match="access entry patient"):
        AccessEntry(**{**VALID, "patient": "AB" * 32})  # upper case: never a pseudonym
    with pytest.raises(InvalidInput, match="access entry resource"):
        AccessEntry(**{**VALID, "resource": f"JaneRoeHasCarcinoma:{'ef' * 32}"})
