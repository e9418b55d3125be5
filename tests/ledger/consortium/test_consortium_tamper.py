"""Tampering with a stored consortium chain is caught by ``verify_chain`` + ``ConsortiumPolicy``.

Each case edits the member's SQLite file with raw SQL, as an insider with file
access would, and verification must raise a :class:`VerificationError` naming
the edited block.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from consortium_net import MakeNetwork, Network

from medledger.core.errors import VerificationError
from medledger.core.keys import SigningKey
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import verify_chain

Sigs = list[dict[str, Any]]


def _flip_hex(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


def corrupt_one_signature(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    kept = sigs[:3]  # exactly a quorum, so one bad signature leaves too few
    kept[0] = dict(kept[0], sig=_flip_hex(kept[0]["sig"]))
    return kept


def below_quorum(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    return sigs[:2]


def no_signatures(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    return []


def one_signer_three_times(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    return [sigs[0], sigs[0], sigs[0]]


def outsider_signature(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    return [*sigs[:2], SigningKey.generate().sign(block_hash).to_json()]


def _absent_member(net: Network, sigs: Sigs) -> SigningKey:
    """A member's key that signed none of ``sigs``."""
    present = {s["signer"] for s in sigs}
    return next(k for k in net.keys.values() if k.fingerprint not in present)


# Beside a valid quorum: the certificate still counts enough members, but carries a
# signature no member would put there (accepted before certificates were strict).
def outsider_beside_quorum(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    return [*sigs[:3], SigningKey.generate().sign(block_hash).to_json()]


def invalid_beside_quorum(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    other = _absent_member(net, sigs[:3])
    return [*sigs[:3], other.sign(b"\x00" * 32).to_json()]


def duplicate_beside_quorum(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    return [*sigs[:3], sigs[0]]


def previous_blocks_certificate(net: Network, sigs: Sigs, block_hash: bytes, prev: Sigs) -> Sigs:
    return prev


CERTIFICATE_EDITS: dict[str, Callable[[Network, Sigs, bytes, Sigs], Sigs]] = {
    "corrupt-one-signature": corrupt_one_signature,
    "below-quorum": below_quorum,
    "no-signatures": no_signatures,
    "one-signer-three-times": one_signer_three_times,
    "outsider-signature": outsider_signature,
    "previous-blocks-certificate": previous_blocks_certificate,
    "outsider-beside-quorum": outsider_beside_quorum,
    "invalid-beside-quorum": invalid_beside_quorum,
    "duplicate-beside-quorum": duplicate_beside_quorum,
}


def build(net: Network) -> int:
    async def scenario(net: Network) -> int:
        await net.start("h0", "h1", "h2", "h3")
        for via in ("h0", "h1", "h2", "h3", "h0"):
            await net.submit_many(via, [net.access(via), net.access("h1", via)])
        return await net.settle()

    height = net.run(scenario)
    assert height >= 4
    return height


@contextlib.contextmanager
def raw_db(path: Path) -> Any:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize("edit", sorted(CERTIFICATE_EDITS))
def test_tampered_certificate_is_caught(network: MakeNetwork, edit: str) -> None:
    net = network(4)
    height = build(net)
    target = height // 2 + 1
    path = net.consortium_path("h1")
    verify_chain(net.open_store(path), policy=ConsortiumPolicy(net.genesis))
    with raw_db(path) as conn:
        rows = dict(
            conn.execute(
                "SELECT height, signatures FROM blocks WHERE height IN (?, ?)", (target - 1, target)
            ).fetchall()
        )
        (block_hash,) = conn.execute(
            "SELECT hash FROM blocks WHERE height = ?", (target,)
        ).fetchone()
        sigs = json.loads(rows[target])
        assert len(sigs) >= 3
        new = CERTIFICATE_EDITS[edit](net, sigs, bytes(block_hash), json.loads(rows[target - 1]))
        conn.execute(
            "UPDATE blocks SET signatures = ? WHERE height = ?",
            (json.dumps(new, separators=(",", ":")), target),
        )
    with pytest.raises(
        VerificationError, match=rf"^consortium chain \S+, block {target}: finality certificate"
    ):
        verify_chain(net.open_store(path), policy=ConsortiumPolicy(net.genesis))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"outcome":"allowed"', b'"outcome":"refused"'),  # still well-formed, signature breaks
        (b'"reader":"h', b'"reader":"x'),
        (b'"time_ms":1', b'"time_ms":2'),
    ],
)
def test_altered_transaction_is_caught(network: MakeNetwork, old: bytes, new: bytes) -> None:
    net = network(4)
    height = build(net)
    target = height // 2 + 1
    path = net.consortium_path("h2")
    with raw_db(path) as conn:
        first, count = conn.execute(
            "SELECT first_index, tx_count FROM blocks WHERE height = ?", (target,)
        ).fetchone()
        idx = first + count - 1
        (data,) = conn.execute("SELECT data FROM txs WHERE idx = ?", (idx,)).fetchone()
        assert old in data
        conn.execute("UPDATE txs SET data = ? WHERE idx = ?", (data.replace(old, new, 1), idx))
    with pytest.raises(VerificationError, match=rf"^consortium chain \S+, block {target}:"):
        verify_chain(net.open_store(path), policy=ConsortiumPolicy(net.genesis))


def test_swapped_genesis_document_is_caught(network: MakeNetwork) -> None:
    """A store whose block 0 is another consortium's genesis fails this consortium's policy."""
    net = network(4)
    build(net)
    other = network(4)
    build(other)
    with pytest.raises(
        VerificationError, match=r"^consortium chain \S+, block 0: not this consortium's genesis"
    ):
        verify_chain(
            net.open_store(other.consortium_path("h0")), policy=ConsortiumPolicy(net.genesis)
        )


def test_missing_block_is_caught(network: MakeNetwork) -> None:
    net = network(4)
    height = build(net)
    path = net.consortium_path("h3")
    with raw_db(path) as conn:
        conn.execute("DELETE FROM blocks WHERE height = ?", (height // 2,))
    with pytest.raises(
        VerificationError, match=rf"^consortium chain \S+, block {height // 2}: missing"
    ):
        verify_chain(net.open_store(path), policy=ConsortiumPolicy(net.genesis))
