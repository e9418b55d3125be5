from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.errors import InvalidInput
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.models import Block, BlockHeader, Signature, Transaction

hashes = st.binary(min_size=32, max_size=32)
# Basic Multilingual Plane characters without surrogates: canonical JSON
# rejects lone surrogates everywhere and characters beyond U+FFFF in keys.
bmp = st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",))
texts = st.text(alphabet=bmp, min_size=1, max_size=20)
keys = st.text(alphabet=bmp, max_size=5)
ints = st.integers(min_value=0, max_value=2**53 - 1)
# Values (not keys) may hold any Unicode scalar value; st.text() has no surrogates.
json_leaf = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=10)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=10,
)

headers = st.builds(
    BlockHeader,
    chain=texts,
    height=ints,
    prev_hash=hashes,
    tx_root=hashes,
    tx_count=st.just(0),
    log_size=ints,
    log_root=hashes,
    time_ms=ints,
    proposer=texts,
)
transactions = st.builds(
    Transaction,
    type=texts,
    chain=texts,
    body=st.dictionaries(keys, json_values, max_size=4),
    time_ms=ints,
)


@given(headers)
def test_header_round_trips_exactly(header: BlockHeader) -> None:
    data = header.encode()
    assert parse_canonical(data) == header.to_json()
    assert BlockHeader.decode(data) == header
    assert header.hash() == sha256(data)


@given(transactions)
def test_transaction_round_trips_exactly(tx: Transaction) -> None:
    data = tx.encode()
    assert Transaction.decode(data) == tx
    assert tx.hash() == sha256(data)
    assert canonical_bytes(Transaction.from_json(tx.to_json()).to_json()) == data


def test_header_json_has_exactly_the_fixed_fields() -> None:
    h = BlockHeader(
        chain="private:a",
        height=1,
        prev_hash=b"\0" * 32,
        tx_root=b"\1" * 32,
        tx_count=2,
        log_size=3,
        log_root=b"\2" * 32,
        time_ms=5,
        proposer="a",
    )
    assert list(parse_canonical(h.encode())) == [
        "chain",
        "height",
        "log_root",
        "log_size",
        "prev_hash",
        "proposer",
        "time_ms",
        "tx_count",
        "tx_root",
    ]
    assert h.encode() == (
        b'{"chain":"private:a","height":1,"log_root":"' + b"02" * 32 + b'","log_size":3,'
        b'"prev_hash":"' + b"00" * 32 + b'","proposer":"a","time_ms":5,"tx_count":2,'
        b'"tx_root":"' + b"01" * 32 + b'"}'
    )


def _good_header() -> dict[str, Any]:
    return {
        "chain": "c",
        "height": 1,
        "prev_hash": "00" * 32,
        "tx_root": "11" * 32,
        "tx_count": 1,
        "log_size": 2,
        "log_root": "22" * 32,
        "time_ms": 3,
        "proposer": "p",
    }


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("proposer"),
        lambda d: d.update(extra=1),
        lambda d: d.update(height=-1),
        lambda d: d.update(height=True),
        lambda d: d.update(height="1"),
        lambda d: d.update(prev_hash="00" * 31),
        lambda d: d.update(prev_hash="AB" * 32),
        lambda d: d.update(tx_root="zz" * 32),
        lambda d: d.update(chain=""),
        lambda d: d.update(tx_count=3),  # more txs in the block than in the whole log
    ],
)
def test_header_from_json_rejects_bad_shapes(mutate: Any) -> None:
    d = _good_header()
    BlockHeader.from_json(d)  # the unmutated form is accepted
    mutate(d)
    with pytest.raises(InvalidInput):
        BlockHeader.from_json(d)


def test_transaction_rejects_bad_shapes() -> None:
    good = {"type": "t", "chain": "c", "body": {}, "time_ms": 1}
    Transaction.from_json(good)
    for bad in (
        {**good, "body": []},
        {**good, "time_ms": 1.5},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "type"},
        {**good, "signatures": []},
        "not an object",
    ):
        with pytest.raises(InvalidInput):
            Transaction.from_json(bad)
    with pytest.raises(InvalidInput):
        Transaction.decode(b'{"body":{},"chain":"c","time_ms":1, "type":"t"}')  # not canonical


def test_signed_by_adds_one_signature_per_signer_over_the_unsigned_bytes() -> None:
    first, second = SigningKey.generate(), SigningKey.generate()
    unsigned = Transaction(type="consent.grant", chain="consortium:x", body={"a": 1}, time_ms=9)
    once = unsigned.signed_by(first)
    twice = once.signed_by(second)
    assert unsigned.signatures == ()
    assert len(once.signatures) == 1 and len(twice.signatures) == 2
    assert twice.signatures[0] == once.signatures[0]
    assert twice.signing_bytes() == unsigned.encode()
    first.public.verify(twice.signatures[0], unsigned.encode())
    second.public.verify(twice.signatures[1], unsigned.encode())
    assert twice.hash() != unsigned.hash()


def test_signed_transaction_and_block_round_trip() -> None:
    key = SigningKey.generate()
    unsigned = Transaction(type="consent.grant", chain="consortium:x", body={"a": 1}, time_ms=9)
    tx = Transaction(
        type=unsigned.type,
        chain=unsigned.chain,
        body=unsigned.body,
        time_ms=unsigned.time_ms,
        signatures=(key.sign(unsigned.signing_bytes()),),
    )
    assert tx.signing_bytes() == unsigned.encode()
    key.public.verify(tx.signatures[0], tx.signing_bytes())
    assert Transaction.decode(tx.encode()) == tx
    header = BlockHeader(
        chain="c",
        height=0,
        prev_hash=b"\0" * 32,
        tx_root=b"\1" * 32,
        tx_count=1,
        log_size=1,
        log_root=b"\1" * 32,
        time_ms=1,
        proposer="p",
    )
    block = Block(header=header, signatures=(key.sign(header.hash()),), txs=(tx,))
    assert Block.from_json(block.to_json()) == block
    bad = block.to_json()
    bad["hash"] = "00" * 32
    with pytest.raises(InvalidInput):
        Block.from_json(bad)


def test_signature_shape_checks() -> None:
    with pytest.raises(InvalidInput):
        Signature(signer="ab", alg="ecdsa-p256-sha256", sig=b"x")
    with pytest.raises(InvalidInput):
        Signature(signer="ab" * 32, alg="rsa", sig=b"x")
    with pytest.raises(InvalidInput):
        Signature.from_json({"signer": "ab" * 32, "alg": "ecdsa-p256-sha256", "sig": "xyz"})
