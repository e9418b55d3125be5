"""The frozen golden fixture (``tests/golden/format.json``) against code and docs.

The fixture holds a tiny private chain (genesis + 3 blocks: ``record.put``,
``record.put`` + ``key.rotate``, ``access``), a consortium chain (genesis block
0 without certificate, block 1 with a signed ``anchor`` and a two-member
finality certificate), keyed pseudonym / record-reference HMACs, a record
envelope, and the signed messages around them (a patient's enrollment
message, a consent grant, a peer request and the HPKE share info), all as
hex. It was made once by ``tests/golden/make_golden.py``; nothing here
regenerates it (new sections may be added; existing values never change).

Every value is re-derived twice: with medledger's production code (down to
re-running the real sequencer with the fixture's keys and clock, and the
chain verifier), and with a few lines of independent code written from
docs/formats.md using only ``hashlib``, ``hmac``, ``json`` and
``cryptography``. A drift of the code, of the doc's worked example, or of the
fixture fails a test. Block signatures are deterministic ECDSA (RFC 6979), so
they are both verified and reproduced byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medledger.core.consent import grant_tx
from medledger.core.consortium import Genesis, quorum
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.enrollment import enrollment_message
from medledger.core.envelope import RecordContext, open_record, seal_record
from medledger.core.errors import NotFound
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey, VerifyingKey
from medledger.core.merkle import CompactRange, leaf_hash, root_from_leaf_hashes
from medledger.core.models import BlockHeader, Signature, Transaction
from medledger.core.peer import PeerRequest, share_info
from medledger.ledger.consortium.member import genesis_block
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.private import PrivateChain
from medledger.ledger.verify import verify_chain
from medledger.services.keys import InstitutionKeys
from medledger.storage.ports import NewBlock
from medledger.storage.sqlite.chain import SqliteChainStore

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "format.json").read_text(encoding="utf-8"))
FORMATS_MD = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
KEYS = GOLDEN["keys"]
PRIVATE = GOLDEN["private_chain"]["blocks"]
CONSORTIUM = GOLDEN["consortium_chain"]["blocks"]


# ---------------------------------------------------------------------------
# Independent reference code, written from docs/formats.md alone
# ---------------------------------------------------------------------------


def ref_canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def ref_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def ref_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash over leaf hashes (split at the largest power of two < n)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + ref_root(leaves[:k]) + ref_root(leaves[k:])).digest()


def ref_public_key(spki_hex: str) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(bytes.fromhex(spki_hex))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def ref_verify(spki_hex: str, signature: dict[str, str], message: bytes) -> None:
    """ECDSA P-256 / SHA-256 over ``message``; raises if the signature does not verify."""
    assert signature["alg"] == "ecdsa-p256-sha256"
    assert signature["signer"] == hashlib.sha256(bytes.fromhex(spki_hex)).hexdigest()
    ref_public_key(spki_hex).verify(
        bytes.fromhex(signature["sig"]), message, ec.ECDSA(hashes.SHA256())
    )


def spki_of(signer: str) -> str:
    by_fingerprint = {
        KEYS["institution_fingerprint"]: KEYS["institution_spki_der"],
        KEYS["member_b_fingerprint"]: KEYS["member_b_spki_der"],
    }
    return by_fingerprint[signer]


def signing_key(scalar: str) -> SigningKey:
    return SigningKey(ec.derive_private_key(int(scalar, 16), ec.SECP256R1()))


def tx_bytes(block: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(t["canonical_hex"]) for t in block["txs"]]


# ---------------------------------------------------------------------------
# Keys and fingerprints
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["institution", "member_b"])
def test_fixed_keys_give_the_frozen_public_keys_and_fingerprints(who: str) -> None:
    key = signing_key(KEYS[f"{who}_scalar"])
    spki = ec.derive_private_key(int(KEYS[f"{who}_scalar"], 16), ec.SECP256R1()).public_key()
    der = spki.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert der.hex() == KEYS[f"{who}_spki_der"] == key.public.der().hex()
    assert hashlib.sha256(der).hexdigest() == KEYS[f"{who}_fingerprint"] == key.fingerprint


# ---------------------------------------------------------------------------
# Transactions, Merkle roots, headers, block hashes
# ---------------------------------------------------------------------------

ALL_BLOCKS = [("private", b) for b in PRIVATE] + [("consortium", b) for b in CONSORTIUM]
BLOCK_IDS = [f"{chain}-{b['header']['height']}" for chain, b in ALL_BLOCKS]


@pytest.mark.parametrize(("chain", "block"), ALL_BLOCKS, ids=BLOCK_IDS)
def test_transactions_are_canonical_and_hash_as_documented(
    chain: str, block: dict[str, Any]
) -> None:
    for entry in block["txs"]:
        data = bytes.fromhex(entry["canonical_hex"])
        value = json.loads(data)
        # Independent: canonical JSON, SHA-256, RFC 6962 leaf.
        assert ref_canonical(value) == data
        assert set(value) <= {"type", "chain", "body", "time_ms", "signatures"}
        assert value["chain"] == block["header"]["chain"]
        assert ref_hash(data).hex() == entry["hash"]
        assert ref_leaf(data).hex() == entry["leaf_hash"]
        # Production: the same bytes parse, re-encode and hash identically.
        assert canonical_bytes(parse_canonical(data)) == data
        tx = Transaction.decode(data)
        assert Transaction.from_json(value).encode() == data
        assert tx.hash().hex() == entry["hash"]
        assert leaf_hash(data).hex() == entry["leaf_hash"]


@pytest.mark.parametrize("blocks", [PRIVATE, CONSORTIUM], ids=["private", "consortium"])
def test_headers_merkle_roots_and_block_hashes(blocks: list[dict[str, Any]]) -> None:
    log: list[bytes] = []
    prev_hash = "00" * 32
    for height, block in enumerate(blocks):
        header = block["header"]
        leaves = [bytes.fromhex(t["leaf_hash"]) for t in block["txs"]]
        log += leaves
        header_bytes = bytes.fromhex(block["header_canonical_hex"])
        # Independent code, from the doc's header definition.
        assert set(header) == {
            "chain",
            "height",
            "prev_hash",
            "tx_root",
            "tx_count",
            "log_size",
            "log_root",
            "time_ms",
            "proposer",
        }
        assert ref_canonical(header) == header_bytes
        assert header["height"] == height
        assert header["prev_hash"] == prev_hash
        assert header["tx_count"] == len(leaves)
        assert header["tx_root"] == ref_root(leaves).hex()
        assert header["log_size"] == len(log)
        assert header["log_root"] == ref_root(log).hex()
        assert ref_hash(header_bytes).hex() == block["hash"]
        # Production code.
        parsed = BlockHeader.decode(header_bytes)
        assert parsed.encode() == header_bytes
        assert parsed.hash().hex() == block["hash"]
        assert root_from_leaf_hashes(leaves).hex() == header["tx_root"]
        assert root_from_leaf_hashes(log).hex() == header["log_root"]
        prev_hash = block["hash"]
    # The fixture exercises more than the trivial trees: a two-leaf block and an
    # unbalanced five-leaf log (split at 4).
    if blocks is PRIVATE:
        assert [b["header"]["log_size"] for b in PRIVATE] == [1, 2, 4, 5]


def test_private_chain_ids_and_genesis_name_the_institution_key() -> None:
    genesis = json.loads(tx_bytes(PRIVATE[0])[0])
    assert genesis["type"] == "chain.genesis"
    assert genesis["chain"] == "private:" + genesis["body"]["institution"]
    assert genesis["body"]["signing_key"] == KEYS["institution_spki_der"]
    assert genesis["body"]["signing_fingerprint"] == KEYS["institution_fingerprint"]
    assert all(b["header"]["chain"] == genesis["chain"] for b in PRIVATE)


# ---------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("chain", "block"), ALL_BLOCKS, ids=BLOCK_IDS)
def test_block_signatures_verify_over_the_raw_block_hash_and_are_deterministic(
    chain: str, block: dict[str, Any]
) -> None:
    block_hash = bytes.fromhex(block["hash"])
    scalars = {
        KEYS["institution_fingerprint"]: KEYS["institution_scalar"],
        KEYS["member_b_fingerprint"]: KEYS["member_b_scalar"],
    }
    for sig in block["signatures"]:
        ref_verify(spki_of(sig["signer"]), sig, block_hash)
        VerifyingKey.from_der(bytes.fromhex(spki_of(sig["signer"]))).verify(
            Signature.from_json(sig), block_hash
        )
        # RFC 6979: the production signer reproduces the frozen bytes.
        assert signing_key(scalars[sig["signer"]]).sign(block_hash).to_json() == sig
    if chain == "private":
        assert [s["signer"] for s in block["signatures"]] == [KEYS["institution_fingerprint"]]


def test_a_flipped_bit_in_a_frozen_signature_does_not_verify() -> None:
    """The signature check above can fail: one altered byte of a block hash is refused."""
    block = PRIVATE[1]
    wrong = bytearray.fromhex(block["hash"])
    wrong[0] ^= 1
    with pytest.raises(InvalidSignature):
        ref_verify(KEYS["institution_spki_der"], block["signatures"][0], bytes(wrong))


def test_anchor_transaction_is_signed_by_its_institution_over_the_unsigned_bytes() -> None:
    anchor = json.loads(tx_bytes(CONSORTIUM[1])[0])
    assert anchor["type"] == "anchor"
    unsigned = {k: v for k, v in anchor.items() if k != "signatures"}
    (sig,) = anchor["signatures"]
    assert sig["signer"] == KEYS["institution_fingerprint"]
    ref_verify(KEYS["institution_spki_der"], sig, ref_canonical(unsigned))
    tx = Transaction.from_json(anchor)
    assert tx.signing_bytes() == ref_canonical(unsigned)
    assert signing_key(KEYS["institution_scalar"]).sign(tx.signing_bytes()).to_json() == sig
    # It anchors the private chain's head: size, root and block hash.
    head = PRIVATE[-1]
    assert anchor["body"] == {
        "institution": "hosp-a",
        "height": head["header"]["height"],
        "log_size": head["header"]["log_size"],
        "log_root": head["header"]["log_root"],
        "block_hash": head["hash"],
        "prev_size": 0,
        "proof": [],
    }


def test_consortium_genesis_and_finality_certificate() -> None:
    genesis = GOLDEN["consortium_chain"]["genesis"]
    g0, b1 = CONSORTIUM
    assert g0["signatures"] == []
    (tx,) = [json.loads(d) for d in tx_bytes(g0)]
    assert tx["type"] == "consortium.genesis"
    assert tx["chain"] == "consortium:" + genesis["consortium"]
    assert tx["body"] == genesis
    n = len(genesis["members"])
    f = (n - 1) // 3
    assert len({s["signer"] for s in b1["signatures"]}) >= (n + f) // 2 + 1 == quorum(n)
    fingerprints = {
        hashlib.sha256(bytes.fromhex(m["signing_key"])).hexdigest() for m in genesis["members"]
    }
    assert {s["signer"] for s in b1["signatures"]} <= fingerprints
    # Production: block 0 is exactly what a member builds from the genesis document.
    built = genesis_block(Genesis.from_json(genesis))
    assert built.header_bytes.hex() == g0["header_canonical_hex"]
    assert built.block_hash.hex() == g0["hash"]
    assert [d.hex() for d in built.tx_data] == [t["canonical_hex"] for t in g0["txs"]]


# ---------------------------------------------------------------------------
# Pseudonyms, record references, envelope
# ---------------------------------------------------------------------------


class _SearchKeyOnly:
    """The one keystore secret :class:`InstitutionKeys` reads: the fixed search key."""

    def secret(self, name: str) -> bytes:
        if name != "search_key":
            raise NotFound(f"no secret {name!r}")
        return bytes.fromhex(KEYS["search_key"])


@pytest.mark.parametrize("entry", GOLDEN["hmacs"], ids=lambda e: f"{e['label']}|{e['text']}")
def test_pseudonym_and_record_reference_hmacs(entry: dict[str, str]) -> None:
    key = bytes.fromhex(KEYS["search_key"])
    expected = hmac.new(key, f"{entry['label']}|{entry['text']}".encode(), hashlib.sha256)
    assert expected.hexdigest() == entry["hmac"]
    keys = InstitutionKeys(_SearchKeyOnly())  # type: ignore[arg-type]
    if entry["label"] == "pseudonym":
        assert keys.pseudonym(entry["text"]) == entry["hmac"]
    else:
        rtype, _, rid = entry["text"].partition("/")
        assert keys.record_ref(rtype, rid) == entry["hmac"]


def test_record_put_bodies_carry_the_keyed_names_and_the_blob_hash() -> None:
    hmacs = {(e["label"], e["text"]): e["hmac"] for e in GOLDEN["hmacs"]}
    (put,) = [json.loads(d) for d in tx_bytes(PRIVATE[1])]
    assert put["type"] == "record.put"
    assert put["body"] == {
        "resource_type": "Patient",
        "ref": hmacs[("record", "Patient/golden-1")],
        "version": 1,
        "blob": GOLDEN["envelope"]["blob_sha256"],
        "patient": hmacs[("pseudonym", "Patient/golden-1")],
    }
    types = [json.loads(d)["type"] for b in PRIVATE for d in tx_bytes(b)]
    assert types == ["chain.genesis", "record.put", "record.put", "key.rotate", "access"]


def test_envelope_aad_and_frozen_ciphertext() -> None:
    env = GOLDEN["envelope"]
    ctx = env["context"]
    aad = bytes.fromhex(env["aad_hex"])
    blob = bytes.fromhex(env["blob_hex"])
    dek, nonce = bytes.fromhex(env["dek"]), bytes.fromhex(env["nonce"])
    plaintext = bytes.fromhex(env["plaintext_hex"])
    # Independent: AAD = canonical {institution, resource_type, id, version};
    # blob = nonce || AES-256-GCM(dek, plaintext, aad); named by its SHA-256.
    assert ref_canonical(ctx) == aad
    assert set(ctx) == {"institution", "resource_type", "id", "version"}
    assert blob[:12] == nonce
    assert AESGCM(dek).decrypt(blob[:12], blob[12:], aad) == plaintext
    assert ref_hash(blob).hex() == env["blob_sha256"]
    # Production.
    context = RecordContext(**ctx)
    assert context.aad() == aad
    assert open_record(dek, blob, context) == plaintext
    assert seal_record(dek, nonce, plaintext, context) == blob


# ---------------------------------------------------------------------------
# The real sequencer and verifiers over the fixture
# ---------------------------------------------------------------------------


class _SetClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def now_ms(self) -> int:
        return self.now


def test_the_sequencer_writes_the_frozen_private_chain_and_the_verifier_accepts_it(
    tmp_path: Path,
) -> None:
    """Same keys, clock and transactions: the real sequencer writes the same bytes."""
    key = signing_key(KEYS["institution_scalar"])
    genesis = Transaction.decode(tx_bytes(PRIVATE[0])[0])
    clock = _SetClock(PRIVATE[0]["header"]["time_ms"])
    store = SqliteChainStore.create(tmp_path / "chain.db", genesis.chain)
    try:
        chain = PrivateChain.create(
            store,
            key,
            chain_id=genesis.chain,
            institution=genesis.body["institution"],
            name=genesis.body["name"],
            clock=clock,
        )

        async def write() -> None:
            for block in PRIVATE[1:]:
                clock.now = block["header"]["time_ms"]
                await chain.submit_many([Transaction.decode(d) for d in tx_bytes(block)])
            await chain.close()

        asyncio.run(write())
        stored = list(store.iter_blocks())
        assert [b.header_bytes.hex() for b in stored] == [
            b["header_canonical_hex"] for b in PRIVATE
        ]
        assert [b.block_hash.hex() for b in stored] == [b["hash"] for b in PRIVATE]
        assert [[s.to_json() for s in b.signatures] for b in stored] == [
            b["signatures"] for b in PRIVATE
        ]
        assert [[d.hex() for d in b.tx_data] for b in stored] == [
            [t["canonical_hex"] for t in b["txs"]] for b in PRIVATE
        ]
        report = verify_chain(store, expected_key=key.public)
        assert report.log_root.hex() == PRIVATE[-1]["header"]["log_root"]
        assert report.head_hash.hex() == PRIVATE[-1]["hash"]
    finally:
        store.close()


def test_the_consortium_verifier_accepts_the_frozen_consortium_chain(tmp_path: Path) -> None:
    genesis = Genesis.from_json(GOLDEN["consortium_chain"]["genesis"])
    store = SqliteChainStore.create(tmp_path / "consortium.db", genesis.chain_id)
    try:
        store.append_block(genesis_block(genesis))
        log = CompactRange()
        log.append(leaf_hash(tx_bytes(CONSORTIUM[0])[0]))
        block = CONSORTIUM[1]
        data = tx_bytes(block)
        nodes = [n for d in data for n in log.append(leaf_hash(d))[1:]]
        header_bytes = bytes.fromhex(block["header_canonical_hex"])
        store.append_block(
            NewBlock(
                header=BlockHeader.decode(header_bytes),
                header_bytes=header_bytes,
                block_hash=sha256(header_bytes),
                signatures=tuple(Signature.from_json(s) for s in block["signatures"]),
                first_index=1,
                tx_data=data,
                tx_hashes=[sha256(d) for d in data],
                nodes=nodes,
            )
        )
        report = verify_chain(store, policy=ConsortiumPolicy(genesis))
        assert report.head_hash.hex() == block["hash"]
        assert report.log_size == 2
    finally:
        store.close()


# ---------------------------------------------------------------------------
# The worked example in docs/formats.md
# ---------------------------------------------------------------------------

#: Names used in the doc's worked example -> the fixture value they must equal.
DOC_VALUES: dict[str, str] = {
    "institution P-256 private scalar": KEYS["institution_scalar"],
    "institution key fingerprint": KEYS["institution_fingerprint"],
    "search key": KEYS["search_key"],
    "pseudonym of Patient/golden-1": GOLDEN["hmacs"][0]["hmac"],
    "ref of Patient/golden-1": GOLDEN["hmacs"][1]["hmac"],
    "record AAD": GOLDEN["envelope"]["aad_hex"],
    "record blob SHA-256": GOLDEN["envelope"]["blob_sha256"],
    "block 1 record.put": bytes.fromhex(PRIVATE[1]["txs"][0]["canonical_hex"]).decode(),
    "block 1 record.put tx hash": PRIVATE[1]["txs"][0]["hash"],
    "block 1 record.put leaf hash": PRIVATE[1]["txs"][0]["leaf_hash"],
    "block 1 header": bytes.fromhex(PRIVATE[1]["header_canonical_hex"]).decode(),
    "block 1 hash": PRIVATE[1]["hash"],
    "block 1 signature": PRIVATE[1]["signatures"][0]["sig"],
    "block 2 tx_root": PRIVATE[2]["header"]["tx_root"],
    "block 3 log_root": PRIVATE[3]["header"]["log_root"],
    "consortium block 1 hash": CONSORTIUM[1]["hash"],
}


def doc_worked_example() -> dict[str, str]:
    """``name = value`` lines of the fenced block under "Worked example" in docs/formats.md."""
    section = FORMATS_MD.split("## Worked example", 1)
    assert len(section) == 2, "docs/formats.md has no '## Worked example' section"
    fenced = re.search(r"```text\n(.*?)\n```", section[1], re.S)
    assert fenced is not None, "the worked example has no ```text block"
    values = {}
    for line in fenced.group(1).splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            values[name.strip()] = value.strip()
    return values


def test_the_worked_example_in_formats_md_equals_the_fixture() -> None:
    assert doc_worked_example() == DOC_VALUES


# ---------------------------------------------------------------------------
# Signed messages: enrollment, consent grant, peer request, HPKE share info
# ---------------------------------------------------------------------------

MESSAGES = GOLDEN["messages"]


def test_patient_enrollment_message_and_signature() -> None:
    enroll = MESSAGES["enrollment"]
    message = bytes.fromhex(enroll["message_hex"])
    # Independent: canonical {"medledger-enroll": {"institution", "pseudonym"}}.
    assert message == ref_canonical(
        {
            "medledger-enroll": {
                "institution": enroll["institution"],
                "pseudonym": enroll["pseudonym"],
            }
        }
    )
    assert enroll["pseudonym"] == GOLDEN["hmacs"][0]["hmac"]
    ref_verify(MESSAGES["patient_spki_der"], enroll["signature"], message)
    # Production.
    assert enrollment_message(enroll["institution"], enroll["pseudonym"]) == message
    patient = signing_key(MESSAGES["patient_scalar"])
    assert patient.public.der().hex() == MESSAGES["patient_spki_der"]
    assert patient.sign(message).to_json() == enroll["signature"]


def test_consent_grant_is_signed_by_the_patient_key_it_names() -> None:
    entry = MESSAGES["consent_grant"]
    data = bytes.fromhex(entry["canonical_hex"])
    grant = json.loads(data)
    assert ref_canonical(grant) == data
    assert ref_hash(data).hex() == entry["hash"]
    assert grant["type"] == "consent.grant"
    assert grant["chain"] == "consortium:" + GOLDEN["consortium_chain"]["genesis"]["consortium"]
    body = grant["body"]
    assert body["patient_key"] == MESSAGES["patient_spki_der"]
    assert body["patient"] == hashlib.sha256(bytes.fromhex(body["patient_key"])).hexdigest()
    (sig,) = grant["signatures"]
    unsigned = {k: v for k, v in grant.items() if k != "signatures"}
    ref_verify(MESSAGES["patient_spki_der"], sig, ref_canonical(unsigned))
    # Production: the same grant, byte for byte (RFC 6979 signature included).
    rebuilt = grant_tx(
        signing_key(MESSAGES["patient_scalar"]),
        chain=grant["chain"],
        grantee=body["grantee"],
        scope=body["scope"],
        purpose=body["purpose"],
        expires_ms=body["expires_ms"],
        time_ms=grant["time_ms"],
    )
    assert rebuilt.encode() == data


def test_peer_request_signing_bytes_hash_and_signature() -> None:
    peer = MESSAGES["peer_request"]
    signing = bytes.fromhex(peer["signing_bytes_hex"])
    # Independent: "medledger-peer-request-v1\n" || canonical(R); hash = SHA-256 of it.
    assert signing == b"medledger-peer-request-v1\n" + ref_canonical(peer["request"])
    assert ref_hash(signing).hex() == peer["hash"]
    assert peer["request"]["consent"] == MESSAGES["consent_grant"]["hash"]
    ref_verify(KEYS["member_b_spki_der"], peer["signature"], signing)
    # Production.
    request = PeerRequest.from_json(peer["request"])
    assert request.signing_bytes() == signing
    assert request.hash().hex() == peer["hash"]
    assert (
        request.sign(signing_key(KEYS["member_b_scalar"])).signature.to_json() == peer["signature"]
    )


def test_hpke_share_info_binds_holder_reader_blob_and_request() -> None:
    peer = MESSAGES["peer_request"]["request"]
    info = bytes.fromhex(MESSAGES["share_info_hex"])
    expected = {
        "medledger-share": {
            "holder": peer["holder"],
            "reader": peer["reader"],
            "blob": GOLDEN["envelope"]["blob_sha256"],
            "request": MESSAGES["peer_request"]["hash"],
        }
    }
    assert info == ref_canonical(expected)
    assert (
        share_info(
            peer["holder"],
            peer["reader"],
            bytes.fromhex(GOLDEN["envelope"]["blob_sha256"]),
            bytes.fromhex(MESSAGES["peer_request"]["hash"]),
        )
        == info
    )
