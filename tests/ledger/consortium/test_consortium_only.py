"""Consortium-only mode: the genesis switch, the record rules, and the commit adapter.

Real members over a real ``SoloOrderer`` and SQLite stores; the auditor's
view is ``verify_chain`` with the ``ConsortiumPolicy`` built from the genesis.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from medledger.benchmarks.consortium_only import ConsortiumCommit
from medledger.core.consortium import CONSORTIUM_ONLY, ConsortiumParams, Genesis, Member
from medledger.core.errors import InvalidInput, InvalidSignature, VerificationError
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.core.transactions import RECORD_PUT
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.consortium.modes import ConsortiumOnlyState, initial_state
from medledger.ledger.consortium.rules import ConsortiumState
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.ledger.verify import verify_chain
from medledger.storage.sqlite.chain import SqliteChainStore

KEYS = [SigningKey.generate() for _ in range(4)]


def _genesis(mode: str = CONSORTIUM_ONLY) -> Genesis:
    return Genesis(
        consortium="test",
        time_ms=1_700_000_000_000,
        members=tuple(
            Member(id=f"m{i}", name=f"member {i}", signing_key=k.public) for i, k in enumerate(KEYS)
        ),
        params=ConsortiumParams(cut_after_ms=5, mode=mode),
    )


def _hex(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _put_body(n: int = 1) -> dict[str, Any]:
    return {
        "resource_type": "Observation",
        "ref": _hex(f"ref{n}"),
        "version": 1,
        "blob": _hex(f"blob{n}"),
        "patient": _hex("patient"),
    }


def _tx(genesis: Genesis, body: dict[str, Any], *keys: SigningKey, kind: str = RECORD_PUT) -> Any:
    unsigned = Transaction(type=kind, chain=genesis.chain_id, body=body, time_ms=1)
    return Transaction(
        type=kind,
        chain=genesis.chain_id,
        body=body,
        time_ms=1,
        signatures=tuple(k.sign(unsigned.signing_bytes()) for k in keys),
    )


# -- the genesis switch -----------------------------------------------------------------


def test_hybrid_genesis_json_has_no_mode_so_existing_hashes_are_unchanged() -> None:
    params = ConsortiumParams(cut_after_ms=5)
    assert "mode" not in params.to_json()
    assert ConsortiumParams.from_json(params.to_json()) == params
    only = ConsortiumParams(cut_after_ms=5, mode=CONSORTIUM_ONLY)
    assert only.to_json()["mode"] == CONSORTIUM_ONLY
    assert ConsortiumParams.from_json(only.to_json()) == only
    assert _genesis().hash() != _genesis("hybrid").hash()


@pytest.mark.parametrize("mode", ["", "private", 1, None])
def test_unknown_modes_are_refused(mode: object) -> None:
    with pytest.raises(InvalidInput):
        ConsortiumParams.from_json({"mode": mode})


def test_the_genesis_chooses_the_rules_and_copies_keep_them() -> None:
    hybrid = initial_state(_genesis("hybrid"))
    only = initial_state(_genesis())
    assert type(hybrid) is ConsortiumState
    assert isinstance(only, ConsortiumOnlyState)
    assert isinstance(only.copy(), ConsortiumOnlyState)


# -- the rules ------------------------------------------------------------------------


def test_a_hybrid_consortium_refuses_record_transactions() -> None:
    genesis = _genesis("hybrid")
    with pytest.raises(InvalidInput, match="unknown consortium transaction type"):
        initial_state(genesis).check(_tx(genesis, _put_body(), KEYS[0]))


def test_consortium_only_accepts_a_member_signed_record_put_once() -> None:
    genesis = _genesis()
    state = initial_state(genesis)
    tx = _tx(genesis, _put_body(), KEYS[2])
    state.check(tx)
    state.apply(tx, tx.hash())
    with pytest.raises(InvalidInput, match="replay"):
        state.check(tx)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"extra": "x"}, InvalidInput),
        ({"version": True}, InvalidInput),
        ({"version": 0}, InvalidInput),
        ({"version": "1"}, InvalidInput),
        ({"blob": "not hex"}, InvalidInput),
        ({"ref": _hex("r")[:-2]}, InvalidInput),
        ({"patient": 7}, InvalidInput),
    ],
)
def test_malformed_record_puts_are_refused(change: dict[str, Any], error: type[Exception]) -> None:
    genesis = _genesis()
    with pytest.raises(error):
        initial_state(genesis).check(_tx(genesis, {**_put_body(), **change}, KEYS[0]))


def test_record_puts_need_exactly_one_member_signature() -> None:
    genesis = _genesis()
    state = initial_state(genesis)
    with pytest.raises(InvalidSignature):
        state.check(_tx(genesis, _put_body()))
    with pytest.raises(InvalidSignature):
        state.check(_tx(genesis, _put_body(), SigningKey.generate()))
    with pytest.raises(InvalidSignature):
        state.check(_tx(genesis, _put_body(), KEYS[0], KEYS[1]))
    forged = _tx(genesis, _put_body(), KEYS[0])
    tampered = Transaction(
        type=forged.type,
        chain=forged.chain,
        body={**forged.body, "version": 2},
        time_ms=forged.time_ms,
        signatures=forged.signatures,
    )
    with pytest.raises(InvalidSignature):
        state.check(tampered)


def test_consortium_only_still_refuses_unknown_types_and_checks_erase_bodies() -> None:
    genesis = _genesis()
    state = initial_state(genesis)
    with pytest.raises(InvalidInput, match="unknown"):
        state.check(_tx(genesis, _put_body(), KEYS[0], kind="record.patch"))
    erase = {
        "resource_type": "Patient",
        "ref": _hex("p"),
        "versions": 2,
        "patient": None,
    }
    state.check(_tx(genesis, erase, KEYS[1], kind="record.erase"))
    with pytest.raises(InvalidInput):
        state.check(_tx(genesis, {**erase, "versions": -1}, KEYS[1], kind="record.erase"))


# -- the adapter over real members ----------------------------------------------------------


async def _members(
    root: Path, genesis: Genesis
) -> tuple[SoloOrderer, list[ConsortiumMember], list[SqliteChainStore]]:
    orderer = SoloOrderer(root / "order.db")
    members, stores = [], []
    for i, key in enumerate(KEYS):
        store = SqliteChainStore.create(root / f"m{i}.db", genesis.chain_id)
        member = ConsortiumMember(
            genesis=genesis, member_id=f"m{i}", key=key, orderer=orderer, store=store
        )
        await member.start()
        members.append(member)
        stores.append(store)
    return orderer, members, stores


def test_commit_adapter_finalizes_records_and_an_auditor_verifies_them(tmp_path: Path) -> None:
    genesis = _genesis()

    async def scenario() -> list[bytes]:
        orderer, members, stores = await _members(tmp_path, genesis)
        try:
            commit = ConsortiumCommit(members[1], KEYS[1], stores[1])
            assert commit.chain_id == genesis.chain_id
            txs = [
                commit.sign(
                    Transaction(
                        type=RECORD_PUT, chain=commit.chain_id, body=_put_body(n), time_ms=n
                    )
                )
                for n in range(20)
            ]
            receipts = await commit.submit_many(txs)
            assert [r.tx_hash for r in receipts] == [t.hash() for t in txs]
            # Stored at this member once submit returned: the records service reads it back.
            for tx in txs:
                _, data = commit.store.tx_by_hash(tx.hash())
                assert Transaction.decode(data) == tx
            erase = await commit.submit(
                "record.erase",
                {
                    "resource_type": "Observation",
                    "ref": _hex("ref0"),
                    "versions": 1,
                    "patient": None,
                },
            )
            for m in members:
                await m.wait_final(members[1].final_height, timeout=10)
            return [*(t.hash() for t in txs), erase.tx_hash]
        finally:
            for m in members:
                await m.close()
            await orderer.close()
            for s in stores:
                s.close()

    hashes = asyncio.run(scenario())
    for i in range(len(KEYS)):
        store = SqliteChainStore.open(tmp_path / f"m{i}.db")
        try:
            report = verify_chain(store, policy=ConsortiumPolicy(genesis))
            assert report.log_size == 1 + len(hashes)
            for h in hashes:
                store.tx_by_hash(h)
        finally:
            store.close()


def test_an_auditor_with_hybrid_rules_rejects_a_record_put() -> None:
    hybrid = _genesis("hybrid")
    policy = ConsortiumPolicy(hybrid)
    policy.begin_block(1, 0)
    with pytest.raises(VerificationError, match="unknown consortium transaction type"):
        policy.transaction(1, 1, _tx(hybrid, _put_body(), KEYS[0]))


def test_commit_adapter_refuses_a_hybrid_consortium_and_foreign_txs(tmp_path: Path) -> None:
    async def scenario() -> None:
        for mode in ("hybrid", CONSORTIUM_ONLY):
            genesis = _genesis(mode)
            sub = tmp_path / mode
            sub.mkdir()
            orderer, members, stores = await _members(sub, genesis)
            try:
                if mode == "hybrid":
                    with pytest.raises(InvalidInput, match="consortium-only"):
                        ConsortiumCommit(members[0], KEYS[0], stores[0])
                    continue
                commit = ConsortiumCommit(members[0], KEYS[0], stores[0])
                other = Transaction(type=RECORD_PUT, chain="private:x", body=_put_body(), time_ms=1)
                with pytest.raises(InvalidInput, match="names chain"):
                    commit.sign(other)
                with pytest.raises(InvalidInput, match="not a record transaction"):
                    await commit.submit("access", {"reader": "m0"})
                # Signed by another member: valid for the consortium, refused by no one.
                receipt = await commit.submit_many([_tx(genesis, _put_body(), KEYS[3])])
                assert receipt[0].height >= 1
            finally:
                for m in members:
                    await m.close()
                await orderer.close()
                for s in stores:
                    s.close()

    asyncio.run(scenario())
