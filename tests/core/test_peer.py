"""Tests for :mod:`medledger.core.peer`: peer requests and the provenance of a shared record.

The provenance fixtures are built by hand: a holder's private log of
``record.put`` transactions, an anchor of that log, and a consortium block
holding the anchor with a quorum certificate. Roots and inclusion proofs come
from a slow reference implementation of RFC 6962 §2.1 (MTH and PATH) written
here with :mod:`hashlib`, not from the code under test.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.core.consortium import Member, MemberSet
from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.errors import IntegrityError, InvalidInput, InvalidSignature
from medledger.core.keys import SigningKey
from medledger.core.merkle import root_from_leaf_hashes
from medledger.core.models import BlockHeader, Signature, Transaction
from medledger.core.peer import PEER_OPS, AnchorProof, PeerRequest, Provenance, SignedPeerRequest

DOMAIN = b"medledger-peer-request-v1\n"
T0 = 1_700_000_000_000
IDS = ["alpha", "beta", "gamma", "delta"]
KEYS = {i: SigningKey.generate() for i in IDS}
MEMBERS = MemberSet(
    tuple(Member(id=i, name=i.title(), signing_key=k.public) for i, k in KEYS.items())
)
OUTSIDER = SigningKey.generate()
CHAIN = "consortium:demo"
CONSENT = "c0" * 32
NONCE = "0123456789abcdef" * 2


def _request(**changes: Any) -> PeerRequest:
    fields: dict[str, Any] = {
        "op": "fetch",
        "reader": "beta",
        "holder": "alpha",
        "consent": CONSENT,
        "resource": "Observation/obs-1",
        "nonce": NONCE,
        "time_ms": T0,
    }
    fields.update(changes)
    return PeerRequest(**fields)


# ---------------------------------------------------------------------------
# PeerRequest validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "target"),
    [
        ("Observation/obs-1", ("Observation", "obs-1", None)),
        ("Ob/a", ("Ob", "a", None)),
        ("Patient/A.b-9", ("Patient", "A.b-9", None)),
        ("Observation/x/_history/1", ("Observation", "x", 1)),
        ("Observation/x/_history/9999999999", ("Observation", "x", 9_999_999_999)),
        (f"Observation/{'a' * 64}", ("Observation", "a" * 64, None)),
        (f"A{'b' * 63}/1", ("A" + "b" * 63, "1", None)),
    ],
)
def test_fetch_resources_accepted(resource: str, target: tuple[str, str, int | None]) -> None:
    assert _request(resource=resource).target == target


def test_list_takes_an_empty_resource() -> None:
    req = _request(op="list", resource="")
    assert req.op == "list" and req.resource == ""
    assert PEER_OPS == ("fetch", "list")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"op": "delete"}, "op must be one of fetch, list"),
        ({"op": "FETCH"}, "op must be one of"),
        ({"op": ""}, "op must be one of"),
        ({"op": None}, "op must be one of"),
        ({"reader": ""}, "reader and holder must be member ids"),
        ({"holder": ""}, "reader and holder must be member ids"),
        ({"reader": 5}, "reader and holder"),
        ({"holder": None}, "reader and holder"),
        ({"consent": "c0" * 31}, "consent must be 64 hex"),
        ({"consent": "C0" * 32}, "consent must be lowercase"),
        ({"consent": "zz" * 32}, "consent is not hex"),
        ({"consent": None}, "consent must be 64 hex"),
        ({"nonce": NONCE[:-1]}, "nonce must be 32 lowercase hex"),
        ({"nonce": NONCE + "0"}, "nonce must be 32 lowercase hex"),
        ({"nonce": NONCE.upper()}, "nonce must be 32 lowercase hex"),
        ({"nonce": "g" * 32}, "nonce must be 32 lowercase hex"),
        ({"nonce": ""}, "nonce must be 32 lowercase hex"),
        ({"nonce": 12345}, "nonce must be 32 lowercase hex"),
        ({"nonce": NONCE + "\n"}, "nonce must be 32 lowercase hex"),
        ({"time_ms": -1}, "time_ms must be a non-negative integer"),
        ({"time_ms": True}, "time_ms must be a non-negative integer"),
        ({"time_ms": 1.5}, "time_ms must be a non-negative integer"),
        ({"time_ms": "1"}, "time_ms must be a non-negative integer"),
    ],
)
def test_bad_request_fields_are_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        _request(**changes)


@pytest.mark.parametrize(
    "resource",
    [
        "",
        "Observation",
        "Observation/",
        "/obs-1",
        "observation/obs-1",
        "O/obs-1",
        "Obs1/obs-1",
        "Observation/obs 1",
        "Observation/obs_1",
        f"Observation/{'a' * 65}",
        f"A{'b' * 64}/1",
        "Observation/a/b",
        "Observation/a/_history/",
        "Observation/a/_history/0",
        "Observation/a/_history/01",
        "Observation/a/_history/-1",
        "Observation/a/_history/12345678901",
        "Observation/a/_history/1/",
        "Observation/a\n",
        "../Observation/a",
        None,
        5,
    ],
)
def test_bad_fetch_resources_are_refused(resource: Any) -> None:
    with pytest.raises(InvalidInput, match="fetch resource must be Type/id"):
        _request(resource=resource)


@pytest.mark.parametrize("resource", ["Observation/obs-1", " ", None, 0])
def test_list_with_a_resource_is_refused(resource: Any) -> None:
    with pytest.raises(InvalidInput, match="list takes no resource"):
        _request(op="list", resource=resource)


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        "request",
        {k: v for k, v in _request().to_json().items() if k != "nonce"},
        {**_request().to_json(), "extra": 1},
    ],
    ids=["none", "list", "string", "missing-field", "extra-field"],
)
def test_request_from_json_needs_exactly_the_fields(value: Any) -> None:
    with pytest.raises(InvalidInput, match="peer request must have exactly"):
        PeerRequest.from_json(value)


# ---------------------------------------------------------------------------
# Signing bytes and SignedPeerRequest
# ---------------------------------------------------------------------------


def test_signing_bytes_are_the_domain_prefix_and_canonical_json() -> None:
    req = _request()
    assert req.signing_bytes() == DOMAIN + canonical_bytes(req.to_json())
    assert req.hash() == hashlib.sha256(DOMAIN + canonical_bytes(req.to_json())).digest()
    assert req.to_json() == {
        "op": "fetch",
        "reader": "beta",
        "holder": "alpha",
        "consent": CONSENT,
        "resource": "Observation/obs-1",
        "nonce": NONCE,
        "time_ms": T0,
    }


def test_a_request_signature_is_not_a_signature_over_plain_json() -> None:
    req = _request()
    signed = req.sign(KEYS["beta"])
    assert signed.signature.signer == KEYS["beta"].fingerprint
    KEYS["beta"].public.verify(signed.signature, req.signing_bytes())
    with pytest.raises(InvalidSignature):
        KEYS["beta"].public.verify(signed.signature, canonical_bytes(req.to_json()))
    # And the converse: a signature over the bare JSON (e.g. a signed tx body) is no request.
    bare = KEYS["beta"].sign(canonical_bytes(req.to_json()))
    with pytest.raises(InvalidSignature):
        SignedPeerRequest(request=req, signature=bare).verify(MEMBERS)


def test_signed_request_verifies_against_the_members() -> None:
    _request().sign(KEYS["beta"]).verify(MEMBERS)
    _request(op="list", resource="", reader="gamma").sign(KEYS["gamma"]).verify(MEMBERS)


def test_request_from_a_non_member_is_refused() -> None:
    with pytest.raises(InvalidSignature, match="'omega' is not a consortium member"):
        _request(reader="omega").sign(OUTSIDER).verify(MEMBERS)


@pytest.mark.parametrize("signer", ["gamma", "alpha", "outsider"])
def test_request_signed_with_another_key_is_refused(signer: str) -> None:
    key = OUTSIDER if signer == "outsider" else KEYS[signer]
    with pytest.raises(InvalidSignature, match="not signed with beta's member key"):
        _request().sign(key).verify(MEMBERS)


@pytest.mark.parametrize(
    "changes",
    [
        {"op": "list", "resource": ""},
        {"holder": "gamma"},
        {"consent": "c1" * 32},
        {"resource": "Observation/obs-2"},
        {"resource": "Observation/obs-1/_history/1"},
        {"nonce": "f" * 32},
        {"time_ms": T0 + 1},
    ],
)
def test_request_altered_after_signing_is_refused(changes: dict[str, Any]) -> None:
    signed = _request().sign(KEYS["beta"])
    altered = SignedPeerRequest(
        request=replace(signed.request, **changes), signature=signed.signature
    )
    with pytest.raises(InvalidSignature, match="does not verify"):
        altered.verify(MEMBERS)


def test_request_with_a_corrupt_signature_is_refused() -> None:
    signed = _request().sign(KEYS["beta"])
    raw = bytearray(signed.signature.sig)
    raw[10] ^= 0x40
    bad = replace(signed, signature=replace(signed.signature, sig=bytes(raw)))
    with pytest.raises(InvalidSignature):
        bad.verify(MEMBERS)


def test_request_of_a_removed_member_is_refused() -> None:
    signed = _request().sign(KEYS["beta"])
    with pytest.raises(InvalidSignature, match="not a consortium member"):
        signed.verify(MEMBERS.without("beta"))


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"request": _request().to_json()},
        {
            "request": _request().to_json(),
            "signature": _request().sign(KEYS["beta"]).signature.to_json(),
            "extra": 1,
        },
    ],
    ids=["none", "missing-signature", "extra-field"],
)
def test_signed_request_from_json_needs_exactly_the_fields(value: Any) -> None:
    with pytest.raises(InvalidInput, match="exactly request and signature"):
        SignedPeerRequest.from_json(value)


def test_signed_request_from_json_checks_its_parts() -> None:
    good = _request().sign(KEYS["beta"]).to_json()
    bad_request = copy.deepcopy(good)
    bad_request["request"]["nonce"] = "x"
    with pytest.raises(InvalidInput, match="nonce"):
        SignedPeerRequest.from_json(bad_request)
    bad_signature = copy.deepcopy(good)
    bad_signature["signature"]["sig"] = "not hex"
    with pytest.raises(InvalidInput, match="signature sig"):
        SignedPeerRequest.from_json(bad_signature)


_HEX32 = st.binary(min_size=32, max_size=32).map(bytes.hex)
_MEMBER_IDS = st.sampled_from(IDS) | st.text(min_size=1, max_size=12)


@st.composite
def _requests(draw: st.DrawFn) -> PeerRequest:
    op = draw(st.sampled_from(PEER_OPS))
    resource = (
        draw(
            st.from_regex(
                r"[A-Z][A-Za-z]{1,20}/[A-Za-z0-9\-.]{1,64}(/_history/[1-9][0-9]{0,9})?",
                fullmatch=True,
            )
        )
        if op == "fetch"
        else ""
    )
    return PeerRequest(
        op=op,
        reader=draw(_MEMBER_IDS),
        holder=draw(_MEMBER_IDS),
        consent=draw(_HEX32),
        resource=resource,
        nonce=draw(st.binary(min_size=16, max_size=16)).hex(),
        time_ms=draw(st.integers(min_value=0, max_value=2**53 - 1)),
    )


@settings(max_examples=100, deadline=None)
@given(req=_requests())
def test_request_json_round_trip(req: PeerRequest) -> None:
    again = PeerRequest.from_json(parse_canonical(canonical_bytes(req.to_json())))
    assert again == req
    assert again.signing_bytes() == req.signing_bytes()
    if req.op == "fetch":
        rtype, rid, version = req.target
        suffix = "" if version is None else f"/_history/{version}"
        assert f"{rtype}/{rid}{suffix}" == req.resource


@settings(max_examples=40, deadline=None)
@given(req=_requests(), reader=st.sampled_from(IDS))
def test_signed_request_json_round_trip_still_verifies(req: PeerRequest, reader: str) -> None:
    req = replace(req, reader=reader)
    signed = req.sign(KEYS[reader])
    again = SignedPeerRequest.from_json(parse_canonical(canonical_bytes(signed.to_json())))
    assert again == signed
    again.verify(MEMBERS)


# ---------------------------------------------------------------------------
# Provenance: a reference RFC 6962 tree and a hand-built consortium block
# ---------------------------------------------------------------------------


def _sha(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def _leaf(data: bytes) -> bytes:
    return _sha(b"\x00", data)


def _split(n: int) -> int:
    """Largest power of two strictly below ``n`` (requires n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _mth(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH over leaf *hashes*."""
    if not leaves:
        return _sha()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _sha(b"\x01", _mth(leaves[:k]), _mth(leaves[k:]))


def _path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 6962 §2.1.1 PATH(m, D[n]) over leaf hashes."""
    if len(leaves) <= 1:
        return []
    k = _split(len(leaves))
    if m < k:
        return [*_path(m, leaves[:k]), _mth(leaves[k:])]
    return [*_path(m - k, leaves[k:]), _mth(leaves[:k])]


def test_reference_tree_agrees_with_core_merkle() -> None:
    leaves = [_leaf(bytes([i])) for i in range(11)]
    for n in range(12):
        assert _mth(leaves[:n]) == root_from_leaf_hashes(leaves[:n])


HOLDER = "alpha"
RECORD_INDEX = 3
BLOB = b"ciphertext of Observation/obs-3 version 2"


def _record_tx(i: int, blob: bytes) -> Transaction:
    return Transaction(
        type="record.put",
        chain=f"private:{HOLDER}",
        body={
            "resource_type": "Observation",
            "ref": f"{i:02x}" * 32,
            "version": 2,
            "blob": hashlib.sha256(blob).hexdigest(),
            "patient": "aa" * 32,
        },
        time_ms=T0 + i,
    )


RECORD_TXS = [_record_tx(i, BLOB if i == RECORD_INDEX else b"other %d" % i) for i in range(6)]
PRIVATE_LEAVES = [_leaf(tx.encode()) for tx in RECORD_TXS]
PRIVATE_ROOT = _mth(PRIVATE_LEAVES)


def _anchor_tx(signer: str = HOLDER, **body_changes: Any) -> Transaction:
    body: dict[str, Any] = {
        "institution": HOLDER,
        "height": 6,
        "log_size": len(RECORD_TXS),
        "log_root": PRIVATE_ROOT.hex(),
        "block_hash": "bb" * 32,
        "prev_size": 0,
        "proof": [],
    }
    body.update(body_changes)
    tx = Transaction(type="anchor", chain=CHAIN, body=body, time_ms=T0 + 100)
    return replace(tx, signatures=(KEYS[signer].sign(tx.signing_bytes()),))


def _filler_tx(i: int) -> Transaction:
    tx = Transaction(
        type="access",
        chain=CHAIN,
        body={"n": i},
        time_ms=T0 + i,
    )
    return replace(tx, signatures=(KEYS["gamma"].sign(tx.signing_bytes()),))


@dataclass(frozen=True)
class ConsortiumLog:
    """A hand-built consortium block: all txs of the chain, the last ``tx_count`` in it."""

    txs: list[Transaction]
    header: BlockHeader
    anchor_index: int


def _block(
    anchor: Transaction, anchor_index: int = 4, total: int = 7, in_block: int = 3
) -> ConsortiumLog:
    txs = [_filler_tx(i) for i in range(total - 1)]
    txs.insert(anchor_index, anchor)
    leaves = [_leaf(tx.encode()) for tx in txs]
    header = BlockHeader(
        chain=CHAIN,
        height=5,
        prev_hash=b"\x11" * 32,
        tx_root=_mth(leaves[-in_block:]),
        tx_count=in_block,
        log_size=len(txs),
        log_root=_mth(leaves),
        time_ms=T0 + 200,
        proposer="gamma",
    )
    return ConsortiumLog(txs=txs, header=header, anchor_index=anchor_index)


def _certificate(header: BlockHeader, signers: Sequence[str]) -> tuple[Signature, ...]:
    return tuple(KEYS[s].sign(header.hash()) for s in signers)


def _anchor_proof(
    anchor: Transaction | None = None, signers: Sequence[str] = ("alpha", "beta", "gamma")
) -> AnchorProof:
    block = _block(anchor or _anchor_tx())
    leaves = [_leaf(tx.encode()) for tx in block.txs]
    return AnchorProof(
        tx=block.txs[block.anchor_index],
        leaf_index=block.anchor_index,
        proof=tuple(_path(block.anchor_index, leaves)),
        header=block.header,
        certificate=_certificate(block.header, signers),
    )


def _provenance(anchor: AnchorProof | None = None) -> Provenance:
    return Provenance(
        record_tx=RECORD_TXS[RECORD_INDEX],
        leaf_index=RECORD_INDEX,
        proof=tuple(_path(RECORD_INDEX, PRIVATE_LEAVES)),
        anchor=anchor or _anchor_proof(),
    )


def _verify(
    prov: Provenance,
    *,
    chain: str = CHAIN,
    holder: str = HOLDER,
    members: MemberSet = MEMBERS,
    resource_type: str = "Observation",
    version: int | None = 2,
    blob: bytes = BLOB,
) -> None:
    prov.verify(
        consortium_chain=chain,
        holder=holder,
        members=members,
        resource_type=resource_type,
        version=version,
        blob=blob,
    )


# Anchor proofs are the slow part to build (ECDSA); build the common ones once.
ANCHOR = _anchor_proof()
PROVENANCE = _provenance(ANCHOR)


def test_valid_provenance_verifies() -> None:
    assert MEMBERS.quorum == 3
    assert ANCHOR.verify(chain_id=CHAIN, holder=HOLDER, members=MEMBERS) == (
        len(RECORD_TXS),
        PRIVATE_ROOT,
    )
    _verify(PROVENANCE)
    _verify(PROVENANCE, version=None)  # "the latest version": any version is fine


@pytest.mark.parametrize("signers", [IDS, ["delta", "gamma", "beta"], ["alpha", "beta", "delta"]])
def test_any_quorum_of_members_makes_the_anchor_final(signers: list[str]) -> None:
    proof = replace(ANCHOR, certificate=_certificate(ANCHOR.header, signers))
    _verify(_provenance(proof))


@pytest.mark.parametrize(
    "certificate",
    [
        lambda h: (),
        lambda h: _certificate(h, ["alpha", "beta"]),
        lambda h: _certificate(h, ["alpha", "beta", "beta"]),
        lambda h: (*_certificate(h, ["alpha", "beta"]), OUTSIDER.sign(h.hash())),
        lambda h: (*_certificate(h, ["alpha", "beta"]), KEYS["gamma"].sign(h.encode())),
        lambda h: _certificate(replace(h, time_ms=h.time_ms + 1), ["alpha", "beta", "gamma"]),
    ],
    ids=[
        "none",
        "two-of-four",
        "duplicate-signer",
        "outsider",
        "signature-over-header-bytes",
        "signatures-of-another-header",
    ],
)
def test_anchor_without_a_quorum_is_not_final(
    certificate: Callable[[BlockHeader], tuple[Signature, ...]],
) -> None:
    proof = replace(ANCHOR, certificate=certificate(ANCHOR.header))
    with pytest.raises(
        IntegrityError,
        match=r"not final: (\d valid member signatures, 3 needed|its certificate carries)",
    ):
        _verify(_provenance(proof))


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (lambda h: KEYS["delta"].sign(h.encode()), "member delta that does not verify"),
        (lambda h: KEYS["alpha"].sign(h.hash()), "two signatures by member alpha"),
    ],
    ids=["invalid-member-signature", "second-signature-of-a-signer"],
)
def test_a_bad_signature_beside_a_quorum_is_refused(
    extra: Callable[[BlockHeader], Signature], reason: str
) -> None:
    """A quorum does not excuse a signature no member put there (strict certificates)."""
    certificate = (*_certificate(ANCHOR.header, IDS[:3]), extra(ANCHOR.header))
    with pytest.raises(IntegrityError, match=f"not final: its certificate carries .*{reason}"):
        _verify(_provenance(replace(ANCHOR, certificate=certificate)))


def test_a_signer_who_has_left_is_not_counted_but_not_refused() -> None:
    """The certificate is of the members at that block: a signer may have left since."""
    certificate = (*_certificate(ANCHOR.header, IDS), OUTSIDER.sign(ANCHOR.header.hash()))
    _verify(_provenance(replace(ANCHOR, certificate=certificate)))


def test_anchor_block_altered_after_certification_is_not_final() -> None:
    for changes in ({"height": 6}, {"log_root": b"\x22" * 32}, {"proposer": "delta"}):
        proof = replace(ANCHOR, header=replace(ANCHOR.header, **changes))
        with pytest.raises(IntegrityError, match="not final"):
            _verify(_provenance(proof))


def test_quorum_of_the_current_member_set_is_needed() -> None:
    # Signed by alpha, beta, gamma: with gamma gone (3 members, quorum 2) still final...
    _verify(PROVENANCE, members=MEMBERS.without("gamma"))
    # ...but a certificate from members no longer in the set does not count.
    only_removed = replace(ANCHOR, certificate=_certificate(ANCHOR.header, ["gamma", "delta"]))
    smaller = MEMBERS.without("gamma").without("delta")
    with pytest.raises(IntegrityError, match="not final: 0 valid"):
        _verify(_provenance(only_removed), members=smaller)


def test_anchor_on_another_chain_is_refused() -> None:
    with pytest.raises(IntegrityError, match="is on 'consortium:demo', not 'consortium:other'"):
        _verify(PROVENANCE, chain="consortium:other")


def test_anchor_of_another_institution_is_refused() -> None:
    with pytest.raises(IntegrityError, match="not one of beta's"):
        _verify(PROVENANCE, holder="beta")
    with pytest.raises(IntegrityError, match="not one of omega's"):
        _verify(PROVENANCE, holder="omega")


def test_anchor_for_the_holder_signed_by_another_member_is_refused() -> None:
    forged = _anchor_proof(_anchor_tx(signer="beta"))
    with pytest.raises(IntegrityError, match="not signed by alpha"):
        _verify(_provenance(forged))


def test_anchor_with_a_bad_signature_is_refused() -> None:
    anchor = _anchor_tx()
    unsigned_changed = replace(anchor, body={**anchor.body, "height": 7})
    forged = _anchor_proof(unsigned_changed)  # certified, but alpha never signed that body
    with pytest.raises(IntegrityError, match=r"malformed.*does not verify"):
        _verify(_provenance(forged))


def test_anchor_tx_of_another_type_is_refused() -> None:
    tx = replace(_anchor_tx(), type="anchor.v2")
    tx = replace(tx, signatures=(KEYS[HOLDER].sign(tx.signing_bytes()),))
    with pytest.raises(IntegrityError, match="not one of alpha's"):
        _verify(_provenance(_anchor_proof(tx)))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"log_root": "zz" * 32}, "malformed.*log_root"),
        ({"log_root": "ab" * 16}, "malformed.*log_root"),
        ({"log_size": -1}, "malformed.*log_size"),
        ({"log_size": "6"}, "malformed.*log_size"),
    ],
)
def test_malformed_anchor_body_is_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(IntegrityError, match=reason):
        _verify(_provenance(_anchor_proof(_anchor_tx(**changes))))


@pytest.mark.parametrize(
    "changes",
    [
        {"log_size": 7},
        {"log_root": "cc" * 32},
        {"institution": "beta"},
        {"height": 60},
    ],
)
def test_anchor_tx_altered_after_inclusion_is_refused(changes: dict[str, Any]) -> None:
    tx = ANCHOR.tx
    altered = replace(ANCHOR, tx=replace(tx, body={**tx.body, **changes}))
    with pytest.raises(IntegrityError, match="not in the final block"):
        _verify(_provenance(altered))


def test_anchor_tx_with_signatures_stripped_is_not_in_the_block() -> None:
    altered = replace(ANCHOR, tx=replace(ANCHOR.tx, signatures=()))
    with pytest.raises(IntegrityError, match="not in the final block"):
        _verify(_provenance(altered))


def _flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


@pytest.mark.parametrize(
    "changes",
    [
        lambda p: {"leaf_index": p.leaf_index + 1},
        lambda p: {"leaf_index": p.leaf_index - 1},
        lambda p: {"leaf_index": p.header.log_size},
        lambda p: {"proof": p.proof[:-1]},
        lambda p: {"proof": (*p.proof, p.proof[0])},
        lambda p: {"proof": ()},
        lambda p: {"proof": (_flip(p.proof[0]), *p.proof[1:])},
        lambda p: {"proof": (*p.proof[:-1], _flip(p.proof[-1]))},
        lambda p: {"proof": tuple(reversed(p.proof))},
    ],
    ids=[
        "index+1",
        "index-1",
        "index=size",
        "truncated",
        "extended",
        "empty",
        "first-flipped",
        "last-flipped",
        "reversed",
    ],
)
def test_wrong_anchor_inclusion_proof_is_refused(
    changes: Callable[[AnchorProof], dict[str, Any]],
) -> None:
    with pytest.raises(IntegrityError, match="not in the final block"):
        _verify(_provenance(replace(ANCHOR, **changes(ANCHOR))))


def test_anchor_proven_against_tx_root_instead_of_log_root_is_refused() -> None:
    # The header's tx_root only covers this block; the proof must be against log_root.
    header = replace(ANCHOR.header, log_root=ANCHOR.header.tx_root)
    proof = replace(ANCHOR, header=header, certificate=_certificate(header, IDS))
    with pytest.raises(IntegrityError, match="not in the final block"):
        _verify(_provenance(proof))


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"resource_type": "Condition"}, "another resource or version"),
        ({"version": 1}, "another resource or version"),
        ({"version": 3}, "another resource or version"),
        ({"blob": BLOB + b"!"}, r"does not match the committed record \(tampered\)"),
        ({"blob": b""}, "tampered"),
        ({"blob": b"other 2"}, "tampered"),  # another record's ciphertext
        ({"holder": "alpha", "chain": CHAIN}, None),
    ],
    ids=[
        "other-type",
        "older-version",
        "newer-version",
        "blob-changed",
        "blob-empty",
        "blob-of-other-record",
        "valid",
    ],
)
def test_record_checks(kwargs: dict[str, Any], reason: str | None) -> None:
    if reason is None:
        _verify(PROVENANCE, **kwargs)
        return
    with pytest.raises(IntegrityError, match=reason):
        _verify(PROVENANCE, **kwargs)


@pytest.mark.parametrize(
    "changes",
    [{"type": "record.erase"}, {"chain": "private:beta"}, {"chain": CHAIN}],
)
def test_record_tx_that_is_not_the_holders_record_put_is_refused(changes: dict[str, Any]) -> None:
    prov = replace(PROVENANCE, record_tx=replace(PROVENANCE.record_tx, **changes))
    with pytest.raises(IntegrityError, match=r"not a record\.put of alpha"):
        _verify(prov)


@pytest.mark.parametrize(
    "changes",
    [
        lambda p: {"leaf_index": RECORD_INDEX + 1},
        lambda p: {"leaf_index": len(RECORD_TXS)},
        lambda p: {"proof": p.proof[1:]},
        lambda p: {"proof": (*p.proof, p.proof[-1])},
        lambda p: {"proof": (_flip(p.proof[0]), *p.proof[1:])},
        lambda p: {"proof": tuple(_path(RECORD_INDEX - 1, PRIVATE_LEAVES))},
        lambda p: {"record_tx": replace(p.record_tx, time_ms=p.record_tx.time_ms + 1)},
        lambda p: {"record_tx": replace(p.record_tx, body={**p.record_tx.body, "ref": "00" * 32})},
    ],
    ids=[
        "index+1",
        "index=size",
        "truncated",
        "extended",
        "flipped",
        "neighbours-proof",
        "tx-time-changed",
        "tx-ref-changed",
    ],
)
def test_wrong_record_inclusion_proof_is_refused(
    changes: Callable[[Provenance], dict[str, Any]],
) -> None:
    with pytest.raises(IntegrityError, match=r"not in alpha's anchored log \(wrong proof\)"):
        _verify(replace(PROVENANCE, **changes(PROVENANCE)))


def test_record_added_after_the_anchor_is_not_in_the_anchored_log() -> None:
    """A record the holder wrote after its last anchor cannot be proven yet."""
    later = _record_tx(len(RECORD_TXS), b"later")
    leaves = [*PRIVATE_LEAVES, _leaf(later.encode())]
    prov = Provenance(
        record_tx=later,
        leaf_index=len(RECORD_TXS),
        proof=tuple(_path(len(RECORD_TXS), leaves)),
        anchor=ANCHOR,
    )
    with pytest.raises(IntegrityError, match="wrong proof"):
        _verify(prov, blob=b"later")


@pytest.mark.parametrize("index", range(len(RECORD_TXS)))
def test_every_record_in_the_anchored_log_verifies(index: int) -> None:
    prov = Provenance(
        record_tx=RECORD_TXS[index],
        leaf_index=index,
        proof=tuple(_path(index, PRIVATE_LEAVES)),
        anchor=ANCHOR,
    )
    blob = BLOB if index == RECORD_INDEX else b"other %d" % index
    _verify(prov, blob=blob)


@pytest.mark.parametrize(("anchor_index", "total"), [(0, 1), (0, 2), (1, 2), (6, 7), (4, 13)])
def test_anchor_anywhere_in_the_consortium_log_verifies(anchor_index: int, total: int) -> None:
    block = _block(_anchor_tx(), anchor_index=anchor_index, total=total, in_block=1)
    leaves = [_leaf(tx.encode()) for tx in block.txs]
    proof = AnchorProof(
        tx=block.txs[anchor_index],
        leaf_index=anchor_index,
        proof=tuple(_path(anchor_index, leaves)),
        header=block.header,
        certificate=_certificate(block.header, ["beta", "gamma", "delta"]),
    )
    _verify(_provenance(proof))


# ---------------------------------------------------------------------------
# JSON forms of the proofs
# ---------------------------------------------------------------------------


def test_provenance_json_round_trip_still_verifies() -> None:
    doc = parse_canonical(canonical_bytes(PROVENANCE.to_json()))
    again = Provenance.from_json(doc)
    assert again == PROVENANCE
    assert again.to_json() == PROVENANCE.to_json()
    _verify(again)
    assert AnchorProof.from_json(ANCHOR.to_json()) == ANCHOR


def _mutated(doc: dict[str, Any], mutate: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    mutate(changed)
    return changed


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("anchor"), "provenance has exactly"),
        (lambda d: d.update(extra=1), "provenance has exactly"),
        (lambda d: d.update(leaf_index=-1), "record leaf_index"),
        (lambda d: d.update(leaf_index=True), "record leaf_index"),
        (lambda d: d.update(proof="00" * 32), "record proof must be a list"),
        (lambda d: d.update(proof=["00" * 31]), "record proof must be 64 hex"),
        (lambda d: d["anchor"].pop("certificate"), "anchor proof has exactly"),
        (lambda d: d["anchor"].update(certificate={}), "certificate must be a list"),
        (lambda d: d["anchor"].update(leaf_index=1.0), "anchor leaf_index"),
        (lambda d: d["anchor"].update(proof=[5]), "anchor proof must be 64 hex"),
        (lambda d: d["anchor"]["header"].pop("log_root"), "block header is missing"),
        (lambda d: d["anchor"]["certificate"][0].update(sig="zz"), "signature sig"),
        (lambda d: d["record_tx"].update(time_ms=-5), "time_ms"),
    ],
)
def test_malformed_provenance_json_is_refused(
    mutate: Callable[[dict[str, Any]], object], reason: str
) -> None:
    with pytest.raises(InvalidInput, match=reason):
        Provenance.from_json(_mutated(PROVENANCE.to_json(), mutate))


@pytest.mark.parametrize("value", [None, [], "x"])
def test_non_object_proofs_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInput):
        Provenance.from_json(value)
    with pytest.raises(InvalidInput):
        AnchorProof.from_json(value)
