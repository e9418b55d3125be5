"""The patient wallet: the patient's key pair in a passphrase-protected file.

On chains a patient is only the fingerprint of this public key. The wallet
signs consent grants and revocations, enrollment statements and key
rotations; the private
key is only ever written encrypted (PKCS#8 under the passphrase).
"""

from __future__ import annotations

from pathlib import Path

from medledger.core.consent import grant_tx, revoke_tx
from medledger.core.enrollment import enrollment_message, rotation_message
from medledger.core.errors import Conflict, KeyStoreError, NotFound
from medledger.core.keys import SigningKey, VerifyingKey
from medledger.core.models import Signature, Transaction
from medledger.core.passphrase import check_new_passphrase
from medledger.storage.durable_files import write_all
from medledger.storage.keystore import atomic_write

__all__ = ["PatientWallet"]


class PatientWallet:
    """A patient's signing key (see module docstring)."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key

    @classmethod
    def create(cls, path: Path, passphrase: bytes) -> PatientWallet:
        """A new wallet at ``path`` under a passphrase that passes the strength floor."""
        check_new_passphrase(passphrase, what="wallet passphrase")
        if path.exists():
            raise Conflict(f"{path} already exists")
        key = SigningKey.generate()
        atomic_write(path, key.to_encrypted_pem(passphrase), mode=0o600)
        return cls(key)

    @classmethod
    def open(cls, path: Path, passphrase: bytes) -> PatientWallet:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no patient wallet at {path}; run 'medledger patient init'") from None
        except OSError as exc:
            raise KeyStoreError(f"cannot read {path}: {exc.strerror}") from None
        return cls(SigningKey.from_encrypted_pem(data, passphrase))

    def __repr__(self) -> str:
        return f"PatientWallet({self.fingerprint[:16]}…)"

    @property
    def public(self) -> VerifyingKey:
        return self._key.public

    @property
    def fingerprint(self) -> str:
        """The patient's pseudonym on every chain."""
        return self._key.fingerprint

    def export_browser_key(self, path: Path) -> None:
        """Write the key as an unencrypted JWK to a *new* file of mode 0600, for a browser.

        WebCrypto cannot import an encrypted PKCS#8 key, so the portal's sign-in
        imports this file once (as a non-extractable key kept in IndexedDB);
        the file should then be deleted. An existing file is never overwritten.
        """
        import json
        import os

        data = json.dumps(self._key.to_private_jwk(), indent=2).encode() + b"\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise Conflict(f"{path} already exists; choose a new file") from None
        except OSError as exc:
            raise KeyStoreError(f"cannot create {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask allowed
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def enrollment_signature(self, institution: str, pseudonym: str) -> Signature:
        """Consent to speak for the Patient with keyed ``pseudonym`` at ``institution``."""
        return self._key.sign(enrollment_message(institution, pseudonym))

    def rotation_signature(
        self, institution: str, pseudonym: str, new_fingerprint: str
    ) -> Signature:
        """Hand that Patient over to the key ``new_fingerprint`` (signed by this, the bound key)."""
        return self._key.sign(rotation_message(institution, pseudonym, new_fingerprint))

    def grant(
        self,
        *,
        chain: str,
        grantee: str,
        scope: list[str],
        purpose: str,
        expires_ms: int,
        time_ms: int,
        starts_ms: int | None = None,
    ) -> Transaction:
        """A signed ``consent.grant``; its period starts at ``starts_ms``, else ``time_ms``."""
        return grant_tx(
            self._key,
            chain=chain,
            grantee=grantee,
            scope=scope,
            purpose=purpose,
            expires_ms=expires_ms,
            time_ms=time_ms,
            starts_ms=starts_ms,
        )

    def revoke(self, *, chain: str, grant: bytes, time_ms: int) -> Transaction:
        return revoke_tx(self._key, chain=chain, grant=grant, time_ms=time_ms)
