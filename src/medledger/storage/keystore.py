"""Passphrase-protected keystore: the institution's secrets in one sealed file.

File format (JSON)::

    {"format": "medledger-keystore", "version": 1,
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": hex},
     "cipher": "aes-256-gcm", "nonce": hex, "ciphertext": hex}

The key-encryption key is scrypt(passphrase) with the stored parameters; the
sealed plaintext is canonical JSON of named secrets. Everything but the
ciphertext is bound as AES-GCM associated data, so the KDF parameters cannot
be weakened without detection. Writes are atomic (temp file, fsync, rename):
a crash leaves the old or the new keystore, never a mix. Secrets leave this
module only as key objects in memory — never unwrapped on disk.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from medledger.core.encoding import canonical_bytes, parse_canonical
from medledger.core.errors import InvalidInput, KeyStoreError, NotFound
from medledger.core.keys import SigningKey
from medledger.core.passphrase import check_new_passphrase
from medledger.storage.durable_files import fsync_dir, write_all

__all__ = ["CURRENT_KEK", "FileKeyStore", "KdfParams", "atomic_write"]

FORMAT = "medledger-keystore"
VERSION = 1
SIGNING_KEY = "signing_key"
#: Name of the secret holding the id of the KEK new data keys are wrapped with;
#: each KEK is stored as ``kek:<id>``.
CURRENT_KEK = "kek_current"


@dataclass(frozen=True, slots=True, kw_only=True)
class KdfParams:
    """scrypt cost parameters. The default (n=2**15, r=8) needs 32 MiB and ~0.1 s."""

    n: int = 2**15
    r: int = 8
    p: int = 1


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def _derive(passphrase: bytes, salt: bytes, params: KdfParams) -> bytes:
    return Scrypt(salt=salt, length=32, n=params.n, r=params.r, p=params.p).derive(passphrase)


class FileKeyStore:
    """A keystore file unlocked with a passphrase. Create with :meth:`create`."""

    def __init__(
        self, path: Path, passphrase: bytes, params: KdfParams, items: dict[str, bytes]
    ) -> None:
        self._path = path
        self._passphrase = passphrase
        self._params = params
        self._items = items

    @classmethod
    def create(
        cls,
        path: Path,
        passphrase: bytes,
        *,
        params: KdfParams | None = None,
        signing_key: SigningKey | None = None,
    ) -> FileKeyStore:
        """Create a keystore with a fresh signing key, KEK, search key and HPKE keys.

        The passphrase must pass :func:`~medledger.core.passphrase.check_new_passphrase`
        (:class:`InvalidInput` otherwise); :meth:`open` accepts any passphrase.
        """
        check_new_passphrase(passphrase, what="keystore passphrase")
        if path.exists():
            raise KeyStoreError(f"{path} already exists")
        key = signing_key or SigningKey.generate()
        kek_id = secrets.token_hex(8)
        items = {
            SIGNING_KEY: key.to_pkcs8_der(),  # sealed below, never written in clear
            f"kek:{kek_id}": secrets.token_bytes(32),
            CURRENT_KEK: kek_id.encode(),
            "search_key": secrets.token_bytes(32),
            # HPKE key material for sharing (see services.hpke): an ML-KEM-768
            # seed and an X25519 private key; any random bytes are valid.
            "hpke_mlkem768_seed": secrets.token_bytes(64),
            "hpke_x25519": secrets.token_bytes(32),
        }
        store = cls(path, passphrase, params or KdfParams(), items)
        store._save()
        return store

    @classmethod
    def open(cls, path: Path, passphrase: bytes) -> FileKeyStore:
        """Unlock the keystore at ``path``; a wrong passphrase raises :class:`KeyStoreError`."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no keystore at {path}") from None
        except OSError as exc:
            raise KeyStoreError(f"cannot read keystore {path}: {exc.strerror}") from None
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise KeyStoreError(f"{path} is not a medledger keystore (version {VERSION})")
            kdf = doc["kdf"]
            if kdf["name"] != "scrypt" or doc["cipher"] != "aes-256-gcm":
                raise KeyStoreError(f"{path}: unsupported keystore algorithms")
            params = KdfParams(n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"]))
            salt = bytes.fromhex(kdf["salt"])
            nonce = bytes.fromhex(doc["nonce"])
            ciphertext = bytes.fromhex(doc["ciphertext"])
            aad = canonical_bytes(
                {k: v for k, v in doc.items() if k not in ("nonce", "ciphertext")}
            )
        except KeyStoreError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, InvalidInput):
            raise KeyStoreError(f"{path} is corrupt") from None
        try:
            kek = _derive(passphrase, salt, params)
            plain = AESGCM(kek).decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError):
            raise KeyStoreError(
                f"cannot unlock {path}: wrong passphrase or corrupt keystore"
            ) from None
        try:
            items = {k: bytes.fromhex(v) for k, v in parse_canonical(plain).items()}
        except (InvalidInput, AttributeError, ValueError, TypeError):
            raise KeyStoreError(f"{path}: sealed contents are corrupt") from None
        return cls(path, passphrase, params, items)

    def _save(self) -> None:
        salt = secrets.token_bytes(16)
        kek = _derive(self._passphrase, salt, self._params)
        header: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "kdf": {
                "name": "scrypt",
                "n": self._params.n,
                "r": self._params.r,
                "p": self._params.p,
                "salt": salt.hex(),
            },
            "cipher": "aes-256-gcm",
        }
        nonce = secrets.token_bytes(12)
        plain = canonical_bytes({k: v.hex() for k, v in sorted(self._items.items())})
        sealed = AESGCM(kek).encrypt(nonce, plain, canonical_bytes(header))
        doc = {**header, "nonce": nonce.hex(), "ciphertext": sealed.hex()}
        atomic_write(self._path, json.dumps(doc, indent=2).encode() + b"\n")

    def signing_key(self) -> SigningKey:
        return SigningKey.from_pkcs8_der(self._items[SIGNING_KEY])

    def secret(self, name: str) -> bytes:
        try:
            return self._items[name]
        except KeyError:
            raise NotFound(f"no secret {name!r} in the keystore") from None

    def put_secret(self, name: str, value: bytes) -> None:
        self.update({name: value})

    def delete_secret(self, name: str) -> None:
        self.update({name: None})

    def update(self, changes: Mapping[str, bytes | None]) -> None:
        """Set (or, for ``None``, delete) several secrets in one atomic write."""
        for name, value in changes.items():
            if value is None:
                self._items.pop(name, None)
            else:
                self._items[name] = value
        self._save()

    def __repr__(self) -> str:
        # The passphrase and the unsealed secrets stay out of every repr.
        return f"FileKeyStore({str(self._path)!r})"

    def names(self) -> Mapping[str, int]:
        """Secret names and their sizes in bytes (never their values)."""
        return {k: len(v) for k, v in self._items.items()}
