"""The institution's record keys: KEKs (rotatable), search key, pseudonyms.

* KEKs are stored in the keystore as ``kek:<id>``; ``kek_current`` names the
  one that wraps new data keys. Rotation adds a KEK, makes it current,
  re-wraps every data key, then destroys the old KEK.
* Search tokens, patient pseudonyms and record references are all HMACs
  under the search key with distinct labels, so one never collides with
  another and none reveals its input without the key.
"""

from __future__ import annotations

import hmac
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medledger.core.envelope import key_cipher
from medledger.core.errors import InvalidInput, KeyStoreError, NotFound
from medledger.storage.keystore import CURRENT_KEK
from medledger.storage.ports import KeyStore

__all__ = ["InstitutionKeys"]

#: Record references remembered (then forgotten all at once): a read needs its record's
#: twice (the chain check of the version, and the ``access`` entry).
_RECORD_REFS = 4096


class InstitutionKeys:
    """Record-level key operations over a :class:`KeyStore`."""

    def __init__(self, keystore: KeyStore) -> None:
        self._store = keystore
        self.search_key = keystore.secret("search_key")
        self._keks: dict[str, bytes] = {}
        self._kek_ciphers: dict[str, AESGCM] = {}
        self._record_refs: dict[str, str] = {}

    def __repr__(self) -> str:
        # The search key and the cached KEKs stay out of every repr.
        return f"InstitutionKeys({len(self._keks)} KEKs cached)"

    def current_kek(self) -> tuple[str, bytes]:
        kek_id = self._store.secret(CURRENT_KEK).decode()
        return kek_id, self.kek(kek_id)

    def kek(self, kek_id: str) -> bytes:
        key = self._keks.get(kek_id)
        if key is None:
            try:
                key = self._store.secret(f"kek:{kek_id}")
            except NotFound:
                raise KeyStoreError(f"key-encryption key {kek_id} is not in the keystore") from None
            self._keks[kek_id] = key
        return key

    def kek_cipher(self, kek_id: str) -> AESGCM:
        """The AES-GCM instance of KEK ``kek_id`` (``core.envelope.key_cipher``), made once:
        every read unwraps its data key with it. Dropped with the KEK (:meth:`destroy_kek`)."""
        cipher = self._kek_ciphers.get(kek_id)
        if cipher is None:
            try:
                cipher = key_cipher(self.kek(kek_id))
            except InvalidInput:
                raise KeyStoreError(f"key-encryption key {kek_id} is not a 256-bit key") from None
            self._kek_ciphers[kek_id] = cipher
        return cipher

    def add_current_kek(self) -> str:
        """Create a new KEK and make it current (the old one stays until destroyed)."""
        kek_id = secrets.token_hex(8)
        self._store.update({f"kek:{kek_id}": secrets.token_bytes(32), CURRENT_KEK: kek_id.encode()})
        return kek_id

    def destroy_kek(self, kek_id: str) -> None:
        if self._store.secret(CURRENT_KEK).decode() == kek_id:
            raise KeyStoreError("cannot destroy the current key-encryption key")
        self._store.update({f"kek:{kek_id}": None})
        self._keks.pop(kek_id, None)
        self._kek_ciphers.pop(kek_id, None)

    def _mac(self, label: str, text: str) -> str:
        return hmac.digest(self.search_key, f"{label}|{text}".encode(), "sha256").hex()

    def pseudonym(self, patient_reference: str | None) -> str | None:
        """Stable pseudonym of ``Patient/<id>`` used on chains (never the id itself)."""
        return None if patient_reference is None else self._mac("pseudonym", patient_reference)

    def record_ref(self, resource_type: str, rid: str) -> str:
        """The on-chain name of a resource: its id could be an MRN, so it is keyed-hashed."""
        name = f"{resource_type}/{rid}"
        ref = self._record_refs.get(name)
        if ref is None:
            if len(self._record_refs) >= _RECORD_REFS:
                self._record_refs.clear()
            ref = self._record_refs[name] = self._mac("record", name)
        return ref
