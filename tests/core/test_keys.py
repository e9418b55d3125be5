from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medledger.core.errors import InvalidInput, InvalidSignature, KeyStoreError
from medledger.core.keys import ECDSA_P256, SigningKey, VerifyingKey
from medledger.core.models import Signature


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def test_fingerprint_is_sha256_of_der_spki(key: SigningKey) -> None:
    der = key.public.der()
    assert key.fingerprint == hashlib.sha256(der).hexdigest()
    loaded = serialization.load_der_public_key(der)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    assert isinstance(loaded.curve, ec.SECP256R1)


def test_signature_verifies_with_independent_ecdsa(key: SigningKey) -> None:
    message = bytes(range(32))
    sig = key.sign(message)
    assert sig.alg == ECDSA_P256 and sig.signer == key.fingerprint
    public = serialization.load_der_public_key(key.public.der())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig.sig, message, ec.ECDSA(hashes.SHA256()))  # raises if wrong
    key.public.verify(sig, message)


def test_signing_is_deterministic(key: SigningKey) -> None:
    assert key.sign(b"block hash").sig == key.sign(b"block hash").sig
    assert key.sign(b"block hash").sig != key.sign(b"other hash").sig


@pytest.mark.parametrize("change", ["message", "sig-bit", "signer", "alg"])
def test_verify_rejects_every_alteration(key: SigningKey, change: str) -> None:
    message = b"x" * 32
    sig = key.sign(message)
    if change == "message":
        message = b"y" * 32
    elif change == "sig-bit":
        raw = bytearray(sig.sig)
        raw[-1] ^= 1
        sig = Signature(signer=sig.signer, alg=sig.alg, sig=bytes(raw))
    elif change == "signer":
        sig = Signature(signer=SigningKey.generate().fingerprint, alg=sig.alg, sig=sig.sig)
    else:
        sig = Signature(signer=sig.signer, alg="ml-dsa-65", sig=sig.sig)
    with pytest.raises(InvalidSignature):
        key.public.verify(sig, message)


def test_other_key_cannot_verify(key: SigningKey) -> None:
    other = SigningKey.generate()
    sig = other.sign(b"m")
    with pytest.raises(InvalidSignature):
        key.public.verify(sig, b"m")


def test_encrypted_pem_round_trip_and_wrong_passphrase(key: SigningKey) -> None:
    pem = key.to_encrypted_pem(b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in pem
    assert SigningKey.from_encrypted_pem(pem, b"correct horse").fingerprint == key.fingerprint
    with pytest.raises(KeyStoreError):
        SigningKey.from_encrypted_pem(pem, b"wrong")
    with pytest.raises(KeyStoreError):
        SigningKey.from_encrypted_pem(pem[:100], b"correct horse")
    with pytest.raises(InvalidInput):
        key.to_encrypted_pem(b"")


def test_public_pem_and_der_round_trip(key: SigningKey) -> None:
    assert VerifyingKey.from_pem(key.public.pem()) == key.public
    assert VerifyingKey.from_der(key.public.der()) == key.public
    with pytest.raises(InvalidInput):
        VerifyingKey.from_der(b"\x30\x00garbage")
    with pytest.raises(InvalidInput):
        VerifyingKey.from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


def test_only_p256_is_accepted() -> None:
    with pytest.raises(InvalidInput):
        SigningKey(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(InvalidInput):
        VerifyingKey(ec.generate_private_key(ec.SECP384R1()).public_key())
