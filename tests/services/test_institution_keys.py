"""Tests for :mod:`medledger.services.keys`: what an :class:`InstitutionKeys` shows of itself."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from medledger.core.envelope import unwrap_key, wrap_key
from medledger.core.errors import IntegrityError, KeyStoreError
from medledger.services.keys import InstitutionKeys
from medledger.storage.keystore import FileKeyStore, KdfParams


def test_repr_shows_no_key(tmp_path: Path) -> None:
    store = FileKeyStore.create(
        tmp_path / "ks.json", b"keys test passphrase", params=KdfParams(n=2**12)
    )
    keys = InstitutionKeys(store)
    kek_id, kek = keys.current_kek()  # cached inside: must stay hidden too
    text = repr(keys)
    assert text.startswith("InstitutionKeys(")
    for secret in (keys.search_key, kek):
        assert repr(secret) not in text and secret.hex() not in text
    assert kek_id not in text


def test_remembered_record_references_are_the_hmac_and_bounded(tmp_path: Path) -> None:
    """A read asks for its record's reference twice; the second is remembered, never another
    value, and the memory is bounded (forgotten all at once when full)."""
    store = FileKeyStore.create(
        tmp_path / "ks.json", b"keys test passphrase", params=KdfParams(n=2**12)
    )
    keys = InstitutionKeys(store)
    expected = hmac.digest(keys.search_key, b"record|Patient/p1", "sha256").hex()
    assert keys.record_ref("Patient", "p1") == expected
    assert keys.record_ref("Patient", "p1") == expected
    assert keys.record_ref("Observation", "p1") != expected
    for i in range(5000):
        assert keys.record_ref("Patient", f"n{i}") == keys._mac("record", f"Patient/n{i}")
    assert len(keys._record_refs) <= 4096
    assert keys.record_ref("Patient", "p1") == expected


def test_a_kek_cipher_unwraps_what_its_kek_wrapped_and_goes_with_the_kek(tmp_path: Path) -> None:
    """The AES-GCM instance a read unwraps with is made once per KEK, opens exactly what
    the KEK itself opens, and is dropped when rotation destroys the KEK."""
    store = FileKeyStore.create(
        tmp_path / "ks.json", b"keys test passphrase", params=KdfParams(n=2**12)
    )
    keys = InstitutionKeys(store)
    old_id, old = keys.current_kek()
    dek, blob_hash = os.urandom(32), hashlib.sha256(b"blob").digest()
    wrapped = wrap_key(old, os.urandom(12), dek, blob_hash)
    cipher = keys.kek_cipher(old_id)
    assert keys.kek_cipher(old_id) is cipher
    assert unwrap_key(cipher, wrapped, blob_hash) == unwrap_key(old, wrapped, blob_hash) == dek
    with pytest.raises(IntegrityError):
        unwrap_key(cipher, wrapped, hashlib.sha256(b"another blob").digest())
    new_id = keys.add_current_kek()
    with pytest.raises(IntegrityError):
        unwrap_key(keys.kek_cipher(new_id), wrapped, blob_hash)
    keys.destroy_kek(old_id)
    with pytest.raises(KeyStoreError, match="not in the keystore"):
        keys.kek_cipher(old_id)
