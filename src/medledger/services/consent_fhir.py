"""FHIR R4 views of consent and of the access trail.

* ``consent.grant`` ⇄ ``Consent``: the grant's fields map to ``patient``
  (identifier: the patient key fingerprint), ``provision.actor`` (the grantee
  member), ``provision.class`` (resource types; absent for all),
  ``provision.purpose`` (v3 ActReason/PurposeOfUse) and ``provision.period``.
  The patient-signed transaction travels in the extension
  :data:`CONSENT_TX_EXTENSION`, so a ``Consent`` is self-verifying and
  :func:`grant_from_consent` can check that resource and signed tx agree.
* An ``access`` entry → ``AuditEvent`` (a RESTful read; outcome 0 allowed,
  4 refused, with the reason).

Both resources pass ``fhir.resources`` R4 validation (tests hold us to it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from medledger.core.consent import (
    ALL_TYPES,
    CONSENT_GRANT,
    PATIENT_KEY_SYSTEM,
    PURPOSES,
    ConsentGrant,
    ConsentRecord,
)
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import InvalidInput
from medledger.core.hashing import sha256
from medledger.core.models import Transaction
from medledger.services.fhir import FhirInvalid, is_resource_type, load_json

__all__ = [
    "CONSENT_TX_EXTENSION",
    "MEMBER_SYSTEM",
    "REVOKE_TX_EXTENSION",
    "audit_event",
    "consent_for_grant",
    "identity_audit_event",
    "consent_resource",
    "grant_from_consent",
    "revocation_for",
    "signed_tx_from",
]

PATIENT_SYSTEM = "urn:medledger:patient"
MEMBER_SYSTEM = "urn:medledger:member"
RECORD_SYSTEM = "urn:medledger:record"
#: ``AuditEvent.subtype`` of identity events: "enrollment", "key rotation", "break-glass re-binding".
IDENTITY_EVENT_SYSTEM = "urn:medledger:identity-event"
CONSENT_TX_EXTENSION = "urn:medledger:consent-tx"
REVOKE_TX_EXTENSION = "urn:medledger:consent-revoke-tx"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
_SCOPE = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
    ]
}
_CATEGORY = [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}]


def _instant(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def _member(member_id: str) -> dict[str, Any]:
    return {"identifier": {"system": MEMBER_SYSTEM, "value": member_id}}


def consent_resource(
    record: ConsentRecord, grant_tx: Transaction, *, now_ms: int
) -> dict[str, Any]:
    """The FHIR ``Consent`` of a final grant (``inactive`` once revoked or expired)."""
    grant = record.grant
    active = record.revoked_height is None and now_ms < grant.expires_ms
    provision: dict[str, Any] = {
        "type": "permit",
        "period": {"start": _instant(grant.starts_ms), "end": _instant(grant.expires_ms)},
        "actor": [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP",
                            "display": "information recipient",
                        }
                    ]
                },
                "reference": _member(grant.grantee),
            }
        ],
        "purpose": [
            {"system": _ACT_REASON, "code": grant.purpose, "display": PURPOSES[grant.purpose]}
        ],
    }
    if grant.scope != (ALL_TYPES,):
        provision["class"] = [{"system": _RESOURCE_TYPES, "code": t} for t in grant.scope]
    return {
        "resourceType": "Consent",
        "id": record.tx_hash.hex(),
        "extension": [
            {
                "url": CONSENT_TX_EXTENSION,
                "valueString": canonical_bytes(grant_tx.to_json()).decode(),
            }
        ],
        "status": "active" if active else "inactive",
        "scope": _SCOPE,
        "category": _CATEGORY,
        "patient": {"identifier": {"system": PATIENT_KEY_SYSTEM, "value": grant.patient}},
        "dateTime": _instant(grant.time_ms),
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": provision,
    }


def consent_for_grant(grant_tx: Transaction) -> dict[str, Any]:
    """The ``Consent`` a client submits for a signed (not yet final) grant."""
    record = ConsentRecord(tx_hash=grant_tx.hash(), grant=ConsentGrant.from_tx(grant_tx), height=0)
    return consent_resource(record, grant_tx, now_ms=record.grant.time_ms)


def revocation_for(revoke_tx: Transaction) -> dict[str, Any]:
    """The ``Consent`` update a client submits to revoke: status inactive plus the signed tx."""
    return {
        "resourceType": "Consent",
        "id": revoke_tx.body["grant"],
        "extension": [
            {
                "url": REVOKE_TX_EXTENSION,
                "valueString": canonical_bytes(revoke_tx.to_json()).decode(),
            }
        ],
        "status": "inactive",
        "scope": _SCOPE,
        "category": _CATEGORY,
        "patient": {
            "identifier": {"system": PATIENT_KEY_SYSTEM, "value": revoke_tx.body["patient"]}
        },
    }


def signed_tx_from(resource: Any, extension: str) -> Transaction:
    """The signed transaction a ``Consent`` carries in ``extension``."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise InvalidInput("expected a FHIR Consent resource")
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == extension:
            text = ext.get("valueString")
            if not isinstance(text, str):
                break
            # The string is request text: parse it with the body's size and depth limits
            # (json.loads alone recurses once per nesting level, up to a RecursionError).
            try:
                value = load_json(text)
            except FhirInvalid:
                raise InvalidInput(f"extension {extension} is not a transaction") from None
            try:
                return Transaction.from_json(value)
            except ValueError:
                raise InvalidInput(f"extension {extension} is not a transaction") from None
    raise InvalidInput(f"the Consent carries no patient-signed transaction ({extension})")


def grant_from_consent(resource: Any) -> Transaction:
    """The signed ``consent.grant`` of a ``Consent``, checked to say what the resource says."""
    tx = signed_tx_from(resource, CONSENT_TX_EXTENSION)
    if tx.type != CONSENT_GRANT:
        raise InvalidInput("the Consent's transaction is not a consent.grant")
    grant = ConsentGrant.from_tx(tx)
    # The scope goes on the consortium chain for good: real type names only, no free text.
    if grant.scope != (ALL_TYPES,) and not all(is_resource_type(t) for t in grant.scope):
        raise InvalidInput("consent scope names something that is not a FHIR resource type")
    try:
        provision = resource["provision"]
        patient = resource["patient"]["identifier"]["value"]
        grantees = [a["reference"]["identifier"]["value"] for a in provision["actor"]]
        purposes = [p["code"] for p in provision["purpose"]]
        classes = tuple(c["code"] for c in provision.get("class") or []) or (ALL_TYPES,)
    except (KeyError, TypeError):
        raise InvalidInput(
            "a Consent needs patient.identifier, provision.actor and provision.purpose"
        ) from None
    if (
        resource.get("status", "active") != "active"
        or patient != grant.patient
        or grantees != [grant.grantee]
        or purposes != [grant.purpose]
        or classes != grant.scope
    ):
        raise InvalidInput("the Consent resource does not say what its signed transaction says")
    return tx


def audit_event(entry: dict[str, Any], *, tx_hash: str, time_ms: int, chain: str) -> dict[str, Any]:
    """The FHIR ``AuditEvent`` of one ``access`` entry as found on ``chain``.

    Its id is the hash of the ``access`` tx, or for entry ``n`` of an
    ``access.batch`` the SHA-256 of ``"<tx hash>/<n>"`` (a FHIR id holds at
    most 64 characters).
    """
    allowed = entry.get("outcome") == "allowed"
    n = entry.get("entry")
    event_id = tx_hash if n is None else sha256(f"{tx_hash}/{n}".encode()).hex()
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": event_id,
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
        "action": "R",
        "recorded": _instant(time_ms),
        "outcome": "0" if allowed else "4",
        "agent": [
            {
                "who": _member(str(entry.get("reader", ""))),
                "requestor": True,
                **({"altId": entry["actor"]} if entry.get("actor") else {}),
            }
        ],
        "source": {"site": chain, "observer": _member(str(entry.get("holder", "")))},
        "entity": [
            {"what": {"identifier": {"system": RECORD_SYSTEM, "value": entry.get("resource")}}}
        ],
    }
    if not allowed and entry.get("reason"):
        event["outcomeDesc"] = entry["reason"]
    if entry.get("patient"):
        event["entity"].append(
            {
                # A key fingerprint (cross-institution) or a keyed pseudonym (local).
                "what": {"identifier": {"system": PATIENT_SYSTEM, "value": entry["patient"]}},
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                    "display": "Patient",
                },
            }
        )
    if entry.get("consent"):
        event["entity"].append(
            {"what": {"reference": f"Consent/{entry['consent']}"}, "name": "consent"}
        )
    return event


def identity_audit_event(item: dict[str, Any], *, tx_hash: str, time_ms: int) -> dict[str, Any]:
    """The FHIR ``AuditEvent`` of an enrollment, key rotation or break-glass re-binding.

    ``item`` is a trail item of an identity tx (``services.trail``): the key
    bound (``patient``), the key it replaced (``previous``), for break-glass
    the administrator (``actor``). Typed DICOM 110137 "User Security
    Attributes Changed"; a break-glass carries purpose ``BTG``. The id is
    the tx hash.
    """
    holder = str(item.get("institution") or str(item.get("chain", "")).removeprefix("private:"))
    agent: dict[str, Any] = {"who": _member(holder), "requestor": True}
    if item.get("actor"):
        agent["altId"] = item["actor"]
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": tx_hash,
        "type": {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110137",
            "display": "User Security Attributes Changed",
        },
        "subtype": [{"system": IDENTITY_EVENT_SYSTEM, "code": str(item.get("event", ""))}],
        "action": "U",
        "recorded": _instant(time_ms),
        "outcome": "0",
        "agent": [agent],
        "source": {"site": str(item.get("chain", "")), "observer": _member(holder)},
        "entity": [
            {
                "what": {"identifier": {"system": PATIENT_KEY_SYSTEM, "value": item[key]}},
                "name": name,
            }
            for key, name in (("patient", "bound key"), ("previous", "replaced key"))
            if item.get(key)
        ],
    }
    if item.get("actor"):
        event["purposeOfEvent"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": "BTG",
                        "display": "break the glass",
                    }
                ]
            }
        ]
    return event
