"""Envelope encryption: sealed record versions bound to their context, keys bound to blobs."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.core.encoding import canonical_bytes
from medledger.core.envelope import (
    KEY_SIZE,
    NONCE_SIZE,
    RecordContext,
    open_record,
    seal_record,
    unwrap_key,
    wrap_key,
)
from medledger.core.errors import IntegrityError, InvalidInput

DEK = bytes(range(32))
KEK = bytes(range(100, 132))
NONCE = b"\x07" * NONCE_SIZE
CTX = RecordContext(institution="st-mary", resource_type="Patient", id="p-1", version=3)
PLAIN = '{"resourceType":"Patient","name":[{"family":"Müller"}]}'.encode()


def test_sizes() -> None:
    assert KEY_SIZE == 32
    assert NONCE_SIZE == 12


def test_seal_open_round_trip() -> None:
    blob = seal_record(DEK, NONCE, PLAIN, CTX)
    assert blob.startswith(NONCE)
    assert len(blob) == NONCE_SIZE + len(PLAIN) + 16
    assert PLAIN not in blob
    assert open_record(DEK, blob, CTX) == PLAIN


@settings(max_examples=50, deadline=None)
@given(
    plaintext=st.binary(max_size=2048),
    dek=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    version=st.integers(min_value=1, max_value=2**40),
)
def test_round_trip_property(plaintext: bytes, dek: bytes, nonce: bytes, version: int) -> None:
    ctx = dataclasses.replace(CTX, version=version)
    assert open_record(dek, seal_record(dek, nonce, plaintext, ctx), ctx) == plaintext


def test_aad_is_canonical_json_of_the_context() -> None:
    assert CTX.aad() == (
        b'{"id":"p-1","institution":"st-mary","resource_type":"Patient","version":3}'
    )
    assert str(CTX) == "Patient/p-1/_history/3"


@pytest.mark.parametrize(
    "change",
    [
        {"institution": "st-john"},
        {"resource_type": "Observation"},
        {"id": "p-2"},
        {"version": 2},
        {"version": 4},
    ],
    ids=lambda c: next(iter(c)),
)
def test_wrong_context_fails(change: dict[str, object]) -> None:
    blob = seal_record(DEK, NONCE, PLAIN, CTX)
    other = dataclasses.replace(CTX, **change)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="does not authenticate"):
        open_record(DEK, blob, other)


def test_wrong_dek_fails() -> None:
    blob = seal_record(DEK, NONCE, PLAIN, CTX)
    with pytest.raises(IntegrityError):
        open_record(bytes(32), blob, CTX)


@pytest.mark.parametrize("cut", [0, 1, NONCE_SIZE, NONCE_SIZE + 15, NONCE_SIZE + 16, -1])
def test_truncated_blob_fails(cut: int) -> None:
    blob = seal_record(DEK, NONCE, PLAIN, CTX)
    truncated = blob[:cut]
    assert truncated != blob
    with pytest.raises(IntegrityError):
        open_record(DEK, truncated, CTX)


def test_every_flipped_bit_position_fails() -> None:
    blob = seal_record(DEK, NONCE, b"short", CTX)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError):
            open_record(DEK, bytes(bad), CTX)


def test_wrap_unwrap_round_trip_and_binding() -> None:
    blob = seal_record(DEK, NONCE, PLAIN, CTX)
    blob_hash = hashlib.sha256(blob).digest()
    wrapped = wrap_key(KEK, NONCE, DEK, blob_hash)
    assert DEK not in wrapped
    assert len(wrapped) == NONCE_SIZE + KEY_SIZE + 16
    assert unwrap_key(KEK, wrapped, blob_hash) == DEK
    other_hash = hashlib.sha256(b"another blob").digest()
    with pytest.raises(IntegrityError):
        unwrap_key(KEK, wrapped, other_hash)
    with pytest.raises(IntegrityError):
        unwrap_key(bytes(32), wrapped, blob_hash)
    flipped = bytearray(wrapped)
    flipped[-1] ^= 0x80
    with pytest.raises(IntegrityError):
        unwrap_key(KEK, bytes(flipped), blob_hash)
    for cut in (0, 5, NONCE_SIZE, len(wrapped) - 1):
        with pytest.raises(IntegrityError):
            unwrap_key(KEK, wrapped[:cut], blob_hash)


def test_unwrap_with_wrong_size_kek_is_integrity_error() -> None:
    wrapped = wrap_key(KEK, NONCE, DEK, b"\x00" * 32)
    with pytest.raises(IntegrityError):
        unwrap_key(KEK[:16], wrapped, b"\x00" * 32)


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_seal_rejects_bad_key_size(size: int) -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        seal_record(b"k" * size, NONCE, PLAIN, CTX)


@pytest.mark.parametrize("size", [0, 8, 11, 13, 16])
def test_seal_rejects_bad_nonce_size(size: int) -> None:
    with pytest.raises(InvalidInput, match="12 bytes"):
        seal_record(DEK, b"n" * size, PLAIN, CTX)


@pytest.mark.parametrize(
    ("kek", "nonce", "dek"),
    [
        (b"k" * 16, NONCE, DEK),
        (KEK, b"n" * 8, DEK),
        (KEK, NONCE, b"d" * 16),
        (KEK, NONCE, b"d" * 33),
    ],
    ids=["kek16", "nonce8", "dek16", "dek33"],
)
def test_wrap_rejects_bad_sizes(kek: bytes, nonce: bytes, dek: bytes) -> None:
    with pytest.raises(InvalidInput):
        wrap_key(kek, nonce, dek, b"\x00" * 32)


_AAD_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('"\\\x00\x1f\x7f'),
    max_size=30,
)


@given(
    institution=_AAD_TEXT,
    resource_type=_AAD_TEXT,
    rid=_AAD_TEXT,
    version=st.integers(min_value=-(2**60), max_value=2**60),
)
def test_aad_is_the_canonical_json_of_the_context(
    institution: str, resource_type: str, rid: str, version: int
) -> None:
    """The additional data a ciphertext is bound to is laid out directly on the hot path;
    it must stay exactly the canonical JSON it always was (or be refused as it was)."""
    context = RecordContext(
        institution=institution, resource_type=resource_type, id=rid, version=version
    )
    plain = {"institution": institution, "resource_type": resource_type, "id": rid}
    try:
        expected = canonical_bytes({**plain, "version": version})
    except InvalidInput:
        with pytest.raises(InvalidInput):
            context.aad()
        return
    assert context.aad() == expected


def test_aad_of_a_known_context() -> None:
    context = RecordContext(
        institution="st-mary", resource_type="Patient", id="p-\u00e9\n1", version=3
    )
    assert (
        context.aad()
        == (
            '{"id":"p-\u00e9\\n1","institution":"st-mary","resource_type":"Patient","version":3}'
        ).encode()
    )
