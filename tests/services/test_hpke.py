"""Tests for :mod:`medledger.services.hpke`: wrapping a data key to one member (RFC 9180).

The keystore is a plain in-memory object with a ``secret(name)`` method (the
only part of the ``KeyStore`` protocol the HPKE key pair uses). Public keys
are cross-checked against ``cryptography``'s own key derivation.
"""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.core.errors import IntegrityError, InvalidInput, KeyStoreError, NotFound
from medledger.services.hpke import (
    DEFAULT_KEM,
    HPKE_MLKEM_SEED,
    HPKE_X25519_KEY,
    KEMS,
    HpkeKeyPair,
    seal_to,
)

MLKEM768_PUBLIC, X25519_PUBLIC = 1184, 32
#: RFC 9180 ``Nenc`` of each KEM and the AES-256-GCM tag length.
ENC = {"MLKEM768_X25519": 1088 + 32, "X25519": 32}
TAG = 16
INFO = b"medledger-share|alpha|beta|blob|request"
DATA_KEY = bytes(range(32))


class MemoryKeyStore:
    """Secrets in a dict; a missing one is :class:`NotFound`, as in the file keystore."""

    def __init__(self, items: dict[str, bytes] | None = None) -> None:
        self.items = (
            items
            if items is not None
            else {
                HPKE_MLKEM_SEED: secrets.token_bytes(64),
                HPKE_X25519_KEY: secrets.token_bytes(32),
            }
        )

    def secret(self, name: str) -> bytes:
        try:
            return self.items[name]
        except KeyError:
            raise NotFound(f"no secret {name!r}") from None


STORE = MemoryKeyStore()
OTHER_STORE = MemoryKeyStore()


def _pair(kem: str = DEFAULT_KEM, store: MemoryKeyStore = STORE) -> HpkeKeyPair:
    return HpkeKeyPair.from_keystore(store, kem)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=KEMS)
def kem(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def sealed(kem: str) -> tuple[str, bytes]:
    """``(public text, ciphertext of DATA_KEY for INFO)`` of our key pair under ``kem``."""
    public = _pair(kem).public_text()
    return public, seal_to(public, DATA_KEY, INFO)


# ---------------------------------------------------------------------------
# Key pairs and public keys
# ---------------------------------------------------------------------------


def test_default_kem_is_the_post_quantum_hybrid() -> None:
    assert DEFAULT_KEM == "MLKEM768_X25519"
    assert KEMS == ("MLKEM768_X25519", "X25519")
    assert _pair().kem == DEFAULT_KEM
    assert HpkeKeyPair.from_keystore(STORE).kem == DEFAULT_KEM  # type: ignore[arg-type]


def test_public_text_format_and_lengths(kem: str) -> None:
    text = _pair(kem).public_text()
    prefix, sep, hex_key = text.partition(":")
    assert (prefix, sep) == (kem, ":")
    assert hex_key == hex_key.lower() and bytes.fromhex(hex_key).hex() == hex_key
    expected = X25519_PUBLIC if kem == "X25519" else MLKEM768_PUBLIC + X25519_PUBLIC
    assert len(bytes.fromhex(hex_key)) == expected
    assert len(text) == len(kem) + 1 + 2 * expected


def test_public_keys_derive_from_the_keystore_secrets() -> None:
    seed, x_raw = STORE.items[HPKE_MLKEM_SEED], STORE.items[HPKE_X25519_KEY]
    x_pub = x25519.X25519PrivateKey.from_private_bytes(x_raw).public_key().public_bytes_raw()
    m_pub = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()
    pair = _pair()
    assert pair.public_text("X25519") == f"X25519:{x_pub.hex()}"
    assert pair.public_text() == f"MLKEM768_X25519:{(m_pub + x_pub).hex()}"
    # Deterministic: the same secrets give the same public keys, other secrets others.
    assert _pair(store=MemoryKeyStore(dict(STORE.items))).public_text() == pair.public_text()
    assert _pair(store=OTHER_STORE).public_text() != pair.public_text()


def test_public_text_of_the_other_kem_and_unknown_kems() -> None:
    pair = _pair("X25519")
    assert pair.public_text().startswith("X25519:")
    assert pair.public_text("MLKEM768_X25519") == _pair().public_text()
    with pytest.raises(InvalidInput, match="unknown HPKE KEM 'RSA'"):
        pair.public_text("RSA")
    with pytest.raises(InvalidInput, match="unknown HPKE KEM"):
        HpkeKeyPair.from_keystore(STORE, "mlkem768_x25519")  # type: ignore[arg-type]


@pytest.mark.parametrize("missing", [HPKE_MLKEM_SEED, HPKE_X25519_KEY])
def test_keystore_without_hpke_keys(missing: str) -> None:
    items = dict(STORE.items)
    del items[missing]
    with pytest.raises(KeyStoreError, match="holds no HPKE key pair"):
        _pair(store=MemoryKeyStore(items))


def test_keystore_errors_pass_through() -> None:
    class Locked:
        def secret(self, name: str) -> bytes:
            raise KeyStoreError("the keystore is locked")

    with pytest.raises(KeyStoreError, match="locked"):
        HpkeKeyPair.from_keystore(Locked())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Seal and open
# ---------------------------------------------------------------------------


def test_round_trip(kem: str, sealed: tuple[str, bytes]) -> None:
    public, ciphertext = sealed
    assert _pair(kem).open(public, ciphertext, INFO) == DATA_KEY
    assert len(ciphertext) == ENC[kem] + len(DATA_KEY) + TAG
    assert DATA_KEY not in ciphertext


def test_a_pair_opens_either_of_its_public_keys() -> None:
    """The published KEM only picks a public key; the pair holds both private keys."""
    pair = _pair("X25519")
    for kem in KEMS:
        public = pair.public_text(kem)
        assert pair.open(public, seal_to(public, b"k", INFO), INFO) == b"k"


@pytest.mark.parametrize("plaintext", [b"", b"\x00", DATA_KEY, b"x" * 5000])
def test_round_trip_of_any_length(plaintext: bytes) -> None:
    public = _pair("X25519").public_text()
    assert _pair("X25519").open(public, seal_to(public, plaintext, INFO), INFO) == plaintext


def test_sealing_is_randomized(sealed: tuple[str, bytes]) -> None:
    public, ciphertext = sealed
    assert seal_to(public, DATA_KEY, INFO) != ciphertext


def test_ciphertext_for_another_member_is_refused(kem: str) -> None:
    theirs = _pair(kem, OTHER_STORE).public_text()
    ciphertext = seal_to(theirs, DATA_KEY, INFO)
    ours = _pair(kem)
    # Named for their key: refused before any decryption.
    with pytest.raises(IntegrityError, match="wrapped for another member's key"):
        ours.open(theirs, ciphertext, INFO)
    # Presented as ours: it does not decrypt.
    with pytest.raises(IntegrityError, match="does not open with this member's HPKE key"):
        ours.open(ours.public_text(), ciphertext, INFO)
    assert _pair(kem, OTHER_STORE).open(theirs, ciphertext, INFO) == DATA_KEY


def test_ciphertext_for_the_other_kem_is_refused() -> None:
    pair = _pair()
    x_public = pair.public_text("X25519")
    ciphertext = seal_to(x_public, DATA_KEY, INFO)
    with pytest.raises(IntegrityError, match="does not open"):
        pair.open(pair.public_text("MLKEM768_X25519"), ciphertext, INFO)


@pytest.mark.parametrize("info", [b"", INFO + b"x", INFO[:-1], b"medledger-share|alpha|gamma"])
def test_wrong_info_is_refused(kem: str, sealed: tuple[str, bytes], info: bytes) -> None:
    public, ciphertext = sealed
    with pytest.raises(IntegrityError, match="does not open"):
        _pair(kem).open(public, ciphertext, info)


def test_truncated_or_extended_ciphertext_is_refused(kem: str, sealed: tuple[str, bytes]) -> None:
    public, ciphertext = sealed
    pair = _pair(kem)
    for bad in (b"", ciphertext[:1], ciphertext[: ENC[kem]], ciphertext[:-1], ciphertext + b"\0"):
        with pytest.raises(IntegrityError, match="does not open"):
            pair.open(public, bad, INFO)


def test_flipped_byte_in_each_part_is_refused(kem: str, sealed: tuple[str, bytes]) -> None:
    public, ciphertext = sealed
    pair = _pair(kem)
    # First and last byte of the encapsulated key, the sealed key, and the tag.
    for index in (0, ENC[kem] - 1, ENC[kem], len(ciphertext) - TAG - 1, len(ciphertext) - 1):
        bad = bytearray(ciphertext)
        bad[index] ^= 0x01
        with pytest.raises(IntegrityError, match="does not open"):
            pair.open(public, bytes(bad), INFO)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_refused(
    kem: str, sealed: tuple[str, bytes], data: st.DataObject
) -> None:
    public, ciphertext = sealed
    index = data.draw(st.integers(min_value=0, max_value=len(ciphertext) - 1), label="index")
    bit = data.draw(st.integers(min_value=0, max_value=7), label="bit")
    bad = bytearray(ciphertext)
    bad[index] ^= 1 << bit
    with pytest.raises(IntegrityError):
        _pair(kem).open(public, bytes(bad), INFO)


@settings(max_examples=40, deadline=None)
@given(plaintext=st.binary(max_size=256), info=st.binary(max_size=64))
def test_round_trip_property(plaintext: bytes, info: bytes) -> None:
    pair = _pair("X25519")
    public = pair.public_text()
    assert pair.open(public, seal_to(public, plaintext, info), info) == plaintext


# ---------------------------------------------------------------------------
# Malformed public keys
# ---------------------------------------------------------------------------

_X_HEX = "ab" * X25519_PUBLIC
_M_HEX = "cd" * (MLKEM768_PUBLIC + X25519_PUBLIC)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "written '<kem>:<hex>'"),
        (_X_HEX, "written '<kem>:<hex>'"),
        (f"X25519{_X_HEX}", "written '<kem>:<hex>'"),
        (f"x25519:{_X_HEX}", "unknown HPKE KEM 'x25519'"),
        (f"P256:{_X_HEX}", "unknown HPKE KEM 'P256'"),
        (f":{_X_HEX}", "unknown HPKE KEM ''"),
        (f" X25519:{_X_HEX}", "unknown HPKE KEM"),
        ("X25519:", "not a valid X25519 public key"),
        (f"X25519:{_X_HEX[:-2]}", "not a valid X25519 public key"),
        (f"X25519:{_X_HEX}00", "not a valid X25519 public key"),
        (f"X25519:{_X_HEX[:-1]}", "not a valid X25519 public key"),
        (f"X25519:{'zz' * X25519_PUBLIC}", "not a valid X25519 public key"),
        (f"X25519:{_X_HEX}:", "not a valid X25519 public key"),
        (f"MLKEM768_X25519:{_X_HEX}", "not a valid MLKEM768_X25519 public key"),
        (f"MLKEM768_X25519:{_M_HEX[:-2]}", "not a valid MLKEM768_X25519 public key"),
        (f"MLKEM768_X25519:{_M_HEX}00", "not a valid MLKEM768_X25519 public key"),
        (f"MLKEM768_X25519:{'cd' * MLKEM768_PUBLIC}", "not a valid MLKEM768_X25519"),
        (f"MLKEM768_X25519:{'g' * len(_M_HEX)}", "not a valid MLKEM768_X25519 public key"),
    ],
    ids=[
        "empty",
        "no-prefix",
        "no-colon",
        "lowercase-kem",
        "unknown-kem",
        "empty-kem",
        "leading-space",
        "empty-key",
        "x25519-short",
        "x25519-long",
        "x25519-odd-hex",
        "x25519-not-hex",
        "x25519-trailing-colon",
        "hybrid-only-x25519",
        "hybrid-short",
        "hybrid-long",
        "hybrid-no-x25519-part",
        "hybrid-not-hex",
    ],
)
def test_malformed_public_keys_are_invalid_input(text: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        seal_to(text, DATA_KEY, INFO)
    with pytest.raises(InvalidInput, match=reason):
        _pair().open(text, b"\0" * 100, INFO)


def test_a_well_formed_but_unknown_public_key_is_another_members() -> None:
    with pytest.raises(IntegrityError, match="another member"):
        _pair("X25519").open(f"X25519:{_X_HEX}", b"\0" * 100, INFO)


@pytest.mark.parametrize("kem", KEMS)
def test_low_order_x25519_public_key_is_invalid_input(kem: str) -> None:
    """An all-zero X25519 point (low order) is a malformed key, not a crash."""
    mlkem_part = "" if kem == "X25519" else _pair().public_text().partition(":")[2][:-64]
    text = f"{kem}:{mlkem_part}{'00' * X25519_PUBLIC}"
    with pytest.raises(InvalidInput):
        seal_to(text, DATA_KEY, INFO)


def test_repr_shows_no_private_key_material() -> None:
    store = MemoryKeyStore()
    pair = _pair(store=store)
    text = repr(pair)
    assert "HpkeKeyPair" in text and DEFAULT_KEM in text
    for secret in (store.items[HPKE_MLKEM_SEED], store.items[HPKE_X25519_KEY]):
        assert repr(secret) not in text and secret.hex() not in text
    pair.public_text()  # fills the derived-key caches, which stay hidden too
    pair.open(pair.public_text(), seal_to(pair.public_text(), DATA_KEY, INFO), INFO)
    assert repr(pair) == text
