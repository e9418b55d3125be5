"""What both chain stores share when reading a block back (``storage.chain_layout``)."""

from __future__ import annotations

import json

import pytest

from medledger.core.errors import IntegrityError
from medledger.core.models import SIGNATURE_ALGORITHMS, Signature
from medledger.storage.chain_layout import stored_block

SIGNATURE = Signature(signer="ab" * 32, alg=sorted(SIGNATURE_ALGORITHMS)[0], sig=b"\x30\x01")


def test_a_row_becomes_a_block_whatever_buffer_type_the_driver_returns() -> None:
    sigs = json.dumps([SIGNATURE.to_json()])
    # psycopg returns bytea as memoryview; sqlite3 returns bytes.
    row = (7, memoryview(b"h" * 32), memoryview(b"header"), sigs, 12)
    block = stored_block(row, [memoryview(b"tx-1"), b"tx-2"])
    assert block.height == 7 and block.first_index == 12
    assert block.block_hash == b"h" * 32 and block.header_bytes == b"header"
    assert block.signatures == (SIGNATURE,)
    assert block.tx_data == (b"tx-1", b"tx-2")
    assert all(type(b) is bytes for b in (block.block_hash, block.header_bytes, *block.tx_data))


@pytest.mark.parametrize(
    "sigs",
    [
        "not json",
        "[1]",
        json.dumps([{"signer": "x"}]),
        json.dumps([{**SIGNATURE.to_json(), "sig": "ZZ"}]),
    ],
)
def test_unreadable_stored_signatures_are_tampering_evidence(sigs: str) -> None:
    with pytest.raises(IntegrityError, match="block 7: stored signatures are unreadable"):
        stored_block((7, b"h" * 32, b"header", sigs, 12), [])
