"""``/admin``: operations on a running node that only an ``admin`` token may ask for.

* ``POST /admin/keys/rotate`` — a new key-encryption key: every data key is
  re-wrapped (no record is re-encrypted), a ``key.rotate`` transaction goes on
  the private chain, and the old key is destroyed. Answers with the rotation
  summary ``{"old": id, "new": id, "rewrapped": n}``.

``medledger keys rotate --dir`` does the same on a stopped node; this endpoint
is for a node that is serving (its keystore is open in the node process).

* ``POST /admin/records/{type}/{id}/erase`` — crypto-shredding erasure of one
  record: every version's data key and blob destroyed, a ``record.erase``
  tombstone on the private chain. (A FHIR ``DELETE`` keeps older versions.)

* ``POST /admin/patients/{id}/rebind`` — break-glass: bind a Patient to a new
  wallet key without the bound key's signature (the patient lost it, or it
  was stolen). Body ``{"patient_key", "signature"}``: the new key must still
  sign its enrollment statement. Announced on the consortium, then committed
  on the private chain, naming this admin token; both keys' trails show it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medledger.api.auth import require
from medledger.api.deps import NodeDep, Records
from medledger.api.errors import Forbidden
from medledger.api.fhir import read_body
from medledger.api.responses import fhir_response
from medledger.api.sharing import wallet_key
from medledger.core.errors import InvalidInput
from medledger.core.models import Signature
from medledger.services.fhir import is_resource_type, validate_id
from medledger.storage.ports import TokenInfo

__all__ = ["router"]

router = APIRouter(prefix="/admin", tags=["operations"])


async def _node_admin(who: Annotated[TokenInfo, Depends(require("admin"))]) -> TokenInfo:
    """An admin API token itself, never an access token a sign-in issued for it.

    SMART scopes speak of FHIR resources: an app an administrator approved for
    ``user/*.*`` must not thereby erase records, rotate keys or re-bind patients.
    """
    if who.scopes is not None:
        raise Forbidden("administration needs the admin API token, not a sign-in's access token")
    return who


Admin = Annotated[TokenInfo, Depends(_node_admin)]


@router.post("/patients/{rid}/rebind", summary="break-glass re-binding of a patient's key")
async def rebind_patient(rid: str, request: Request, node: NodeDep, who: Admin) -> Response:
    body = await read_body(request)
    if not isinstance(body, dict) or set(body) != {"patient_key", "signature"}:
        raise InvalidInput("rebind takes exactly patient_key (hex DER) and signature")
    result = await node.enrollments.rebind(
        validate_id(rid),
        wallet_key(body["patient_key"]),
        Signature.from_json(body["signature"]),
        actor=f"admin:{who.id}",
    )
    return fhir_response(
        {"patient": f"Patient/{rid}", **result}, headers={"Content-Type": "application/json"}
    )


@router.post("/records/{resource_type}/{rid}/erase", summary="crypto-shredding erasure of a record")
async def erase_record(resource_type: str, rid: str, records: Records, who: Admin) -> Response:
    """Destroy every version's data key and blob; a ``record.erase`` tombstone goes on the chain.

    Unlike a FHIR delete (which keeps the older versions readable) nothing of
    the record can be read afterwards, by anyone: vread and history say 410.
    """
    if not is_resource_type(resource_type):
        raise InvalidInput(f"{resource_type!r} is not a FHIR resource type")
    versions = await records.erase(resource_type, validate_id(rid))
    return fhir_response(
        {"erased": f"{resource_type}/{rid}", "versions": versions},
        headers={"Content-Type": "application/json"},
    )


@router.post("/keys/rotate", summary="rotate the key-encryption key")
async def rotate_keys(records: Records, who: Admin) -> Response:
    summary = await records.rotate_kek()
    return fhir_response(summary, headers={"Content-Type": "application/json"})
