"""Tests for :mod:`medledger.services.keys`: what an :class:`InstitutionKeys` shows of itself."""

from __future__ import annotations

import hmac
from pathlib import Path

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
