"""``Patient/[id]/$everything`` (GET and POST): a patient's compartment as a paged searchset.

FHIR R4 §Patient-operations: the Patient, every resource in its compartment
(the Patient CompartmentDefinition, ``services.compartments``) and what those
refer to that is about no other patient (Practitioner, Organization, Location,
Medication, Device...). ``_since``, ``_type`` and ``_count`` (with ``_offset``
in the next links) as the operation defines them; ``start`` and ``end`` (care
dates) are not supported and refused unless ``Prefer: handling=lenient``.

Access is search's: a patient token only for its own Patient, and then only
the resources about that patient (no referenced Practitioner or Organization:
a patient token reads its own records only). Every resource shown is an
``access`` entry, a refused patient token one refused entry in the trail of
the patient it reached for.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medledger.api.clinical_reads import (
    as_absent_for_patients,
    audited,
    fhir_base,
    int_value,
    lenient,
    patient_gate,
    patient_may_see,
    readable_types,
)
from medledger.api.deps import NodeDep
from medledger.api.fhir import Clinical, read_raw_body
from medledger.api.negotiation import check_formats
from medledger.api.responses import raw_fhir_response
from medledger.core.errors import InvalidInput
from medledger.services.fhir import (
    MAX_BODY_BYTES,
    dump_resource,
    is_resource_type,
    load_json,
    validate_id,
)
from medledger.services.history import parse_time_range
from medledger.storage.ports import TokenInfo, VersionRow

__all__ = ["router"]

router = APIRouter(prefix="/fhir", tags=["FHIR"], dependencies=[Depends(check_formats)])

#: A page holds at most this many compartment resources (and what they refer to).
MAX_COUNT = 500
DEFAULT_COUNT = 50
#: The operation's parameters medledger serves; ``start``/``end`` are refused.
_SERVED = {"_since", "_type", "_count", "_offset", "_format", "_pretty"}
_UNSUPPORTED = {"start", "end"}


@router.get("/Patient/{rid}/$everything", summary="Patient $everything")
async def everything(rid: str, request: Request, node: NodeDep, who: Clinical) -> Response:
    """The patient's compartment, one page (``_count``, ``_offset``) per request."""
    return await _everything(rid, request, node, who, list(request.query_params.multi_items()))


@router.post("/Patient/{rid}/$everything", summary="Patient $everything (Parameters body)")
async def everything_by_post(rid: str, request: Request, node: NodeDep, who: Clinical) -> Response:
    """The same, its parameters in a ``Parameters`` body (or the query string)."""
    pairs = list(request.query_params.multi_items())
    raw = await read_raw_body(request, MAX_BODY_BYTES)
    if raw.strip():
        pairs += _parameters_of(load_json(raw))
    return await _everything(rid, request, node, who, pairs)


def _parameters_of(body: Any) -> list[tuple[str, str]]:
    """A ``Parameters`` resource as ``(name, value)`` pairs (primitive values only)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidInput("POST $everything takes a Parameters resource (or no body)")
    pairs: list[tuple[str, str]] = []
    for param in body.get("parameter") or []:
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            raise InvalidInput("each Parameters.parameter needs a name")
        values = [v for k, v in param.items() if k.startswith("value")]
        if len(values) != 1 or not isinstance(values[0], (str, int)) or isinstance(values[0], bool):
            raise InvalidInput(f"parameter {param['name']!r} needs one primitive value[x]")
        pairs.append((param["name"], str(values[0])))
    return pairs


def _types_of(values: list[str]) -> frozenset[str] | None:
    if not values:
        return None
    names = {n.strip() for v in values for n in v.split(",") if n.strip()}
    if not names or not all(is_resource_type(n) for n in names):
        raise InvalidInput("_type takes a comma separated list of FHIR resource types")
    return frozenset(names)


async def _everything(
    rid: str, request: Request, node: NodeDep, who: TokenInfo, pairs: list[tuple[str, str]]
) -> Response:
    tolerant = lenient(request)
    single: dict[str, str] = {}
    type_values: list[str] = []
    for key, value in pairs:
        if key == "_type":
            type_values.append(value)
        elif key in _SERVED:
            single[key] = value
        elif key in _UNSUPPORTED and not tolerant:
            raise InvalidInput(f"$everything does not support {key!r} (care dates) here")
        elif not tolerant and key not in _UNSUPPORTED:
            raise InvalidInput(f"unknown $everything parameter {key!r}")
    count = int_value(single.get("_count"), "_count", DEFAULT_COUNT, 1, MAX_COUNT)
    offset = int_value(single.get("_offset"), "_offset", 0, 0, 10**9)
    since_text = single.get("_since")
    since = None if since_text is None else parse_time_range("_since", since_text)[0]
    types = readable_types(who, _types_of(type_values))
    records = node.records
    async with audited(node, who, "Patient", rid) as shown:
        rid = validate_id(rid)
        patient_gate(records, who, "Patient", rid)
        with as_absent_for_patients(who):
            patient = await records.read("Patient", rid)  # 404 or 410 as a read would
        patient_may_see(who, patient)
        own = records.patient_pseudonym(rid)
        rows = await records.compartment([rid], types)
        if who.role == "patient":
            # Only what is about this patient (the index's keyed pseudonym decides).
            rows = [r for r in rows if r.patient == own]
        if since is not None:
            rows = [r for r in rows if r.updated_ms >= since]
        page = await records.open_rows(rows[offset : offset + count])
        for stored in page:
            patient_may_see(who, stored)  # second line behind the pseudonym filter

        def admit(row: VersionRow) -> bool:
            # Referenced resources about another patient stay out (their own $everything).
            about_ok = row.patient == own if who.role == "patient" else row.patient in (None, own)
            return (
                about_ok
                and (types is None or row.resource_type in types)
                and (since is None or row.updated_ms >= since)
            )

        in_compartment = {(r.resource_type, r.id) for r in rows}
        extra = await records.referenced(page, in_compartment, admit)
        shown.extend(page)
        shown.extend(extra)
    base = fhir_base(request)
    kept = [("_since", since_text)] if since_text is not None else []
    kept += [("_type", v) for v in type_values]

    def page_url(at: int) -> str:
        # Absolute and percent-encoded, as search's links are.
        query = urlencode([*kept, ("_count", count), ("_offset", at)])
        return f"{base}/Patient/{quote(rid, safe='')}/$everything?{query}"

    links = [{"relation": "self", "url": page_url(offset)}]
    if offset + count < len(rows):
        links.append({"relation": "next", "url": page_url(offset + count)})
    if offset > 0:
        links.append({"relation": "previous", "url": page_url(max(0, offset - count))})
    total = len(rows)

    def searchset() -> bytes:
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": links,
        }
        entries = [
            {
                "fullUrl": f"{base}/{s.resource_type}/{quote(s.id, safe='')}",
                "resource": s.resource(),
                "search": {"mode": mode},
            }
            for mode, group in (("match", page), ("include", extra))
            for s in group
        ]
        if entries:
            bundle["entry"] = entries
        return dump_resource(bundle)

    return raw_fhir_response(await asyncio.to_thread(searchset))
