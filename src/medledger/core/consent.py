"""Patient consent: the ``consent.grant`` / ``consent.revoke`` consortium transactions. Pure.

A patient holds an ECDSA P-256 key pair (a wallet); on chains the patient is
only the fingerprint of its public key. A grant says *which member* may read
*which resource types* of that patient's records, *for what purpose*, *from
when until when*; the patient signs it, and it authorizes sharing once it is
final on the consortium chain and its period has started. The period starts at
the optional ``starts_ms`` (a consent signed today for next week's surgery) or
else at the grant's own ``time_ms``, and ends before ``expires_ms``; the
holder's clock decides, never the consortium's rules. A revocation names the grant by its transaction hash, is
signed by the same key and takes effect as soon as it is final.

Purposes are HL7 v3 ``PurposeOfUse`` codes (the codes FHIR ``Consent`` uses).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from medledger.core.errors import ConsentDenied, InvalidInput, InvalidSignature
from medledger.core.hashing import hash_from_hex
from medledger.core.keys import SigningKey, VerifyingKey
from medledger.core.models import Transaction
from medledger.core.transactions import (
    CONSENT_GRANT,
    CONSENT_REVOKE,
    CONSENT_TYPES,
    CONSORTIUM_BODIES,
)

__all__ = [
    "ALL_TYPES",
    "CONSENT_GRANT",
    "CONSENT_REVOKE",
    "CONSENT_TYPES",
    "PATIENT_KEY_SYSTEM",
    "PURPOSES",
    "ConsentGrant",
    "ConsentRecord",
    "ConsentRevoke",
    "grant_tx",
    "revoke_tx",
]

#: Identifier system of a patient's key fingerprint (FHIR ``Patient.identifier``,
#: ``Consent.patient``): how an institution links its Patient to the wallet.
PATIENT_KEY_SYSTEM = "urn:medledger:patient-key"
#: Scope entry meaning "every resource type of this patient".
ALL_TYPES = "*"
#: HL7 v3 PurposeOfUse codes accepted in a grant.
PURPOSES = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "PUBHLTH": "public health",
    "HRESCH": "healthcare research",
    "PATRQT": "patient requested",
    "FAMRQT": "family requested",
}
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_MEMBER = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_GRANT_FIELDS = CONSORTIUM_BODIES[CONSENT_GRANT].required
#: Optional grant body fields (absent in grants made before they existed).
_GRANT_OPTIONAL = CONSORTIUM_BODIES[CONSENT_GRANT].optional
_REVOKE_FIELDS = CONSORTIUM_BODIES[CONSENT_REVOKE].required
_MAX_SCOPE = 64


def _patient_key(body: dict[str, Any]) -> VerifyingKey:
    """The patient key named by a consent body, checked against its fingerprint."""
    if not isinstance(body.get("patient_key"), str) or not isinstance(body.get("patient"), str):
        raise InvalidInput("consent patient and patient_key must be strings")
    try:
        key = VerifyingKey.from_der(bytes.fromhex(body["patient_key"]))
    except ValueError:
        raise InvalidInput("consent patient_key is not a hex DER public key") from None
    if key.fingerprint != body["patient"]:
        raise InvalidInput("consent patient is not the fingerprint of patient_key")
    return key


def _is_time(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_patient_signature(tx: Transaction, key: VerifyingKey, verify: bool) -> None:
    if len(tx.signatures) != 1 or tx.signatures[0].signer != key.fingerprint:
        raise InvalidSignature(f"{tx.type} must carry exactly one signature, the patient's")
    if verify:
        key.verify(tx.signatures[0], tx.signing_bytes())


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentGrant:
    """A parsed, well-formed ``consent.grant`` (signature checked by :meth:`from_tx`)."""

    patient: str
    grantee: str
    scope: tuple[str, ...]
    purpose: str
    expires_ms: int
    time_ms: int
    #: When the consent's period starts: ``starts_ms`` of the body, else ``time_ms``.
    starts_ms: int

    @classmethod
    def from_tx(cls, tx: Transaction, *, verify_signature: bool = True) -> ConsentGrant:
        """Parse and check a grant; raise :class:`InvalidInput` / :class:`InvalidSignature`."""
        body = tx.body
        if tx.type != CONSENT_GRANT or not _GRANT_FIELDS <= set(body) <= (
            _GRANT_FIELDS | _GRANT_OPTIONAL
        ):
            raise InvalidInput(
                f"consent.grant must have exactly {', '.join(sorted(_GRANT_FIELDS))}"
                f" (and optionally {', '.join(sorted(_GRANT_OPTIONAL))})"
            )
        key = _patient_key(body)
        _check_patient_signature(tx, key, verify_signature)
        grantee, scope, purpose, expires = (
            body["grantee"],
            body["scope"],
            body["purpose"],
            body["expires_ms"],
        )
        if not isinstance(grantee, str) or not _MEMBER.fullmatch(grantee):
            raise InvalidInput("consent grantee must be a member id")
        if (
            not isinstance(scope, list)
            or not 1 <= len(scope) <= _MAX_SCOPE
            or not all(isinstance(t, str) and (t == ALL_TYPES or _TYPE.fullmatch(t)) for t in scope)
            or len(set(scope)) != len(scope)
        ):
            raise InvalidInput("consent scope must be distinct FHIR resource types, or ['*']")
        if ALL_TYPES in scope and len(scope) != 1:
            raise InvalidInput("consent scope '*' stands alone")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            raise InvalidInput(f"consent purpose must be one of {', '.join(PURPOSES)}")
        if not isinstance(expires, int) or isinstance(expires, bool) or expires <= tx.time_ms:
            raise InvalidInput("consent expires_ms must be a time after the grant")
        starts = body.get("starts_ms", tx.time_ms)
        if not _is_time(starts) or starts >= expires:
            raise InvalidInput("consent starts_ms must be a time before expires_ms")
        return cls(
            patient=body["patient"],
            grantee=grantee,
            scope=tuple(scope),
            purpose=purpose,
            expires_ms=expires,
            time_ms=tx.time_ms,
            starts_ms=starts,
        )

    def covers(self, resource_type: str) -> bool:
        return self.scope == (ALL_TYPES,) or resource_type in self.scope


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentRevoke:
    """A parsed ``consent.revoke``: ``patient`` withdraws the grant with hash ``grant``."""

    patient: str
    grant: bytes

    @classmethod
    def from_tx(cls, tx: Transaction, *, verify_signature: bool = True) -> ConsentRevoke:
        body = tx.body
        if tx.type != CONSENT_REVOKE or set(body) != _REVOKE_FIELDS:
            raise InvalidInput(
                f"consent.revoke must have exactly {', '.join(sorted(_REVOKE_FIELDS))}"
            )
        key = _patient_key(body)
        _check_patient_signature(tx, key, verify_signature)
        grant = hash_from_hex(body["grant"], "consent.revoke grant")
        return cls(patient=body["patient"], grant=grant)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentRecord:
    """A final grant as the consortium state knows it, with its revocation if any."""

    tx_hash: bytes
    grant: ConsentGrant
    height: int
    revoked_height: int | None = None

    def authorize(self, *, reader: str, patient: str, resource_type: str, now_ms: int) -> None:
        """Return if this consent lets ``reader`` read ``patient``'s ``resource_type`` now.

        Raises :class:`ConsentDenied` with the reason otherwise.
        """
        if self.revoked_height is not None:
            raise ConsentDenied("the consent was revoked by the patient")
        if self.grant.patient != patient:
            raise ConsentDenied("the consent was given by another patient")
        if self.grant.grantee != reader:
            raise ConsentDenied(f"the consent was granted to {self.grant.grantee}, not {reader}")
        if now_ms >= self.grant.expires_ms:
            raise ConsentDenied("the consent has expired")
        if now_ms < self.grant.starts_ms:
            # The Consent resource shows when (provision.period.start).
            raise ConsentDenied("the consent's period has not started yet")
        if not self.grant.covers(resource_type):
            raise ConsentDenied(f"the consent does not cover {resource_type} resources")

    def to_json(self) -> dict[str, Any]:
        return {
            "consent": self.tx_hash.hex(),
            "patient": self.grant.patient,
            "grantee": self.grant.grantee,
            "scope": list(self.grant.scope),
            "purpose": self.grant.purpose,
            "time_ms": self.grant.time_ms,
            "starts_ms": self.grant.starts_ms,
            "expires_ms": self.grant.expires_ms,
            "height": self.height,
            "revoked_height": self.revoked_height,
        }


def grant_tx(
    patient_key: SigningKey,
    *,
    chain: str,
    grantee: str,
    scope: list[str],
    purpose: str,
    expires_ms: int,
    time_ms: int,
    starts_ms: int | None = None,
) -> Transaction:
    """A ``consent.grant`` signed by the patient (checked the way members will check it).

    Without ``starts_ms`` the consent's period starts at ``time_ms``.
    """
    body: dict[str, Any] = {
        "patient": patient_key.fingerprint,
        "patient_key": patient_key.public.der().hex(),
        "grantee": grantee,
        "scope": scope,
        "purpose": purpose,
        "expires_ms": expires_ms,
    }
    if starts_ms is not None:
        body["starts_ms"] = starts_ms
    tx = Transaction(type=CONSENT_GRANT, chain=chain, body=body, time_ms=time_ms)
    signed = replace(tx, signatures=(patient_key.sign(tx.signing_bytes()),))
    ConsentGrant.from_tx(signed)
    return signed


def revoke_tx(patient_key: SigningKey, *, chain: str, grant: bytes, time_ms: int) -> Transaction:
    """A ``consent.revoke`` of the grant with hash ``grant``, signed by the patient."""
    tx = Transaction(
        type=CONSENT_REVOKE,
        chain=chain,
        body={
            "patient": patient_key.fingerprint,
            "patient_key": patient_key.public.der().hex(),
            "grant": grant.hex(),
        },
        time_ms=time_ms,
    )
    return replace(tx, signatures=(patient_key.sign(tx.signing_bytes()),))
