"""Generator of the golden consortium in ``tests/golden/consortium/``: run by hand, then frozen.

    PYTHONPATH=src python tests/golden/make_golden_consortium.py

Writes a small consortium an auditor can re-verify from docs/formats.md alone:

* ``genesis.json`` — consortium ``golden-audit``, founders hosp-a, hosp-b, hosp-c;
* ``consortium.jsonl`` — its export (``consortium export``): block 0 the genesis;
  block 1 hosp-a's first anchor and an ``access.batch`` of hosp-b; block 2 the
  ``member.add`` of hosp-d and, after it in the same block, an ``access.batch``
  of hosp-d (it already is a member); block 3 hosp-a's second anchor (with its
  consistency proof) and the ``member.remove`` of hosp-c; block 4 a
  ``consent.grant`` to hosp-d — each block under its finality certificate;
* ``private-hosp-a.jsonl`` — hosp-a's private chain (``chain export``), which
  the anchors commit to;
* ``evidence.jsonl`` — one equivocation record: hosp-b signed block 3 and a
  second header at height 3.

Everything is deterministic (fixed keys, fixed times, RFC 6979 signatures), so
running this again writes the same bytes; changing them is a format change.
``tests/core/test_golden_consortium.py`` re-derives every hash, root and
signature check from docs/formats.md's rules without medledger's code, and
prints nothing from here. The lines for formats.md's worked example are
printed on stdout. All keys are test constants.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from medledger.core.consent import grant_tx
from medledger.core.consortium import ConsortiumParams, Genesis, Member, quorum
from medledger.core.encoding import canonical_bytes
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.merkle import CompactRange, consistency_ranges, leaf_hash, root_from_leaf_hashes
from medledger.core.models import BlockHeader, Signature, Transaction
from medledger.ledger.consortium.evidence import Evidence
from medledger.ledger.consortium.member import genesis_block

OUT = Path(__file__).parent / "consortium"
#: 2026-01-01T00:00:00Z.
T0 = 1_767_225_600_000
CONSORTIUM = "golden-audit"
CHAIN = f"consortium:{CONSORTIUM}"
PRIVATE = "private:hosp-a"
#: P-256 private scalars of the members and the patient. Test constants only.
SCALARS = {
    "hosp-a": "4c0ce3d1f21b5c63a58a3e1e1b6c2f0d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c",
    "hosp-b": "1d2c3b4a5968778695a4b3c2d1e0f1e2d3c4b5a69788796a5b4c3d2e1f0e1d2c",
    "hosp-c": "2e3d4c5b6a7988a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3",
    "hosp-d": "3f4e5d6c7b8a99b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4",
}
PATIENT_SCALAR = "7e57a11ce0ffee00d0c70fa11ce5ba5e0000000000000000000000000000c0de"


def key_of(scalar_hex: str) -> SigningKey:
    return SigningKey(ec.derive_private_key(int(scalar_hex, 16), ec.SECP256R1()))


KEYS = {mid: key_of(s) for mid, s in SCALARS.items()}


def signed(tx: Transaction, *signers: str) -> Transaction:
    return Transaction(
        type=tx.type,
        chain=tx.chain,
        body=tx.body,
        time_ms=tx.time_ms,
        signatures=tuple(KEYS[s].sign(tx.signing_bytes()) for s in signers),
    )


def line(header: BlockHeader, sigs: list[Signature], txs: list[Transaction]) -> bytes:
    block = {
        "header": header.to_json(),
        "hash": header.hash().hex(),
        "signatures": [s.to_json() for s in sigs],
        "txs": [t.to_json() for t in txs],
    }
    return canonical_bytes(block) + b"\n"


class Chain:
    """Blocks of one chain built by hand with the fixed formats (header, roots, log)."""

    def __init__(self, chain: str, proposer: str, first: Transaction, time_ms: int) -> None:
        self.chain, self.proposer = chain, proposer
        self.log = CompactRange()
        self.leaves: list[bytes] = []
        self.headers: list[BlockHeader] = []
        self.lines: list[bytes] = []
        self.prev = b"\x00" * 32
        self.block([first], time_ms, lambda h: [])

    def block(self, txs: list[Transaction], time_ms: int, certify: Any) -> BlockHeader:
        block_log = CompactRange()
        for tx in txs:
            leaf = leaf_hash(tx.encode())
            block_log.append(leaf)
            self.log.append(leaf)
            self.leaves.append(leaf)
        header = BlockHeader(
            chain=self.chain,
            height=len(self.headers),
            prev_hash=self.prev,
            tx_root=block_log.root(),
            tx_count=len(txs),
            log_size=self.log.size,
            log_root=self.log.root(),
            time_ms=time_ms,
            proposer=self.proposer,
        )
        self.headers.append(header)
        self.lines.append(line(header, certify(header), txs))
        self.prev = header.hash()
        return header

    def consistency(self, old: int, new: int) -> list[str]:
        ranges = consistency_ranges(old, new)
        return [root_from_leaf_hashes(self.leaves[b:e]).hex() for b, e in ranges]


def certificate(*signers: str) -> Any:
    return lambda header: [KEYS[s].sign(header.hash()) for s in signers]


def member(mid: str) -> Member:
    return Member(id=mid, name=f"Golden {mid}", signing_key=KEYS[mid].public)


def private_chain() -> Chain:
    key = KEYS["hosp-a"]
    genesis = Transaction(
        type="chain.genesis",
        chain=PRIVATE,
        body={
            "institution": "hosp-a",
            "name": "Golden hosp-a",
            "signing_key": key.public.der().hex(),
            "signing_fingerprint": key.fingerprint,
        },
        time_ms=T0,
    )
    chain = Chain(PRIVATE, "hosp-a", genesis, T0)
    chain.lines[0] = line(chain.headers[0], [key.sign(chain.headers[0].hash())], [genesis])
    for height, count in ((1, 1), (2, 2), (3, 3)):
        txs = [
            Transaction(
                type="record.put",
                chain=PRIVATE,
                body={
                    "resource_type": "Observation",
                    "ref": sha256(f"ref {height}.{i}".encode()).hex(),
                    "version": 1,
                    "blob": sha256(f"blob {height}.{i}".encode()).hex(),
                    "patient": sha256(f"pseudonym {i}".encode()).hex(),
                },
                time_ms=T0 + 500 * height + i,
            )
            for i in range(count)
        ]
        chain.block(txs, T0 + 500 * height + count, lambda h: [key.sign(h.hash())])
    return chain


def anchor(private: Chain, height: int, prev_size: int, time_ms: int) -> Transaction:
    header = private.headers[height]
    body = {
        "institution": "hosp-a",
        "height": height,
        "log_size": header.log_size,
        "log_root": header.log_root.hex(),
        "block_hash": header.hash().hex(),
        "prev_size": prev_size,
        "proof": private.consistency(prev_size, header.log_size) if prev_size else [],
    }
    return signed(Transaction(type="anchor", chain=CHAIN, body=body, time_ms=time_ms), "hosp-a")


def access_batch(holder: str, entries: list[dict[str, str]], time_ms: int) -> Transaction:
    tx = Transaction(
        type="access.batch",
        chain=CHAIN,
        body={"holder": holder, "entries": entries},
        time_ms=time_ms,
    )
    return signed(tx, holder)


def main() -> None:
    genesis = Genesis(
        consortium=CONSORTIUM,
        time_ms=T0,
        members=(member("hosp-a"), member("hosp-b"), member("hosp-c")),
        # The parameters as the frozen document wrote them (before anchor_round_cut).
        params=ConsortiumParams.from_json(
            {
                "max_block_txs": 500,
                "max_block_bytes": 1048576,
                "cut_after_ms": 20,
                "anchor_interval_ms": 200,
                "max_clock_skew_ms": 30000,
            }
        ),
    )
    g0 = genesis_block(genesis)
    chain = Chain(CHAIN, CONSORTIUM, Transaction.decode(g0.tx_data[0]), T0)
    assert chain.headers[0].hash() == g0.block_hash
    private = private_chain()
    assert quorum(3) == 2 and quorum(4) == 3

    # Block 1: voters a, b, c (quorum 2).
    chain.block(
        [
            anchor(private, 1, 0, T0 + 1000),
            access_batch(
                "hosp-b",
                [
                    {
                        "reader": "hosp-c",
                        "patient": "",
                        "consent": "",
                        "resource": "list",
                        "outcome": "refused",
                    },
                    {
                        "reader": "hosp-a",
                        "patient": KEYS["hosp-a"].fingerprint,
                        "consent": "00" * 32,
                        "resource": "Observation:" + sha256(b"obs").hex(),
                        "outcome": "allowed",
                    },
                ],
                T0 + 1001,
            ),
        ],
        T0 + 1100,
        certificate("hosp-a", "hosp-b"),
    )
    # Block 2: hosp-d is added (signed by a quorum of a, b, c); its own access.batch
    # after the add in the same block is valid. The certificate counts the voters
    # before the block: a, b, c (quorum 2) — not hosp-d.
    add = Transaction(
        type="member.add",
        chain=CHAIN,
        body={"member": member("hosp-d").to_json()},
        time_ms=T0 + 2000,
    )
    chain.block(
        [
            signed(add, "hosp-a", "hosp-b"),
            access_batch(
                "hosp-d",
                [
                    {
                        "reader": "hosp-b",
                        "patient": KEYS["hosp-b"].fingerprint,
                        "consent": "",
                        "resource": "Patient:" + sha256(b"pat").hex(),
                        "outcome": "refused",
                    }
                ],
                T0 + 2001,
            ),
        ],
        T0 + 2100,
        certificate("hosp-a", "hosp-c"),
    )
    # Block 3: voters a, b, c, d (quorum 3); hosp-a anchors again (consistency proof
    # from size 2 to 7) and hosp-c is removed by a quorum of the four.
    remove = Transaction(
        type="member.remove", chain=CHAIN, body={"id": "hosp-c"}, time_ms=T0 + 3001
    )
    block3 = chain.block(
        [anchor(private, 3, 2, T0 + 3000), signed(remove, "hosp-a", "hosp-b", "hosp-d")],
        T0 + 3100,
        certificate("hosp-a", "hosp-b", "hosp-d"),
    )
    # Block 4: voters a, b, d (quorum 2): a patient's consent to hosp-d.
    grant = grant_tx(
        key_of(PATIENT_SCALAR),
        chain=CHAIN,
        grantee="hosp-d",
        scope=["Observation"],
        purpose="TREAT",
        expires_ms=T0 + 86_400_000,
        time_ms=T0 + 4000,
    )
    chain.block([grant], T0 + 4100, certificate("hosp-b", "hosp-d"))

    # hosp-b also signed a second header at height 3.
    twin = BlockHeader.from_json({**block3.to_json(), "time_ms": block3.time_ms + 1})
    evidence = Evidence(
        member="hosp-b",
        height=3,
        first_header=block3,
        first=KEYS["hosp-b"].sign(block3.hash()),
        second_header=twin,
        second=KEYS["hosp-b"].sign(twin.hash()),
    )

    OUT.mkdir(exist_ok=True)
    (OUT / "genesis.json").write_bytes(canonical_bytes(genesis.to_json()) + b"\n")
    (OUT / "consortium.jsonl").write_bytes(b"".join(chain.lines))
    (OUT / "private-hosp-a.jsonl").write_bytes(b"".join(private.lines))
    (OUT / "evidence.jsonl").write_bytes(canonical_bytes(evidence.to_json()) + b"\n")

    out = sys.stdout
    out.write(f"genesis hash = {genesis.hash().hex()}\n")
    out.write(f"consortium block 0 header = {chain.headers[0].encode().decode()}\n")
    for h, header in enumerate(chain.headers):
        out.write(f"consortium block {h} hash = {header.hash().hex()}\n")
    out.write(f"consortium block 4 log_root = {chain.headers[4].log_root.hex()}\n")
    sig = json.loads(chain.lines[1])["signatures"][0]
    out.write(f"consortium block 1 first certificate signature = {sig['sig']}\n")
    out.write(f"private block 3 hash = {private.headers[3].hash().hex()}\n")
    out.write(f"anchor 2 proof = {','.join(private.consistency(2, 7))}\n")
    out.write(f"evidence second header hash = {twin.hash().hex()}\n")


if __name__ == "__main__":
    main()
