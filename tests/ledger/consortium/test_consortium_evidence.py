"""Equivocation evidence is checked before anyone shows or acts on it.

``evidence.jsonl`` is a file on disk: a record accuses a member only if both
headers are of this chain at the record's height, differ, and both carry the
named member's signature (by its key at that height) over their hash. Every
forgery below was shown as "EQUIVOCATION by ..." by ``consortium status``
before records were checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from medledger.core.consortium import Member, MemberSet
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import IntegrityError
from medledger.core.hashing import ZERO_HASH, sha256
from medledger.core.keys import SigningKey
from medledger.core.models import BlockHeader
from medledger.ledger.consortium.evidence import Evidence, check_evidence, read_evidence

CHAIN = "consortium:evidence-test"
KEYS = {f"h{i}": SigningKey.generate() for i in range(4)}
MEMBERS = MemberSet(
    tuple(Member(id=mid, name=mid, signing_key=key.public) for mid, key in KEYS.items())
)


def _header(height: int, tag: str, chain: str = CHAIN) -> BlockHeader:
    return BlockHeader(
        chain=chain,
        height=height,
        prev_hash=ZERO_HASH,
        tx_root=sha256(tag.encode()),
        tx_count=1,
        log_size=height + 1,
        log_root=sha256(tag.encode()),
        time_ms=1_700_000_000_000,
        proposer="evidence-test",
    )


def _evidence(member: str = "h3", height: int = 5, key: SigningKey | None = None) -> Evidence:
    signer = key or KEYS[member]
    first, second = _header(height, "real"), _header(height, "fake")
    return Evidence(
        member=member,
        height=height,
        first_header=first,
        first=signer.sign(first.hash()),
        second_header=second,
        second=signer.sign(second.hash()),
    )


def _resign_second(evidence: Evidence, header: BlockHeader, key: SigningKey) -> Evidence:
    return replace(evidence, second_header=header, second=key.sign(header.hash()))


FORGERIES: dict[str, Callable[[], Evidence]] = {
    # h3 equivocated, the record names h1.
    "named-member-did-not-sign": lambda: replace(_evidence("h3"), member="h1"),
    # An outsider's key signed both headers.
    "outsider-signed": lambda: _evidence("h1", key=SigningKey.generate()),
    # One vote is twice the same block.
    "same-block-twice": lambda: _resign_second(_evidence(), _header(5, "real"), KEYS["h3"]),
    # The second header is of another height (votes at two heights are no equivocation).
    "another-height": lambda: _resign_second(_evidence(), _header(6, "fake"), KEYS["h3"]),
    "record-height-differs": lambda: replace(_evidence(), height=4),
    # A header of another chain (a private chain's block, say).
    "another-chain": lambda: _resign_second(
        _evidence(), _header(5, "fake", "private:h3"), KEYS["h3"]
    ),
    # A signature that does not verify (the second header edited after signing).
    "edited-header": lambda: replace(_evidence(), second_header=_header(5, "edited")),
    # The second vote signed by another member.
    "two-members": lambda: replace(
        _evidence(), second=KEYS["h2"].sign(_evidence().second_header.hash())
    ),
    "not-a-member": lambda: _evidence("h9", key=KEYS["h3"]),
}


def test_a_real_equivocation_is_valid_evidence(tmp_path: Path) -> None:
    evidence = _evidence()
    check_evidence(evidence, chain_id=CHAIN, voters=MEMBERS)
    path = tmp_path / "evidence.jsonl"
    path.write_bytes(canonical_bytes(evidence.to_json()) + b"\n")
    assert read_evidence(path, chain_id=CHAIN, voters_at=lambda h: MEMBERS) == [evidence]
    assert read_evidence(tmp_path / "none.jsonl", chain_id=CHAIN, voters_at=lambda h: MEMBERS) == []


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_record_is_tampering(tmp_path: Path, forgery: str) -> None:
    path = tmp_path / "evidence.jsonl"
    valid = canonical_bytes(_evidence("h2").to_json())
    path.write_bytes(valid + b"\n" + canonical_bytes(FORGERIES[forgery]().to_json()) + b"\n")
    with pytest.raises(IntegrityError, match=r"^evidence\.jsonl line 2 is not valid equivocation"):
        read_evidence(path, chain_id=CHAIN, voters_at=lambda h: MEMBERS)


def test_the_key_must_be_the_members_key_at_that_height(tmp_path: Path) -> None:
    """After h3 rotated its key at height 10, its old key's votes at 12 prove nothing."""
    rotated = MEMBERS.rotated("h3", SigningKey.generate().public)

    def voters_at(height: int) -> MemberSet:
        return MEMBERS if height < 10 else rotated

    path = tmp_path / "evidence.jsonl"
    path.write_bytes(canonical_bytes(_evidence(height=5).to_json()) + b"\n")
    assert len(read_evidence(path, chain_id=CHAIN, voters_at=voters_at)) == 1
    path.write_bytes(canonical_bytes(_evidence(height=12).to_json()) + b"\n")
    with pytest.raises(IntegrityError, match="not signed by h3's key at consortium height 12"):
        read_evidence(path, chain_id=CHAIN, voters_at=voters_at)


def _doc(edit: Callable[[dict[str, Any]], Any]) -> bytes:
    doc = _evidence().to_json()
    edit(doc)
    return canonical_bytes(doc)


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b'{"member":"h3"}',
        _doc(lambda d: d["votes"].pop()),
        _doc(lambda d: d.update(height=0)),
        _doc(lambda d: d.update(extra=1)),
        b'{"height":5,"member":"h3","votes":[1,2]}',
        b' {"height":5}',  # not canonical
    ],
)
def test_a_malformed_record_is_tampering(tmp_path: Path, line: bytes) -> None:
    path = tmp_path / "evidence.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(IntegrityError, match=r"^evidence\.jsonl line 1 "):
        read_evidence(path, chain_id=CHAIN, voters_at=lambda h: MEMBERS)
