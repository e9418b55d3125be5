"""Tests for :mod:`medledger.services.patients`: the patient wallet file and what it signs."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medledger.core.consent import ConsentGrant, ConsentRevoke
from medledger.core.enrollment import enrollment_message, rotation_message
from medledger.core.errors import (
    Conflict,
    InvalidInput,
    InvalidSignature,
    KeyStoreError,
    NotFound,
)
from medledger.core.keys import SigningKey
from medledger.services.patients import PatientWallet

PASSPHRASE = b"patient passphrase"
CHAIN = "consortium:demo"
T0 = 1_700_000_000_000


@pytest.fixture
def wallet_path(tmp_path: Path) -> Path:
    return tmp_path / "wallet.pem"


def test_create_then_open_is_the_same_key(wallet_path: Path) -> None:
    created = PatientWallet.create(wallet_path, PASSPHRASE)
    opened = PatientWallet.open(wallet_path, PASSPHRASE)
    assert opened.fingerprint == created.fingerprint
    assert opened.public == created.public
    assert created.fingerprint == created.public.fingerprint
    assert [p.name for p in wallet_path.parent.iterdir()] == [wallet_path.name]  # no temp files


def test_each_wallet_is_a_new_key(tmp_path: Path) -> None:
    first = PatientWallet.create(tmp_path / "a.pem", PASSPHRASE)
    second = PatientWallet.create(tmp_path / "b.pem", PASSPHRASE)
    assert first.fingerprint != second.fingerprint


@pytest.mark.parametrize("wrong", [b"patient passphrasE", b"x", PASSPHRASE + b" "])
def test_wrong_passphrase_is_a_keystore_error(wallet_path: Path, wrong: bytes) -> None:
    PatientWallet.create(wallet_path, PASSPHRASE)
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        PatientWallet.open(wallet_path, wrong)


def test_existing_path_is_a_conflict_and_is_left_alone(wallet_path: Path) -> None:
    original = PatientWallet.create(wallet_path, PASSPHRASE)
    before = wallet_path.read_bytes()
    with pytest.raises(Conflict, match="already exists"):
        PatientWallet.create(wallet_path, b"another passphrase")
    assert wallet_path.read_bytes() == before
    assert PatientWallet.open(wallet_path, PASSPHRASE).fingerprint == original.fingerprint


def test_any_existing_file_is_a_conflict(wallet_path: Path) -> None:
    wallet_path.write_text("not a wallet")
    with pytest.raises(Conflict):
        PatientWallet.create(wallet_path, PASSPHRASE)
    assert wallet_path.read_text() == "not a wallet"


@pytest.mark.parametrize("weak", [b"", b"a", b" ", b" " * 40, b"short-pass1", b"a" * 40])
def test_weak_passphrase_is_refused_and_writes_nothing(wallet_path: Path, weak: bytes) -> None:
    with pytest.raises(InvalidInput, match="wallet passphrase is too weak: use at least 12"):
        PatientWallet.create(wallet_path, weak)
    assert not wallet_path.exists()
    assert list(wallet_path.parent.iterdir()) == []


def test_a_wallet_made_under_a_weak_passphrase_still_opens(wallet_path: Path) -> None:
    """The floor applies when a passphrase is set; an older weak wallet stays usable."""
    key = SigningKey.generate()
    wallet_path.write_bytes(key.to_encrypted_pem(b"a"))
    assert PatientWallet.open(wallet_path, b"a").fingerprint == key.fingerprint


def test_wallet_file_is_private(wallet_path: Path) -> None:
    PatientWallet.create(wallet_path, PASSPHRASE)
    assert stat.S_IMODE(wallet_path.stat().st_mode) == 0o600


def test_private_key_is_never_written_unencrypted(wallet_path: Path) -> None:
    PatientWallet.create(wallet_path, PASSPHRASE)
    data = wallet_path.read_bytes()
    lines = data.decode("ascii").strip().splitlines()
    assert lines[0] == "-----BEGIN ENCRYPTED PRIVATE KEY-----"
    assert lines[-1] == "-----END ENCRYPTED PRIVATE KEY-----"
    assert b"BEGIN PRIVATE KEY" not in data and b"EC PRIVATE KEY" not in data
    # Decrypt it independently of medledger, then look for the secret in every form.
    key = serialization.load_pem_private_key(data, password=PASSPHRASE)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    plain_pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    plain_sec1 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = base64.b64decode("".join(lines[1:-1]))
    for blob in (data, der):
        for secret in (scalar, plain_pkcs8, plain_sec1, scalar.hex().encode()):
            assert secret not in blob
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(data, password=None)


def test_open_missing_wallet_is_not_found(wallet_path: Path) -> None:
    with pytest.raises(NotFound, match="no patient wallet"):
        PatientWallet.open(wallet_path, PASSPHRASE)


def test_open_unreadable_or_corrupt_wallet_is_a_keystore_error(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="cannot read"):
        PatientWallet.open(tmp_path, PASSPHRASE)  # a directory
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(KeyStoreError):
        PatientWallet.open(corrupt, PASSPHRASE)


def test_wallet_signs_consents_that_members_accept(wallet_path: Path) -> None:
    wallet = PatientWallet.create(wallet_path, PASSPHRASE)
    grant = wallet.grant(
        chain=CHAIN,
        grantee="beta",
        scope=["Observation"],
        purpose="TREAT",
        expires_ms=T0 + 1_000,
        time_ms=T0,
    )
    parsed = ConsentGrant.from_tx(grant)
    assert parsed.patient == wallet.fingerprint and parsed.grantee == "beta"
    revoke = PatientWallet.open(wallet_path, PASSPHRASE).revoke(
        chain=CHAIN, grant=grant.hash(), time_ms=T0 + 1
    )
    assert ConsentRevoke.from_tx(revoke) == ConsentRevoke(
        patient=wallet.fingerprint, grant=grant.hash()
    )
    with pytest.raises(InvalidInput, match="purpose"):
        wallet.grant(
            chain=CHAIN,
            grantee="beta",
            scope=["Observation"],
            purpose="SPAM",
            expires_ms=T0 + 1_000,
            time_ms=T0,
        )


def test_enrollment_and_rotation_signatures(wallet_path: Path) -> None:
    wallet = PatientWallet.create(wallet_path, PASSPHRASE)
    pseudonym = "ab" * 32
    sig = wallet.enrollment_signature("alpha", pseudonym)
    assert sig.signer == wallet.fingerprint
    wallet.public.verify(sig, enrollment_message("alpha", pseudonym))
    with pytest.raises(InvalidSignature, match="does not verify"):
        wallet.public.verify(sig, enrollment_message("beta", pseudonym))
    rotation = wallet.rotation_signature("alpha", pseudonym, "cd" * 32)
    wallet.public.verify(rotation, rotation_message("alpha", pseudonym, "cd" * 32))
    with pytest.raises(InvalidSignature, match="does not verify"):
        wallet.public.verify(rotation, rotation_message("alpha", pseudonym, "ef" * 32))


def test_repr_names_the_fingerprint_only(wallet_path: Path) -> None:
    wallet = PatientWallet.create(wallet_path, PASSPHRASE)
    text = repr(wallet)
    assert text.startswith("PatientWallet(") and wallet.fingerprint[:16] in text
    assert PASSPHRASE.decode() not in text and "PRIVATE" not in text
