"""Patient enrollment: which wallet key speaks for which Patient of an institution. Pure.

A patient is bound to a key only by transactions on the institution's
private chain, each carrying the signatures that justify it, so an auditor
holding the chain alone can check every binding:

* ``patient.enroll`` — the first binding of a Patient (named by the
  institution's keyed pseudonym, never by its id). The new key signs
  :func:`enrollment_message`.
* ``patient.rotate`` — the patient moves to a new key: the new key signs
  :func:`enrollment_message` and the *currently bound* key signs
  :func:`rotation_message` naming the new key's fingerprint.
* ``patient.rebind`` — an administrator's break-glass re-binding (the old
  key is lost or stolen): the new key signs :func:`enrollment_message`, the
  body names the administrator (``actor``) and the ``patient.rebind`` the
  institution first reported on the consortium (``report``).

:class:`EnrollmentTable` replays these in chain order under the rules: at
most one key per Patient and one Patient per key, a key once bound at an
institution is never bound to another Patient there, and re-binding
starts from the key that is bound now.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from medledger.core.encoding import canonical_bytes
from medledger.core.errors import Conflict, InvalidInput, MedledgerError
from medledger.core.hashing import hash_from_hex
from medledger.core.keys import VerifyingKey
from medledger.core.models import Signature, Transaction
from medledger.core.transactions import (
    CONSORTIUM_BODIES,
    IDENTITY_TYPES,
    PATIENT_ENROLL,
    PATIENT_REBIND,
    PATIENT_ROTATE,
    PRIVATE_BODIES,
)

__all__ = [
    "IDENTITY_TYPES",
    "PATIENT_ENROLL",
    "PATIENT_REBIND",
    "PATIENT_ROTATE",
    "REBIND_ACTOR",
    "REBIND_REPORT_FIELDS",
    "Binding",
    "EnrollmentEvent",
    "EnrollmentTable",
    "enrollment_message",
    "rotation_message",
]

#: Body of the consortium ``patient.rebind`` report (signed by the institution).
REBIND_REPORT_FIELDS = CONSORTIUM_BODIES[PATIENT_REBIND].required
#: ``role:token id`` of the administrator who re-bound (never request text).
REBIND_ACTOR = re.compile(r"admin:[A-Za-z0-9_-]{1,64}")

_ENROLL_FIELDS = PRIVATE_BODIES[PATIENT_ENROLL].required
_ROTATE_FIELDS = PRIVATE_BODIES[PATIENT_ROTATE].required
_REBIND_FIELDS = PRIVATE_BODIES[PATIENT_REBIND].required


def enrollment_message(institution: str, pseudonym: str) -> bytes:
    """What a key signs to speak for the Patient with keyed ``pseudonym`` at ``institution``."""
    return canonical_bytes(
        {"medledger-enroll": {"institution": institution, "pseudonym": pseudonym}}
    )


def rotation_message(institution: str, pseudonym: str, new_fingerprint: str) -> bytes:
    """What the bound key signs to hand the Patient over to the key ``new_fingerprint``."""
    return canonical_bytes(
        {
            "medledger-rotate": {
                "institution": institution,
                "pseudonym": pseudonym,
                "new": new_fingerprint,
            }
        }
    )


def _key(value: Any, fingerprint: Any, what: str) -> VerifyingKey:
    if not isinstance(value, str) or not isinstance(fingerprint, str):
        raise InvalidInput(f"{what} and its fingerprint must be strings")
    try:
        key = VerifyingKey.from_der(bytes.fromhex(value))
    except ValueError:
        raise InvalidInput(f"{what} is not a hex DER public key") from None
    if key.fingerprint != fingerprint:
        raise InvalidInput(f"{what} does not have the fingerprint the body names")
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrollmentEvent:
    """One verified identity transaction: ``pseudonym`` is now bound to ``fingerprint``."""

    kind: str
    pseudonym: str
    fingerprint: str
    #: The key bound before (``""`` for a first enrollment).
    previous: str = ""
    #: The administrator of a break-glass re-binding.
    actor: str = ""

    @classmethod
    def from_tx(cls, tx: Transaction, institution: str) -> EnrollmentEvent:
        """Parse ``tx`` and check every signature it carries; raise why it is not valid."""
        body = tx.body
        fields = {
            PATIENT_ENROLL: _ENROLL_FIELDS,
            PATIENT_ROTATE: _ROTATE_FIELDS,
            PATIENT_REBIND: _REBIND_FIELDS,
        }.get(tx.type)
        if fields is None or set(body) != fields:
            raise InvalidInput(f"{tx.type} must have exactly {', '.join(sorted(fields or ()))}")
        pseudonym = body["pseudonym"]
        hash_from_hex(pseudonym, f"{tx.type} pseudonym")
        key = _key(body["patient_key"], body["patient"], f"{tx.type} patient_key")
        key.verify(
            Signature.from_json(body["signature"]), enrollment_message(institution, pseudonym)
        )
        previous, actor = "", ""
        if tx.type == PATIENT_ROTATE:
            previous = body["previous"]
            old = _key(body["previous_key"], previous, "patient.rotate previous_key")
            old.verify(
                Signature.from_json(body["previous_signature"]),
                rotation_message(institution, pseudonym, key.fingerprint),
            )
        elif tx.type == PATIENT_REBIND:
            previous, actor = body["previous"], body["actor"]
            hash_from_hex(previous, "patient.rebind previous")
            hash_from_hex(body["report"], "patient.rebind report")
            if not isinstance(actor, str) or not REBIND_ACTOR.fullmatch(actor):
                raise InvalidInput("patient.rebind actor must be 'admin:<token id>'")
        return cls(
            kind=tx.type,
            pseudonym=pseudonym,
            fingerprint=key.fingerprint,
            previous=previous,
            actor=actor,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """The key a Patient is bound to now, and how it got there."""

    pseudonym: str
    fingerprint: str
    kind: str
    tx_hash: bytes


class EnrollmentTable:
    """Current bindings, replayed from identity transactions in chain order."""

    def __init__(self) -> None:
        self._by_pseudonym: dict[str, Binding] = {}
        self._by_fingerprint: dict[str, Binding] = {}
        #: Every key ever bound here, with the Patient it was bound to.
        self._used: dict[str, str] = {}

    def of_pseudonym(self, pseudonym: str) -> Binding | None:
        return self._by_pseudonym.get(pseudonym)

    def of_fingerprint(self, fingerprint: str) -> Binding | None:
        return self._by_fingerprint.get(fingerprint)

    def check(self, event: EnrollmentEvent) -> None:
        """Return if ``event`` may happen now; raise :class:`Conflict` with the reason."""
        current = self._by_pseudonym.get(event.pseudonym)
        used_by = self._used.get(event.fingerprint)
        if used_by is not None:
            if used_by == event.pseudonym:
                raise Conflict("the patient is already bound to this key here")
            raise Conflict("this key is already bound to another patient at this institution")
        if event.kind == PATIENT_ENROLL:
            if current is not None:
                raise Conflict(
                    "the patient is already enrolled: a new key needs the current key's "
                    "signature (key rotation) or an administrator's break-glass re-binding"
                )
        elif current is None or current.fingerprint != event.previous:
            raise Conflict("the re-binding does not start from the key bound now")

    def apply(self, event: EnrollmentEvent, tx_hash: bytes) -> None:
        """Record ``event`` (``check`` passed)."""
        old = self._by_pseudonym.get(event.pseudonym)
        if old is not None:
            del self._by_fingerprint[old.fingerprint]
        binding = Binding(
            pseudonym=event.pseudonym,
            fingerprint=event.fingerprint,
            kind=event.kind,
            tx_hash=tx_hash,
        )
        self._by_pseudonym[event.pseudonym] = binding
        self._by_fingerprint[event.fingerprint] = binding
        self._used[event.fingerprint] = event.pseudonym

    def replay(self, tx: Transaction, tx_hash: bytes, institution: str) -> None:
        """Check and apply one committed identity tx; raise why the chain is inconsistent."""
        try:
            event = EnrollmentEvent.from_tx(tx, institution)
            self.check(event)
        except MedledgerError as exc:
            raise InvalidInput(f"{tx.type} {tx_hash.hex()}: {exc}") from None
        self.apply(event, tx_hash)

    def __len__(self) -> int:
        return len(self._by_pseudonym)
