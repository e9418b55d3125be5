"""Envelope encryption of record versions: AES-256-GCM under a per-version data key.

Pure recipes; the caller supplies the random data key and nonces (see
``services.records``), so this module draws no randomness and does no I/O.

* A record version is sealed as ``nonce (12) || AES-256-GCM(dek, plaintext, aad)``
  where ``aad`` = canonical JSON ``{"institution", "resource_type", "id",
  "version"}``: a ciphertext moved to another record or version fails to open.
* The data key is wrapped as ``nonce (12) || AES-256-GCM(kek, dek, aad')``
  with ``aad'`` = ``b"medledger-dek:" + blob hash``: a wrapped key only opens
  the blob it was made for.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medledger.core.encoding import MAX_SAFE_INTEGER, canonical_bytes, canonical_text
from medledger.core.errors import IntegrityError, InvalidInput

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "RecordContext",
    "key_cipher",
    "open_record",
    "seal_record",
    "unwrap_key",
    "wrap_key",
]

KEY_SIZE = 32
NONCE_SIZE = 12


_AAD_LAYOUT = b'{"id":%b,"institution":%b,"resource_type":%b,"version":%d}'


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordContext:
    """What a ciphertext is bound to."""

    institution: str
    resource_type: str
    id: str
    version: int

    def aad(self) -> bytes:
        """Canonical JSON ``{"id", "institution", "resource_type", "version"}``."""
        version = self.version
        if (
            type(version) is int
            and -MAX_SAFE_INTEGER <= version <= MAX_SAFE_INTEGER
            and type(self.id) is str
            and type(self.institution) is str
            and type(self.resource_type) is str
        ):
            # Every read opens a version: its canonical bytes laid out directly, the
            # keys in sorted order (a property test holds this to canonical_bytes).
            return _AAD_LAYOUT % (
                canonical_text(self.id),
                canonical_text(self.institution),
                canonical_text(self.resource_type),
                version,
            )
        return canonical_bytes(
            {
                "institution": self.institution,
                "resource_type": self.resource_type,
                "id": self.id,
                "version": self.version,
            }
        )

    def __str__(self) -> str:
        return f"{self.resource_type}/{self.id}/_history/{self.version}"


def _check(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise InvalidInput("AES-256 keys are 32 bytes")
    if len(nonce) != NONCE_SIZE:
        raise InvalidInput("AES-GCM nonces are 12 bytes")


def seal_record(dek: bytes, nonce: bytes, plaintext: bytes, context: RecordContext) -> bytes:
    """Encrypt one record version; returns ``nonce || ciphertext+tag``."""
    _check(dek, nonce)
    return nonce + AESGCM(dek).encrypt(nonce, plaintext, context.aad())


def open_record(dek: bytes, blob: bytes, context: RecordContext) -> bytes:
    """Decrypt a sealed record version; raises :class:`IntegrityError` if anything was altered."""
    if len(blob) < NONCE_SIZE + 16:
        raise IntegrityError(f"{context}: ciphertext is truncated")
    try:
        return AESGCM(dek).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], context.aad())
    except InvalidTag:
        raise IntegrityError(f"{context}: ciphertext does not authenticate") from None


def wrap_key(kek: bytes, nonce: bytes, dek: bytes, blob_hash: bytes) -> bytes:
    """Wrap a data key under the key-encryption key, bound to its blob's hash."""
    _check(kek, nonce)
    if len(dek) != KEY_SIZE:
        raise InvalidInput("data keys are 32 bytes")
    return nonce + AESGCM(kek).encrypt(nonce, dek, b"medledger-dek:" + blob_hash)


def key_cipher(kek: bytes) -> AESGCM:
    """The AES-256-GCM instance of a key-encryption key, to unwrap many data keys with.

    Making one costs more than the unwrap itself (the key schedule), and every
    read unwraps a data key; the instance holds nothing but the KEK, and AEAD
    instances are stateless between calls. Raises :class:`InvalidInput` for a
    key that is not 32 bytes.
    """
    if len(kek) != KEY_SIZE:
        raise InvalidInput("AES-256 keys are 32 bytes")
    return AESGCM(kek)


def unwrap_key(kek: bytes | AESGCM, wrapped: bytes, blob_hash: bytes) -> bytes:
    """Unwrap a data key; raises :class:`IntegrityError` for a wrong KEK, blob or tampering.

    ``kek`` is the key, or its :func:`key_cipher`.
    """
    try:
        cipher = kek if isinstance(kek, AESGCM) else AESGCM(kek)
        return cipher.decrypt(
            wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], b"medledger-dek:" + blob_hash
        )
    except (InvalidTag, ValueError):
        raise IntegrityError("data key does not unwrap for this blob") from None
