"""Tests for :mod:`medledger.services.keys`: what an :class:`InstitutionKeys` shows of itself."""

from __future__ import annotations

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
