"""ECDSA P-256 signing keys, fingerprints and signatures (``ecdsa-p256-sha256``).

A signature is ECDSA over SHA-256 of the message; block signatures sign the
32 raw bytes of the block hash. Signing is deterministic (RFC 6979), so the
same key signs the same block to the same bytes, and signing needs no
randomness. Key *generation* is the one place that draws randomness (from the
operating system's CSPRNG, through ``cryptography``).

The fingerprint of a key is the hex SHA-256 of its DER SubjectPublicKeyInfo;
on chains, institutions and patients are known by it.
"""

from __future__ import annotations

import base64

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medledger.core.errors import InvalidInput, InvalidSignature, KeyStoreError
from medledger.core.hashing import sha256
from medledger.core.models import Signature

__all__ = ["ECDSA_P256", "SigningKey", "VerifyingKey"]

ECDSA_P256 = "ecdsa-p256-sha256"
_ALG = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_VERIFY_ALG = ec.ECDSA(hashes.SHA256())


class VerifyingKey:
    """A P-256 public key: verifies signatures, has a fingerprint."""

    __slots__ = ("_der", "_fingerprint", "_key")

    def __init__(self, key: ec.EllipticCurvePublicKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidInput("only P-256 keys are supported")
        self._key = key
        self._der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._fingerprint = sha256(self._der).hex()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def der(self) -> bytes:
        return self._der

    def pem(self) -> str:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    @classmethod
    def from_der(cls, data: bytes) -> VerifyingKey:
        try:
            key = serialization.load_der_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise InvalidInput("not a DER public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidInput("not an elliptic-curve public key")
        return cls(key)

    @classmethod
    def from_pem(cls, data: str | bytes) -> VerifyingKey:
        raw = data.encode("ascii") if isinstance(data, str) else data
        try:
            key = serialization.load_pem_public_key(raw)
        except (ValueError, UnsupportedAlgorithm):
            raise InvalidInput("not a PEM public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidInput("not an elliptic-curve public key")
        return cls(key)

    def verify(self, signature: Signature, message: bytes) -> None:
        """Return ``None`` if ``signature`` is this key's over ``message``; else raise.

        Raises :class:`InvalidSignature` for a wrong signer, algorithm or signature.
        """
        if signature.signer != self._fingerprint:
            raise InvalidSignature(
                f"signature by {signature.signer[:16]}… where {self._fingerprint[:16]}… was expected"
            )
        if signature.alg != ECDSA_P256:
            raise InvalidSignature(f"unsupported signature algorithm {signature.alg!r}")
        try:
            self._key.verify(signature.sig, message, _VERIFY_ALG)
        except _CryptoInvalidSignature:
            raise InvalidSignature(
                f"signature by {self._fingerprint[:16]}… does not verify"
            ) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyingKey) and other._der == self._der

    def __hash__(self) -> int:
        return hash(self._der)

    def __repr__(self) -> str:
        return f"VerifyingKey({self._fingerprint[:16]}…)"


class SigningKey:
    """A P-256 private key. Its bytes leave only encrypted (see :meth:`to_encrypted_pem`)."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidInput("only P-256 keys are supported")
        self._key = key
        self._public = VerifyingKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public(self) -> VerifyingKey:
        return self._public

    @property
    def fingerprint(self) -> str:
        return self._public.fingerprint

    def sign(self, message: bytes) -> Signature:
        """Deterministic ECDSA P-256 / SHA-256 signature over ``message``."""
        return Signature(
            signer=self._public.fingerprint, alg=ECDSA_P256, sig=self._key.sign(message, _ALG)
        )

    def to_pkcs8_der(self) -> bytes:
        """Unencrypted PKCS#8 DER: only for sealing inside a keystore, never to write out."""
        return self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pkcs8_der(cls, data: bytes) -> SigningKey:
        try:
            key = serialization.load_der_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyStoreError("stored signing key is corrupt") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyStoreError("stored signing key is not an elliptic-curve key")
        return cls(key)

    def to_private_jwk(self) -> dict[str, str]:
        """The key as an unencrypted EC JWK (RFC 7518 §6.2), for one purpose only: importing
        it into a browser's WebCrypto as a non-extractable key (``patient export-key
        --for-browser``, which writes it to a file of mode 0600)."""
        numbers = self._key.private_numbers()

        def b64(value: int) -> str:
            return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()

        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64(numbers.public_numbers.x),
            "y": b64(numbers.public_numbers.y),
            "d": b64(numbers.private_value),
            "kid": self.fingerprint,
        }

    def to_encrypted_pem(self, passphrase: bytes) -> bytes:
        """PKCS#8 PEM encrypted under ``passphrase`` (cryptography's best available scheme)."""
        if not passphrase:
            raise InvalidInput("a passphrase is required to export a private key")
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )

    @classmethod
    def from_encrypted_pem(cls, data: bytes, passphrase: bytes) -> SigningKey:
        """Load a key saved by :meth:`to_encrypted_pem`; a wrong passphrase raises :class:`KeyStoreError`."""
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyStoreError(
                "cannot decrypt private key: wrong passphrase or corrupt key"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyStoreError("stored key is not an elliptic-curve key")
        return cls(key)

    def __repr__(self) -> str:
        return f"SigningKey({self.fingerprint[:16]}…)"
