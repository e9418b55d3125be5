from __future__ import annotations

import json
from pathlib import Path

import pytest

from medledger.core.errors import InvalidInput, KeyStoreError, NotFound
from medledger.core.keys import SigningKey
from medledger.storage.keystore import FileKeyStore, KdfParams

FAST = KdfParams(n=2**12)


def test_create_open_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ks.json"
    ks = FileKeyStore.create(path, b"keystore test passphrase", params=FAST)
    reopened = FileKeyStore.open(path, b"keystore test passphrase")
    assert reopened.signing_key().fingerprint == ks.signing_key().fingerprint
    kek = "kek:" + ks.secret("kek_current").decode()
    assert reopened.secret(kek) == ks.secret(kek) and len(ks.secret(kek)) == 32
    assert reopened.secret("search_key") != reopened.secret(kek)


def test_no_secret_appears_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ks.json"
    ks = FileKeyStore.create(path, b"keystore test passphrase", params=FAST)
    raw = path.read_bytes()
    kek = ks.secret("kek:" + ks.secret("kek_current").decode())
    for secret in (kek, ks.secret("search_key"), ks.signing_key().to_pkcs8_der()):
        assert secret not in raw and secret.hex().encode() not in raw
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_wrong_passphrase_and_corruption_fail_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "ks.json"
    FileKeyStore.create(path, b"keystore test passphrase", params=FAST)
    before = path.read_bytes()
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        FileKeyStore.open(path, b"nope")
    assert path.read_bytes() == before
    doc = json.loads(before)
    doc["kdf"]["n"] = 2**10  # weakening the KDF is detected (bound as associated data)
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyStoreError):
        FileKeyStore.open(path, b"keystore test passphrase")
    path.write_bytes(before[: len(before) // 2])
    with pytest.raises(KeyStoreError, match="corrupt"):
        FileKeyStore.open(path, b"keystore test passphrase")
    with pytest.raises(NotFound):
        FileKeyStore.open(tmp_path / "missing.json", b"keystore test passphrase")


def test_put_and_delete_secret_persist(tmp_path: Path) -> None:
    path = tmp_path / "ks.json"
    ks = FileKeyStore.create(path, b"keystore test passphrase", params=FAST)
    ks.put_secret("kek-2", b"\x01" * 32)
    assert FileKeyStore.open(path, b"keystore test passphrase").secret("kek-2") == b"\x01" * 32
    ks.delete_secret("kek-2")
    with pytest.raises(NotFound):
        FileKeyStore.open(path, b"keystore test passphrase").secret("kek-2")
    assert not list(tmp_path.glob(".ks.json.tmp-*"))


def test_create_refuses_empty_passphrase_and_existing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="keystore passphrase is too weak"):
        FileKeyStore.create(tmp_path / "a.json", b"", params=FAST)
    assert not (tmp_path / "a.json").exists()
    FileKeyStore.create(tmp_path / "b.json", b"keystore test passphrase", params=FAST)
    with pytest.raises(KeyStoreError):
        FileKeyStore.create(tmp_path / "b.json", b"keystore test passphrase", params=FAST)


def test_repr_shows_the_path_and_no_secret(tmp_path: Path) -> None:
    passphrase = b"a passphrase not to be printed"
    ks = FileKeyStore.create(tmp_path / "ks.json", passphrase, params=FAST)
    text = repr(ks)
    assert str(tmp_path / "ks.json") in text
    assert passphrase.decode() not in text
    for name in ks.names():
        value = ks.secret(name)
        assert repr(value) not in text and value.hex() not in text


def test_a_keystore_sealed_under_a_weak_passphrase_still_opens(tmp_path: Path) -> None:
    """The floor applies when a passphrase is set: a keystore from before it stays readable."""
    path = tmp_path / "old.json"
    old = FileKeyStore(path, b"a", FAST, {"signing_key": SigningKey.generate().to_pkcs8_der()})
    old._save()  # what an older medledger wrote under a one-letter passphrase
    assert FileKeyStore.open(path, b"a").signing_key().fingerprint == old.signing_key().fingerprint
