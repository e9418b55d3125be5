"""HPKE (RFC 9180) key transport for sharing: a data key wrapped to one member.

Every member holds key material for two KEMs and publishes one of them in the
genesis as ``"<kem>:<hex public key>"``:

* ``MLKEM768_X25519`` (default) — the post-quantum hybrid KEM: a recorded
  exchange stays confidential even against a future quantum adversary unless
  both ML-KEM-768 and X25519 are broken.
* ``X25519`` — the classical DHKEM, for deployments that must interoperate
  with peers lacking ML-KEM.

KDF is HKDF-SHA256 and AEAD AES-256-GCM in both suites. The ``info`` string
binds a wrapped key to one exchange (holder, reader, blob hash, request), so a
key wrapped for one request cannot be replayed into another.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from medledger.core.errors import IntegrityError, InvalidInput, KeyStoreError
from medledger.storage.ports import KeyStore

__all__ = [
    "DEFAULT_KEM",
    "HPKE_MLKEM_SEED",
    "HPKE_X25519_KEY",
    "KEMS",
    "HpkeKeyPair",
    "seal_to",
]

DEFAULT_KEM = "MLKEM768_X25519"
KEMS = ("MLKEM768_X25519", "X25519")
#: Keystore secret names: a 64-byte ML-KEM-768 seed and a raw X25519 private key.
HPKE_MLKEM_SEED = "hpke_mlkem768_seed"
HPKE_X25519_KEY = "hpke_x25519"

_SUITES = {
    "MLKEM768_X25519": hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
    "X25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
_MLKEM768_PUBLIC = 1184
_X25519_PUBLIC = 32


def _check_kem(kem: str) -> None:
    if kem not in KEMS:
        raise InvalidInput(f"unknown HPKE KEM {kem!r} (one of {', '.join(KEMS)})")


@functools.lru_cache(maxsize=256)
def _public_object(text: str) -> tuple[str, Any]:
    """Parse ``"<kem>:<hex>"`` into the KEM name and a ``cryptography`` public key."""
    kem, sep, hex_key = text.partition(":")
    if not sep:
        raise InvalidInput("an HPKE public key is written '<kem>:<hex>'")
    _check_kem(kem)
    try:
        raw = bytes.fromhex(hex_key)
        if kem == "X25519":
            if len(raw) != _X25519_PUBLIC:
                raise ValueError("wrong length")
            return kem, x25519.X25519PublicKey.from_public_bytes(raw)
        if len(raw) != _MLKEM768_PUBLIC + _X25519_PUBLIC:
            raise ValueError("wrong length")
        return kem, hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC]),
            x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC:]),
        )
    except ValueError as exc:
        raise InvalidInput(f"not a valid {kem} public key ({exc})") from None


def seal_to(public_key: str, plaintext: bytes, info: bytes) -> bytes:
    """HPKE-encrypt ``plaintext`` to ``public_key`` (``"<kem>:<hex>"``), bound to ``info``."""
    kem, key = _public_object(public_key)
    try:
        return _SUITES[kem].encrypt(plaintext, key, info=info)
    except ValueError as exc:  # e.g. a low-order X25519 point
        raise InvalidInput(f"not a usable {kem} public key ({exc})") from None


@dataclass(frozen=True, slots=True)
class HpkeKeyPair:
    """A member's HPKE private keys (both KEMs); ``kem`` selects the published one."""

    kem: str
    # Private key material: never in a repr (logs, tracebacks, debuggers).
    mlkem_seed: bytes = field(repr=False)
    x25519_raw: bytes = field(repr=False)
    # Derived once: expanding the ML-KEM seed and deriving public keys cost more
    # than the HPKE operation itself.
    _private: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _public: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_keystore(cls, keystore: KeyStore, kem: str = DEFAULT_KEM) -> HpkeKeyPair:
        _check_kem(kem)
        try:
            return cls(kem, keystore.secret(HPKE_MLKEM_SEED), keystore.secret(HPKE_X25519_KEY))
        except KeyStoreError:
            raise
        except Exception:
            raise KeyStoreError("the keystore holds no HPKE key pair") from None

    def _mlkem(self) -> mlkem.MLKEM768PrivateKey:
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem_seed)

    def _x25519(self) -> x25519.X25519PrivateKey:
        return x25519.X25519PrivateKey.from_private_bytes(self.x25519_raw)

    def public_text(self, kem: str | None = None) -> str:
        """The public key as published in the genesis: ``"<kem>:<hex>"``."""
        kem = kem or self.kem
        text = self._public.get(kem)
        if text is None:
            _check_kem(kem)
            x_pub = self._x25519().public_key().public_bytes_raw()
            if kem == "X25519":
                text = f"X25519:{x_pub.hex()}"
            else:
                text = f"{kem}:{(self._mlkem().public_key().public_bytes_raw() + x_pub).hex()}"
            self._public[kem] = text
        return text

    def _private_key(self, kem: str) -> Any:
        key = self._private.get(kem)
        if key is None:
            key = (
                self._x25519()
                if kem == "X25519"
                else hpke.MLKEM768X25519PrivateKey(self._mlkem(), self._x25519())
            )
            self._private[kem] = key
        return key

    def open(self, public_key: str, ciphertext: bytes, info: bytes) -> bytes:
        """Decrypt a key sealed to ``public_key`` (which must be one of ours).

        Raises :class:`IntegrityError` when the ciphertext was not sealed to this
        key pair for ``info`` — wrapped for another member, or altered.
        """
        kem, _ = _public_object(public_key)
        if public_key != self.public_text(kem):
            raise IntegrityError("the data key was wrapped for another member's key")
        try:
            return _SUITES[kem].decrypt(ciphertext, self._private_key(kem), info=info)
        except (InvalidTag, ValueError):
            raise IntegrityError(
                "the wrapped data key does not open with this member's HPKE key"
            ) from None
