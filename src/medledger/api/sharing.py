"""Consent, sharing and the access trail over HTTP.

* ``GET /fhir/Patient/{id}/$enrollment`` — what a wallet signs to enroll
  there (institution, the Patient's keyed pseudonym) and the key bound now.
* ``POST /fhir/Patient/{id}/$enroll`` — link a Patient that has no key yet to
  the patient's key (the patient's signature proves they hold it); a
  clinician, or the patient's own token for its first key.
* ``POST /fhir/Patient/{id}/$rotate-key`` — move it to a new key, signed by
  the key bound now. (Break-glass without that key: ``/admin``.)
* ``POST /fhir/Consent`` — a ``Consent`` carrying the patient-signed
  ``consent.grant``; answered once the grant is final on the consortium.
  ``PUT /fhir/Consent/{id}`` with ``status: inactive`` and the patient-signed
  ``consent.revoke`` withdraws it. ``GET /fhir/Consent[?patient=]`` lists.
* ``GET /fhir/AuditEvent?patient=<key fingerprint>`` — the patient's trail:
  every read, and every enrollment, key rotation and break-glass re-binding.
* ``GET /share/{holder}?consent=`` and ``GET /share/{holder}/{type}/{id}?consent=``
  — a clinician's verified cross-institution list and fetch.

Patients see only their own consents and trail; auditors see trails but no
clinical data; clinicians share and enroll. A patient token is resolved to a
key only through the enrollment records (``services.enrollment``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from medledger.api.auth import require
from medledger.api.clinical_reads import fhir_base
from medledger.api.deps import NodeDep
from medledger.api.errors import Forbidden
from medledger.api.fhir import read_body
from medledger.api.responses import fhir_response
from medledger.core.consent import CONSENT_REVOKE, ConsentRecord
from medledger.core.errors import InvalidInput, NotFound
from medledger.core.hashing import hash_from_hex
from medledger.core.keys import VerifyingKey
from medledger.core.models import Signature, Transaction
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.node import Node
from medledger.services.consent_fhir import (
    REVOKE_TX_EXTENSION,
    audit_event,
    consent_resource,
    grant_from_consent,
    identity_audit_event,
    signed_tx_from,
)
from medledger.services.fhir import validate_id
from medledger.services.sharing import SharingService
from medledger.storage.ports import TokenInfo

__all__ = ["router"]

router = APIRouter(tags=["consent and sharing"])
Clinician = Annotated[TokenInfo, Depends(require("clinician"))]
ConsentWriter = Annotated[TokenInfo, Depends(require("clinician", "patient"))]
ConsentReader = Annotated[TokenInfo, Depends(require("clinician", "patient", "auditor"))]
TrailReader = Annotated[TokenInfo, Depends(require("auditor", "patient"))]
_FINGERPRINT = r"^[0-9a-f]{64}$"


def _sharing(node: Node) -> tuple[SharingService, ConsortiumMember]:
    if node.sharing is None or node.consortium is None:
        raise NotFound("this node has not joined a consortium")
    return node.sharing, node.consortium


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return fhir_response(body, status=status, headers=headers)


async def _own_fingerprint(node: Node, who: TokenInfo) -> str | None:
    """A patient token's key fingerprint (None for other roles)."""
    if who.role != "patient":
        return None
    fingerprint = await node.enrollments.fingerprint_of(str(who.patient))
    if fingerprint is None:
        raise Forbidden("this patient has not enrolled a key here")
    return fingerprint


def _consent_json(node: Node, record: ConsentRecord) -> dict[str, Any]:
    store = node.consortium_store
    assert store is not None  # a node with a consortium member has its store
    tx = Transaction.decode(store.tx_by_hash(record.tx_hash)[1])
    return consent_resource(record, tx, now_ms=node.clock.now_ms())


def _key_and_signature(body: Any, extra: set[str] | None = None) -> tuple[VerifyingKey, Signature]:
    """``patient_key`` (hex DER) and its ``signature`` from a JSON body with exactly those fields."""
    fields = {"patient_key", "signature"} | (extra or set())
    if not isinstance(body, dict) or set(body) != fields:
        raise InvalidInput(f"this takes exactly {', '.join(sorted(fields))}")
    return wallet_key(body["patient_key"]), Signature.from_json(body["signature"])


def wallet_key(value: Any) -> VerifyingKey:
    """A wallet's public key from its hex DER encoding (bad input is :class:`InvalidInput`)."""
    try:
        return VerifyingKey.from_der(bytes.fromhex(str(value)))
    except ValueError:
        raise InvalidInput("patient_key is not a hex DER public key") from None


def _own_patient(who: TokenInfo, rid: str) -> None:
    """A patient token may act on its own Patient only (others look absent)."""
    if who.role == "patient" and who.patient != rid:
        raise NotFound("no such resource for this patient")


@router.get("/fhir/Patient/{rid}/$enrollment", summary="the key a Patient is enrolled with")
async def enrollment(rid: str, node: NodeDep, who: ConsentWriter) -> Response:
    """What a wallet signs to enroll (institution, pseudonym) and the key bound now."""
    _own_patient(who, validate_id(rid))
    await node.records.read("Patient", rid)
    binding = await node.enrollments.binding_of(rid)
    return _json(
        {
            "patient": f"Patient/{rid}",
            "institution": node.config.institution,
            "pseudonym": node.records.patient_pseudonym(rid),
            "fingerprint": binding.fingerprint if binding is not None else None,
            "bound_by": binding.kind if binding is not None else None,
        }
    )


@router.post("/fhir/Patient/{rid}/$enroll", summary="link a Patient to the patient's key")
async def enroll(rid: str, request: Request, node: NodeDep, who: ConsentWriter) -> Response:
    """A clinician at the desk, or the patient's own token (the portal): the first key only.

    A patient token was issued by this institution for this Patient, so it may
    bind the Patient's first key (signed by that key); once a key is bound,
    only that key's rotation signature (or an admin's break-glass) moves it.
    """
    _own_patient(who, validate_id(rid))
    key, signature = _key_and_signature(await read_body(request))
    fingerprint = await node.enrollments.enroll(validate_id(rid), key, signature)
    return _json({"patient": f"Patient/{rid}", "fingerprint": fingerprint})


@router.post("/fhir/Patient/{rid}/$rotate-key", summary="move a Patient to a new key")
async def rotate_key(rid: str, request: Request, node: NodeDep, who: ConsentWriter) -> Response:
    """The new key's enrollment signature plus the bound key's rotation signature."""
    _own_patient(who, validate_id(rid))
    body = await read_body(request)
    key, signature = _key_and_signature(body, {"previous_key", "previous_signature"})
    fingerprint = await node.enrollments.rotate(
        rid,
        key,
        signature,
        wallet_key(body["previous_key"]),
        Signature.from_json(body["previous_signature"]),
    )
    return _json({"patient": f"Patient/{rid}", "fingerprint": fingerprint})


@router.post("/fhir/Consent", summary="grant consent (patient-signed)", status_code=201)
async def grant(request: Request, node: NodeDep, who: ConsentWriter) -> Response:
    _, member = _sharing(node)
    tx = grant_from_consent(await read_body(request))
    own = await _own_fingerprint(node, who)
    if own is not None and tx.body["patient"] != own:
        raise Forbidden("a patient token may only submit its own patient's consent")
    await member.submit(tx)
    record = member.state.consents[tx.hash()]
    return _json(
        _consent_json(node, record),
        status=201,
        headers={"Location": f"/fhir/Consent/{record.tx_hash.hex()}"},
    )


@router.put("/fhir/Consent/{cid}", summary="revoke consent (patient-signed)")
async def revoke(cid: str, request: Request, node: NodeDep, who: ConsentWriter) -> Response:
    _, member = _sharing(node)
    resource = await read_body(request)
    tx = signed_tx_from(resource, REVOKE_TX_EXTENSION)
    if (
        tx.type != CONSENT_REVOKE
        or tx.body.get("grant") != cid
        or resource.get("status") != "inactive"
    ):
        raise InvalidInput("a revocation is status 'inactive' with this consent's consent.revoke")
    own = await _own_fingerprint(node, who)
    if own is not None and tx.body.get("patient") != own:
        raise Forbidden("a patient token may only revoke its own patient's consent")
    await member.submit(tx)
    return _json(_consent_json(node, member.state.consents[hash_from_hex(cid, "consent id")]))


@router.get("/fhir/Consent/{cid}", summary="read a consent")
async def read_consent(cid: str, node: NodeDep, who: ConsentReader) -> Response:
    _, member = _sharing(node)
    record = member.state.consents.get(hash_from_hex(cid, "consent id"))
    own = await _own_fingerprint(node, who)
    if record is None or (own is not None and record.grant.patient != own):
        raise NotFound(f"no consent {cid}")
    return _json(_consent_json(node, record))


def _bundle(resources: list[dict[str, Any]], base: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {"fullUrl": f"{base}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in resources
        ],
    }


@router.get("/fhir/Consent", summary="search consents")
async def search_consent(
    request: Request,
    node: NodeDep,
    who: ConsentReader,
    patient: Annotated[str | None, Query(pattern=_FINGERPRINT)] = None,
) -> Response:
    _, member = _sharing(node)
    own = await _own_fingerprint(node, who)
    if own is not None:
        patient = own
    records = (
        member.state.consents_of(patient)
        if patient is not None
        else sorted(member.state.consents.values(), key=lambda r: r.height)
    )
    return _json(
        _bundle([_consent_json(node, r) for r in records], f"{fhir_base(request)}/Consent")
    )


@router.get("/fhir/AuditEvent", summary="a patient's access trail")
async def audit_events(
    request: Request,
    node: NodeDep,
    who: TrailReader,
    patient: Annotated[str | None, Query(pattern=_FINGERPRINT)] = None,
) -> Response:
    own = await _own_fingerprint(node, who)
    fingerprint = own or patient
    if fingerprint is None:
        raise InvalidInput("search AuditEvent by patient (the patient's key fingerprint)")
    index = node.trail_index()
    await index.catch_up_async()
    trail = index.trail(fingerprint)
    events = [
        audit_event(i, tx_hash=i["tx"], time_ms=i["time_ms"], chain=i["chain"])
        if i["type"] == "access"
        else identity_audit_event(i, tx_hash=i["tx"], time_ms=i["time_ms"])
        for i in trail
        if i["type"] == "access" or "event" in i
    ]
    return _json(_bundle(events, f"{fhir_base(request)}/AuditEvent"))


@router.get("/share/{holder}", summary="list what a consent lets this node fetch")
async def share_list(
    holder: str, node: NodeDep, who: Clinician, consent: Annotated[str, Query()]
) -> Response:
    sharing, _ = _sharing(node)
    entries = await sharing.list(holder, consent)
    return _json({"holder": holder, "consent": consent, "entries": entries})


@router.get("/share/{holder}/{resource_type}/{rid}", summary="verified cross-institution fetch")
async def share_fetch(
    holder: str,
    resource_type: str,
    rid: str,
    node: NodeDep,
    who: Clinician,
    consent: Annotated[str, Query()],
    version: Annotated[int | None, Query(ge=1, le=2**31)] = None,
) -> Response:
    sharing, _ = _sharing(node)
    target = f"{resource_type}/{rid}" + (f"/_history/{version}" if version else "")
    shared = await sharing.fetch(holder, consent, target)
    return _json({"resource": shared.resource, "provenance": shared.provenance})
