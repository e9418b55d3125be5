"""The golden consortium re-verified from docs/formats.md alone, without medledger's code.

This module imports nothing of medledger: only ``hashlib``, ``json`` and
``cryptography``, as an auditor's own verifier would. It re-derives, for the
frozen consortium in ``tests/golden/consortium/`` (written once by
``tests/golden/make_golden_consortium.py``): every block hash and link, every
``tx_root``/``log_size``/``log_root``, block 0 as the genesis document, every
finality certificate (strict: distinct voters of that height, each signature
valid, at least ⌊(n+f)/2⌋+1), every transaction signature and membership
quorum with the change taking effect right after its transaction, every anchor
(advancing, RFC 6962 consistency proof from the previous one, and the anchored
private block, root and size), and the equivocation record. It also checks the
hex values docs/formats.md prints for this consortium.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

GOLDEN = Path(__file__).parents[1] / "golden" / "consortium"
FORMATS = Path(__file__).parents[2] / "docs" / "formats.md"


def canon(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def leaf(data: bytes) -> bytes:
    return sha(b"\x00" + data)


def node(left: bytes, right: bytes) -> bytes:
    return sha(b"\x01" + left + right)


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash over leaf hashes."""
    if not leaves:
        return sha(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node(mth(leaves[:k]), mth(leaves[k:]))


def consistent(m: int, n: int, proof: list[bytes], old: bytes, new: bytes) -> bool:
    """RFC 9162 §2.1.4.2 (for 0 < m < n)."""
    if not 0 < m < n or not proof:
        return False
    if m & (m - 1) == 0:
        proof = [old, *proof]
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old and sr == new


def quorum(n: int) -> int:
    return (n + (n - 1) // 3) // 2 + 1


def fingerprint(spki_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(spki_hex)).hexdigest()


def valid(spki_hex: str, sig: dict[str, str], message: bytes) -> bool:
    """ECDSA P-256 with SHA-256 over ``message`` (for a block: the 32 raw hash bytes)."""
    if sig["alg"] != "ecdsa-p256-sha256" or sig["signer"] != fingerprint(spki_hex):
        return False
    key = load_der_public_key(bytes.fromhex(spki_hex))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(bytes.fromhex(sig["sig"]), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def signers(members: list[dict[str, str]], sigs: list[dict[str, str]], message: bytes) -> set[str]:
    """Strict: every signature a distinct member's and valid; the ids of the signers."""
    by_fp = {fingerprint(m["signing_key"]): m for m in members}
    ids = [by_fp[s["signer"]]["id"] for s in sigs]  # KeyError: a non-member signed
    assert len(set(ids)) == len(ids), "a member signed twice"
    assert all(valid(by_fp[s["signer"]]["signing_key"], s, message) for s in sigs)
    return set(ids)


def lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (GOLDEN / name).read_text().splitlines()]


def check_chain_structure(blocks: list[dict[str, Any]], chain: str) -> list[bytes]:
    """Hashes, links, tx_root, log_size, log_root; returns the log's leaf hashes."""
    log: list[bytes] = []
    prev = "00" * 32
    for height, block in enumerate(blocks):
        header = block["header"]
        assert sha(canon(header)).hex() == block["hash"]
        assert (header["chain"], header["height"], header["prev_hash"]) == (chain, height, prev)
        leaves = [leaf(canon(tx)) for tx in block["txs"]]
        assert all(tx["chain"] == chain for tx in block["txs"])
        log += leaves
        assert header["tx_count"] == len(leaves) and header["tx_root"] == mth(leaves).hex()
        assert header["log_size"] == len(log) and header["log_root"] == mth(log).hex()
        prev = block["hash"]
    return log


def signing_bytes(tx: dict[str, Any]) -> bytes:
    return canon({k: v for k, v in tx.items() if k != "signatures"})


class Auditor:
    """The consortium's state, rebuilt transaction by transaction."""

    def __init__(self, genesis: dict[str, Any]) -> None:
        self.members: list[dict[str, str]] = list(genesis["members"])
        self.anchors: dict[str, dict[str, Any]] = {}
        self.voters: dict[int, list[dict[str, str]]] = {}

    def member(self, member_id: str) -> dict[str, str]:
        return next(m for m in self.members if m["id"] == member_id)

    def signed_by(self, tx: dict[str, Any], member_id: str) -> None:
        (sig,) = tx["signatures"]
        assert valid(self.member(member_id)["signing_key"], sig, signing_bytes(tx))

    def apply(self, tx: dict[str, Any]) -> None:
        body = tx["body"]
        if tx["type"] == "anchor":
            self.signed_by(tx, body["institution"])
            prev = self.anchors.get(body["institution"])
            assert body["prev_size"] == (prev["log_size"] if prev else 0)
            assert body["log_size"] > body["prev_size"]  # anchors advance
            proof = [bytes.fromhex(h) for h in body["proof"]]
            if prev is None:
                assert proof == []
            else:
                assert body["height"] > prev["height"]
                old, new = bytes.fromhex(prev["log_root"]), bytes.fromhex(body["log_root"])
                assert consistent(prev["log_size"], body["log_size"], proof, old, new)
            self.anchors[body["institution"]] = body
        elif tx["type"] == "access.batch":
            self.signed_by(tx, body["holder"])
            assert 1 <= len(body["entries"]) <= 128
            for entry in body["entries"]:
                assert set(entry) == {"reader", "patient", "consent", "resource", "outcome"}
                assert entry["outcome"] in ("allowed", "refused")
                assert entry["consent"] == "" or len(entry["consent"]) == 64
        elif tx["type"] in ("member.add", "member.remove"):
            # Distinct current members whose signature verifies (others are ignored).
            valid_ids = {
                m["id"]
                for sig in tx["signatures"]
                for m in self.members
                if valid(m["signing_key"], sig, signing_bytes(tx))
            }
            assert len(valid_ids) >= quorum(len(self.members))
            if tx["type"] == "member.add":
                self.members.append(body["member"])
            else:
                self.members = [m for m in self.members if m["id"] != body["id"]]
        elif tx["type"] == "consent.grant":
            (sig,) = tx["signatures"]
            assert body["patient"] == fingerprint(body["patient_key"])
            assert valid(body["patient_key"], sig, signing_bytes(tx))
            assert any(m["id"] == body["grantee"] for m in self.members)
        else:
            raise AssertionError(f"unexpected type {tx['type']}")


@pytest.fixture(scope="module")
def audited() -> tuple[Auditor, list[dict[str, Any]]]:
    genesis = json.loads((GOLDEN / "genesis.json").read_text())
    chain = "consortium:" + genesis["consortium"]
    blocks = lines("consortium.jsonl")
    check_chain_structure(blocks, chain)
    auditor = Auditor(genesis)
    # Block 0: the genesis document, unsigned, no certificate, proposer = consortium id.
    zero = blocks[0]
    assert zero["txs"] == [
        {
            "type": "consortium.genesis",
            "chain": chain,
            "body": genesis,
            "time_ms": genesis["time_ms"],
        }
    ]
    assert zero["signatures"] == []
    assert zero["header"]["proposer"] == genesis["consortium"]
    assert zero["header"]["time_ms"] == genesis["time_ms"]
    for block in blocks[1:]:
        height = block["header"]["height"]
        # The certificate counts the members before the block's transactions.
        auditor.voters[height] = list(auditor.members)
        for tx in block["txs"]:
            auditor.apply(tx)
        voters = auditor.voters[height]
        certified = signers(voters, block["signatures"], bytes.fromhex(block["hash"]))
        assert len(certified) >= quorum(len(voters))
        assert block["header"]["proposer"] == genesis["consortium"]
    return auditor, blocks


def test_every_block_hash_root_and_certificate(
    audited: tuple[Auditor, list[dict[str, Any]]],
) -> None:
    auditor, blocks = audited
    assert [m["id"] for m in auditor.members] == ["hosp-a", "hosp-b", "hosp-d"]
    # hosp-d joined in block 2: it did not vote on block 2, it did on block 3.
    assert [m["id"] for m in auditor.voters[2]] == ["hosp-a", "hosp-b", "hosp-c"]
    assert [m["id"] for m in auditor.voters[3]] == ["hosp-a", "hosp-b", "hosp-c", "hosp-d"]
    assert len(blocks) == 5


def test_the_anchors_are_the_private_chain(audited: tuple[Auditor, list[dict[str, Any]]]) -> None:
    _, blocks = audited
    private = lines("private-hosp-a.jsonl")
    check_chain_structure(private, "private:hosp-a")
    genesis_tx = private[0]["txs"][0]
    assert genesis_tx["type"] == "chain.genesis"
    key = genesis_tx["body"]["signing_key"]
    for block in private:
        (sig,) = block["signatures"]
        assert valid(key, sig, bytes.fromhex(block["hash"]))
    anchors = [tx["body"] for b in blocks for tx in b["txs"] if tx["type"] == "anchor"]
    assert [a["height"] for a in anchors] == [1, 3]
    for body in anchors:
        header = private[body["height"]]["header"]
        assert private[body["height"]]["hash"] == body["block_hash"]
        assert (header["log_size"], header["log_root"]) == (body["log_size"], body["log_root"])


def test_the_evidence_record_proves_an_equivocation(
    audited: tuple[Auditor, list[dict[str, Any]]],
) -> None:
    auditor, blocks = audited
    (record,) = lines("evidence.jsonl")
    first, second = record["votes"]
    member = next(m for m in auditor.voters[record["height"]] if m["id"] == record["member"])
    hashes_ = []
    for vote in (first, second):
        header = vote["header"]
        assert header["chain"] == blocks[0]["header"]["chain"]
        assert header["height"] == record["height"]
        block_hash = sha(canon(header))
        assert valid(member["signing_key"], vote["signature"], block_hash)
        hashes_.append(block_hash)
    assert hashes_[0] != hashes_[1]
    # Its vote for the real block is in that block's certificate (it was counted
    # before the second vote showed the equivocation).
    real = blocks[record["height"]]
    assert first["header"] == real["header"]
    assert fingerprint(member["signing_key"]) in {s["signer"] for s in real["signatures"]}


def _documented() -> dict[str, str]:
    text = FORMATS.read_text()
    section = text[text.index("## Worked example: a golden consortium") :]
    block = re.search(r"```text\n(.*?)```", section, re.S)
    assert block is not None
    return dict(line.split(" = ", 1) for line in block.group(1).splitlines() if " = " in line)


def test_formats_md_prints_these_values(audited: tuple[Auditor, list[dict[str, Any]]]) -> None:
    _, blocks = audited
    doc = _documented()
    genesis = json.loads((GOLDEN / "genesis.json").read_text())
    assert doc["genesis hash"] == sha(canon(genesis)).hex()
    assert doc["consortium block 0 header"] == canon(blocks[0]["header"]).decode()
    for block in blocks:
        assert doc[f"consortium block {block['header']['height']} hash"] == block["hash"]
    assert doc["consortium block 4 log_root"] == blocks[4]["header"]["log_root"]
    assert (
        doc["consortium block 1 first certificate signature"] == blocks[1]["signatures"][0]["sig"]
    )
    assert doc["private block 3 hash"] == lines("private-hosp-a.jsonl")[3]["hash"]
    anchor = blocks[3]["txs"][0]["body"]
    assert doc["anchor 2 proof"] == ",".join(anchor["proof"])
    (record,) = lines("evidence.jsonl")
    assert doc["evidence second header hash"] == sha(canon(record["votes"][1]["header"])).hex()
