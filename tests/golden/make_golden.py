"""Generator of ``tests/golden/format.json``: run once, by hand, then frozen.

    PYTHONPATH=src python tests/golden/make_golden.py > tests/golden/format.json

The golden fixture pins medledger's fixed byte formats (docs/formats.md) to
concrete hex: a tiny private chain (genesis + 3 blocks) written by the real
sequencer with fixed keys and a fixed clock, a consortium chain (genesis block
0 and one block carrying an ``anchor`` and its finality certificate), the
keyed pseudonym / record-reference HMACs, a record envelope (AES-256-GCM
AAD and a ciphertext), and signed messages (enrollment message, consent grant,
peer request, HPKE share info). ``tests/core/test_golden_format.py`` checks every value
against the production code *and* against independent code written from
docs/formats.md; it never calls this script. Regenerating the file is a format
change: it needs a new format version, not a silent refresh.

All keys are test constants (never used anywhere else); the FHIR resources
are synthetic.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from medledger.core.consent import grant_tx
from medledger.core.consortium import ConsortiumParams, Genesis, Member, quorum
from medledger.core.encoding import canonical_bytes
from medledger.core.enrollment import enrollment_message
from medledger.core.envelope import RecordContext, seal_record
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.core.merkle import CompactRange, leaf_hash
from medledger.core.models import BlockHeader, Transaction
from medledger.core.peer import PeerRequest, share_info
from medledger.ledger.consortium.member import genesis_block
from medledger.ledger.private import PrivateChain, SequencerConfig
from medledger.storage.sqlite.chain import SqliteChainStore

#: P-256 private scalars (hex) of the fixture's keys. Test constants only.
INSTITUTION_SCALAR = "4c0ce3d1f21b5c63a58a3e1e1b6c2f0d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c"
MEMBER_B_SCALAR = "1d2c3b4a5968778695a4b3c2d1e0f1e2d3c4b5a69788796a5b4c3d2e1f0e1d2c"
#: The patient's wallet key (signs the enrollment message and the consent grant).
PATIENT_SCALAR = "7e57a11ce0ffee00d0c70fa11ce5ba5e0000000000000000000000000000c0de"
PEER_NONCE = "00112233445566778899aabbccddeeff"
SEARCH_KEY = bytes(range(0x40, 0x60))
DEK = bytes(range(0xA0, 0xC0))
NONCE = bytes.fromhex("000102030405060708090a0b")
INSTITUTION = "hosp-a"
CHAIN = f"private:{INSTITUTION}"
#: Genesis at 2026-01-01T00:00:00Z; each block one second later.
T0 = 1_767_225_600_000
PATIENT_RESOURCE = {
    "resourceType": "Patient",
    "id": "golden-1",
    "meta": {"versionId": "1", "lastUpdated": "2026-01-01T00:00:01.000Z"},
    "active": True,
}


def key_of(scalar_hex: str) -> SigningKey:
    return SigningKey(ec.derive_private_key(int(scalar_hex, 16), ec.SECP256R1()))


def mac(label: str, text: str) -> str:
    return hmac.digest(SEARCH_KEY, f"{label}|{text}".encode(), "sha256").hex()


class FixedClock:
    def __init__(self) -> None:
        self.now = T0

    def now_ms(self) -> int:
        return self.now


def tx_json(tx: Transaction) -> dict[str, Any]:
    data = tx.encode()
    return {
        "canonical_hex": data.hex(),
        "hash": sha256(data).hex(),
        "leaf_hash": leaf_hash(data).hex(),
    }


def block_json(header_bytes: bytes, sigs: list[dict[str, str]], txs: list[bytes]) -> dict[str, Any]:
    return {
        "header": json.loads(header_bytes),
        "header_canonical_hex": header_bytes.hex(),
        "hash": sha256(header_bytes).hex(),
        "signatures": sigs,
        "txs": [tx_json(Transaction.decode(t)) for t in txs],
    }


async def private_chain(key: SigningKey, blocks: list[list[Transaction]]) -> list[dict[str, Any]]:
    clock = FixedClock()
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteChainStore.create(Path(tmp) / "chain.db", CHAIN)
        chain = PrivateChain.create(
            store,
            key,
            chain_id=CHAIN,
            institution=INSTITUTION,
            name="Golden Hospital A",
            config=SequencerConfig(),
            clock=clock,
        )
        for n, txs in enumerate(blocks, start=1):
            clock.now = T0 + 1000 * n
            await chain.submit_many(txs)
        await chain.close()
        out = [
            block_json(b.header_bytes, [s.to_json() for s in b.signatures], list(b.tx_data))
            for b in store.iter_blocks()
        ]
        store.close()
    return out


def signed_messages(genesis: Genesis, pseudonym: str, blob_hash: bytes) -> dict[str, Any]:
    """Enrollment message, consent grant, peer request and HPKE share info, signed."""
    patient, reader = key_of(PATIENT_SCALAR), key_of(MEMBER_B_SCALAR)
    enroll = enrollment_message(INSTITUTION, pseudonym)
    grant = grant_tx(
        patient,
        chain=genesis.chain_id,
        grantee="hosp-b",
        scope=["Patient", "Observation"],
        purpose="TREAT",
        expires_ms=T0 + 86_400_000,
        time_ms=T0 + 4000,
    )
    request = PeerRequest(
        op="fetch",
        reader="hosp-b",
        holder=INSTITUTION,
        consent=grant.hash().hex(),
        resource="Patient/golden-1",
        nonce=PEER_NONCE,
        time_ms=T0 + 5000,
    )
    return {
        "patient_scalar": PATIENT_SCALAR,
        "patient_spki_der": patient.public.der().hex(),
        "patient_fingerprint": patient.fingerprint,
        "enrollment": {
            "institution": INSTITUTION,
            "pseudonym": pseudonym,
            "message_hex": enroll.hex(),
            "signature": patient.sign(enroll).to_json(),
        },
        "consent_grant": tx_json(grant),
        "peer_request": {
            "request": request.to_json(),
            "signing_bytes_hex": request.signing_bytes().hex(),
            "hash": request.hash().hex(),
            "signature": request.sign(reader).signature.to_json(),
        },
        "share_info_hex": share_info(INSTITUTION, "hosp-b", blob_hash, request.hash()).hex(),
    }


def main() -> None:
    key_a, key_b = key_of(INSTITUTION_SCALAR), key_of(MEMBER_B_SCALAR)
    context = RecordContext(
        institution=INSTITUTION, resource_type="Patient", id="golden-1", version=1
    )
    plaintext = canonical_bytes(PATIENT_RESOURCE)
    blob = seal_record(DEK, NONCE, plaintext, context)
    pseudonym = mac("pseudonym", "Patient/golden-1")
    patient_ref = mac("record", "Patient/golden-1")
    obs_ref = mac("record", "Observation/golden-obs-1")
    obs_blob = sha256(b"golden observation ciphertext placeholder").hex()

    def private_tx(tx_type: str, body: dict[str, Any], at: int) -> Transaction:
        return Transaction(type=tx_type, chain=CHAIN, body=body, time_ms=T0 + at)

    blocks = [
        [
            private_tx(
                "record.put",
                {
                    "resource_type": "Patient",
                    "ref": patient_ref,
                    "version": 1,
                    "blob": sha256(blob).hex(),
                    "patient": pseudonym,
                },
                1000,
            )
        ],
        [
            private_tx(
                "record.put",
                {
                    "resource_type": "Observation",
                    "ref": obs_ref,
                    "version": 1,
                    "blob": obs_blob,
                    "patient": pseudonym,
                },
                1900,
            ),
            private_tx(
                "key.rotate",
                {
                    "purpose": "kek",
                    "old": "00000000000000aa",
                    "new": "00000000000000bb",
                    "rewrapped": 2,
                },
                1950,
            ),
        ],
        [
            private_tx(
                "access",
                {
                    "reader": INSTITUTION,
                    "holder": INSTITUTION,
                    "patient": pseudonym,
                    "consent": "",
                    "resource": f"Observation:{obs_ref}",
                    "outcome": "allowed",
                    "reason": "",
                    "actor": "clinician:golden",
                    "request": "",
                },
                2950,
            )
        ],
    ]
    private = asyncio.run(private_chain(key_a, blocks))
    head = private[-1]["header"]

    genesis = Genesis(
        consortium="golden",
        time_ms=T0,
        members=(
            Member(id=INSTITUTION, name="Golden Hospital A", signing_key=key_a.public),
            Member(id="hosp-b", name="Golden Hospital B", signing_key=key_b.public),
        ),
        params=ConsortiumParams(),
    )
    g0 = genesis_block(genesis)
    unsigned = Transaction(
        type="anchor",
        chain=genesis.chain_id,
        body={
            "institution": INSTITUTION,
            "height": head["height"],
            "log_size": head["log_size"],
            "log_root": head["log_root"],
            "block_hash": private[-1]["hash"],
            "prev_size": 0,
            "proof": [],
        },
        time_ms=T0 + 3100,
    )
    anchor = Transaction(
        type=unsigned.type,
        chain=unsigned.chain,
        body=unsigned.body,
        time_ms=unsigned.time_ms,
        signatures=(key_a.sign(unsigned.signing_bytes()),),
    )
    log = CompactRange()
    log.append(leaf_hash(g0.tx_data[0]))
    block_log = CompactRange()
    log.append(leaf_hash(anchor.encode()))
    block_log.append(leaf_hash(anchor.encode()))
    header1 = BlockHeader(
        chain=genesis.chain_id,
        height=1,
        prev_hash=g0.block_hash,
        tx_root=block_log.root(),
        tx_count=1,
        log_size=log.size,
        log_root=log.root(),
        time_ms=T0 + 3200,
        proposer=genesis.consortium,
    )
    h1 = header1.encode()
    assert quorum(len(genesis.members)) == 2
    certificate = [k.sign(sha256(h1)).to_json() for k in (key_a, key_b)]
    consortium = [
        block_json(g0.header_bytes, [], list(g0.tx_data)),
        block_json(h1, certificate, [anchor.encode()]),
    ]

    messages = signed_messages(genesis, pseudonym, sha256(blob))

    fixture = {
        "messages": messages,
        "about": (
            "medledger golden format fixture, made once by tests/golden/make_golden.py; "
            "checked by tests/core/test_golden_format.py against docs/formats.md. "
            "Keys are test constants; resources are synthetic."
        ),
        "keys": {
            "institution_scalar": INSTITUTION_SCALAR,
            "institution_spki_der": key_a.public.der().hex(),
            "institution_fingerprint": key_a.fingerprint,
            "member_b_scalar": MEMBER_B_SCALAR,
            "member_b_spki_der": key_b.public.der().hex(),
            "member_b_fingerprint": key_b.fingerprint,
            "search_key": SEARCH_KEY.hex(),
        },
        "hmacs": [
            {"label": "pseudonym", "text": "Patient/golden-1", "hmac": pseudonym},
            {"label": "record", "text": "Patient/golden-1", "hmac": patient_ref},
            {"label": "record", "text": "Observation/golden-obs-1", "hmac": obs_ref},
        ],
        "envelope": {
            "context": {
                "institution": context.institution,
                "resource_type": context.resource_type,
                "id": context.id,
                "version": context.version,
            },
            "aad_hex": context.aad().hex(),
            "dek": DEK.hex(),
            "nonce": NONCE.hex(),
            "plaintext_hex": plaintext.hex(),
            "blob_hex": blob.hex(),
            "blob_sha256": sha256(blob).hex(),
        },
        "private_chain": {"chain": CHAIN, "blocks": private},
        "consortium_chain": {
            "genesis": genesis.to_json(),
            "blocks": consortium,
        },
    }
    json.dump(fixture, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
