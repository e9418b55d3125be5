"""FHIR R4 REST interactions at ``/fhir`` over the records service.

create (POST), read, vread, update (PUT with ``If-Match``), delete (erasure),
instance and type ``_history``, search (``searchset`` Bundles with paging),
``transaction`` Bundles, and ``metadata``. Status codes, ``ETag``,
``Location`` and ``Last-Modified`` as the FHIR RESTful API specifies; every
error is an OperationOutcome (``api.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from datetime import datetime
from email.utils import format_datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlencode

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from medledger.api.auth import require
from medledger.api.clinical_reads import (
    ABSENT as _ABSENT,
)
from medledger.api.clinical_reads import (
    as_absent_for_patients as _as_absent_for_patients,
)
from medledger.api.clinical_reads import (
    audited as _audited,
)
from medledger.api.clinical_reads import (
    digits as _digits,
)
from medledger.api.clinical_reads import fhir_base
from medledger.api.clinical_reads import (
    int_value as _int_value,
)
from medledger.api.clinical_reads import (
    lenient as _lenient,
)
from medledger.api.clinical_reads import (
    patient_gate as _patient_gate,
)
from medledger.api.clinical_reads import (
    patient_may_see as _patient_may_see,
)
from medledger.api.clinical_reads import (
    readable_types as _readable_types,
)
from medledger.api.clinical_reads import (
    within_read_scopes as _within_read_scopes,
)
from medledger.api.deps import NodeDep, Records
from medledger.api.errors import Forbidden, TooLarge, UnsupportedMediaType, error_outcome
from medledger.api.negotiation import JSON_PATCH, check_formats
from medledger.api.oauth import oauth_uris_extension, public_url
from medledger.api.responses import StoredResourceResponse, fhir_response, raw_fhir_response
from medledger.core.errors import (
    Gone,
    InvalidInput,
    MedledgerError,
    NotFound,
    PreconditionFailed,
)
from medledger.node import Node
from medledger.services.conditional import parse_criteria
from medledger.services.fhir import (
    MAX_BODY_BYTES,
    FhirInvalid,
    Issue,
    dump_resource,
    load_json,
    model_type_names,
    operation_outcome,
    validate_id,
)
from medledger.services.history import TimeRange, current_during, parse_time_range
from medledger.services.patching import apply_json_patch, apply_merge_patch
from medledger.services.records.model import StoredResource, VersionInfo
from medledger.services.records.service import RecordsService
from medledger.services.search import is_chain, known_parameter
from medledger.services.search_registry import registry
from medledger.storage.ports import TokenInfo

__all__ = ["clinical_reader", "declared_search", "read_answer", "router", "vread_answer"]

router = APIRouter(prefix="/fhir", tags=["FHIR"], dependencies=[Depends(check_formats)])
#: The token check of every clinical read: a dependency of the FastAPI routes, and
#: called as is by the lean read path (``api.lean_reads``).
clinical_reader = require("clinician", "patient")
Clinical = Annotated[TokenInfo, Depends(clinical_reader)]
Writer = Annotated[TokenInfo, Depends(require("clinician"))]


@functools.lru_cache(maxsize=4096)
def _http_date(instant: str) -> str:
    # Pure, and the same few instants come back on every read of a busy record.
    return format_datetime(datetime.fromisoformat(instant.replace("Z", "+00:00")), usegmt=True)


def _headers(s: StoredResource) -> dict[str, str]:
    return {
        "ETag": f'W/"{s.version}"',
        "Last-Modified": _http_date(s.last_updated),
        "Location": f"/fhir/{s.resource_type}/{s.id}/_history/{s.version}",
    }


def _stored_answer(s: StoredResource) -> Response:
    """What a read or vread answers: ``raw_fhir_response(s.data, headers=_headers(s))``."""
    return StoredResourceResponse(
        s.data,
        etag=f'W/"{s.version}"',
        last_modified=_http_date(s.last_updated),
        location=f"/fhir/{s.resource_type}/{s.id}/_history/{s.version}",
    )


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    """The request's JSON body, refused (413) past ``limit`` bytes before it is all read."""
    return load_json(await read_raw_body(request, limit), max_bytes=limit)


async def read_raw_body(request: Request, limit: int) -> bytes:
    """The request's body bytes, refused (413) past ``limit`` bytes before it is all read."""
    length = request.headers.get("content-length")
    if length is not None and _digits(length) and int(length) > limit:
        raise TooLarge(f"request body is {length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_type(resource_type: str) -> str:
    if not resource_type.isalpha() or not resource_type[0].isupper():
        raise InvalidInput(f"{resource_type!r} is not a FHIR resource type")
    return resource_type


def _if_match(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not _digits(text):
        raise InvalidInput(f'If-Match must be a version ETag like W/"3", got {value!r}')
    return int(text)


# -- capability statement ------------------------------------------------------------------


#: Consent and AuditEvent live on the consortium and private chains (api.sharing):
#: a node that joined a consortium serves them, searched by the patient's key fingerprint.
_PATIENT_KEY_PARAM: dict[str, Any] = {
    "name": "patient",
    "type": "token",
    "documentation": "the patient's key fingerprint (hex SHA-256 of the public key)",
}
_CONSORTIUM_RESOURCES: list[dict[str, Any]] = [
    {
        "type": "Consent",
        "documentation": "create = grant and update to inactive = revoke, each carrying the "
        "patient-signed consortium transaction",
        "interaction": [{"code": c} for c in ("read", "create", "update", "search-type")],
        "searchParam": [_PATIENT_KEY_PARAM],
    },
    {
        "type": "AuditEvent",
        "documentation": "every read of a patient's records, allowed or refused, and every "
        "enrollment, key rotation and break-glass re-binding of the patient's key, from the chains",
        "interaction": [{"code": "search-type"}],
        "searchParam": [_PATIENT_KEY_PARAM],
    },
]


@functools.cache
def declared_search() -> dict[str, list[dict[str, str]]]:
    """Each type medledger holds, with the search parameters the registry serves for it.

    The same registry decides what is indexed and what a search may ask for,
    so the statement declares exactly what works.
    """
    declared: dict[str, list[dict[str, str]]] = {}
    holdable = model_type_names()
    for rtype, params in registry().by_type.items():
        if rtype in ("Consent", "AuditEvent") or rtype.lower() not in holdable:
            continue  # Consent and AuditEvent are served from the chains (below)
        declared[rtype] = [
            {"name": p.code, "definition": p.url, "type": p.type} for p in params.values()
        ]
    return declared


_VALIDATE = {
    "name": "validate",
    "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
}
_BULK = "http://hl7.org/fhir/uv/bulkdata"
#: Operations served for one type beside ``$validate`` (``api.everything``, ``api.bulk``).
_TYPE_OPERATIONS: dict[str, list[dict[str, str]]] = {
    "Patient": [
        {
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
        },
        {"name": "export", "definition": f"{_BULK}/OperationDefinition/patient-export"},
    ],
    "Group": [{"name": "export", "definition": f"{_BULK}/OperationDefinition/group-export"}],
}
#: Whole-system operations (``api.bulk``).
_SYSTEM_OPERATIONS = [{"name": "export", "definition": f"{_BULK}/OperationDefinition/export"}]


@router.get("/metadata", summary="CapabilityStatement")
async def metadata(request: Request, node: NodeDep) -> Response:
    """What this server supports — only what is implemented (no auth needed)."""
    base = public_url(request)
    interactions = [
        {"code": c}
        for c in (
            "read",
            "vread",
            "update",
            "patch",
            "delete",
            "history-instance",
            "history-type",
            "create",
            "search-type",
        )
    ]
    resources = [
        {
            "type": rtype,
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "operation": [_VALIDATE, *_TYPE_OPERATIONS.get(rtype, [])],
            "interaction": interactions,
            "searchParam": search_parameters,
        }
        for rtype, search_parameters in declared_search().items()
    ]
    if node.consortium is not None:
        resources.extend(_CONSORTIUM_RESOURCES)  # served from the chains (api.sharing)
    return fhir_response(
        {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-11-25",
            "kind": "instance",
            "software": {"name": "medledger", "version": request.app.version},
            "implementation": {"description": f"medledger node {node.config.name}"},
            "instantiates": [f"{_BULK}/CapabilityStatement/bulk-data"],
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json", "json"],
            "rest": [
                {
                    "mode": "server",
                    "security": {
                        "cors": False,
                        "service": [
                            {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/"
                                        "restful-security-service",
                                        "code": "SMART-on-FHIR",
                                    }
                                ]
                            }
                        ],
                        # The node's configured URL, never the request's Host header (FHIR
                        # allows no empty array: no URL, no extension).
                        **({"extension": [oauth_uris_extension(base)]} if base else {}),
                        "description": "SMART on FHIR (see /.well-known/smart-configuration),"
                        " or bearer tokens issued with 'medledger token create'.",
                    },
                    "resource": resources,
                    "interaction": [{"code": "transaction"}, {"code": "batch"}],
                    "operation": _SYSTEM_OPERATIONS,
                }
            ],
        }
    )


# -- whole-system ------------------------------------------------------------------------


#: A Bundle may be a whole patient's record (thousands of entries, several MB) —
#: larger than one resource may be, still bounded: parsing holds it all in memory.
MAX_BUNDLE_BYTES = 32 * 1024 * 1024


@router.post("", summary="transaction (all-or-nothing) or batch Bundle")
async def transaction(request: Request, records: Records, who: Writer) -> Response:
    bundle = await read_body(request, limit=MAX_BUNDLE_BYTES)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidInput("POST /fhir takes a Bundle of type 'transaction' or 'batch'")
    if bundle.get("type") == "batch":
        return fhir_response(await records.batch(bundle, _batch_outcome))
    return fhir_response(await records.transaction(bundle))


def _batch_outcome(exc: MedledgerError) -> tuple[int, dict[str, Any]]:
    """A refused batch entry's answer; a server fault fails the whole request instead."""
    status, outcome = error_outcome(exc)
    if status >= 500:
        raise exc
    return status, outcome


# -- type level --------------------------------------------------------------------------


@router.post("/{resource_type}", summary="create", status_code=201, response_class=Response)
async def create(
    resource_type: str,
    request: Request,
    node: NodeDep,
    who: Writer,
    if_none_exist: Annotated[str | None, Header()] = None,
) -> Response:
    resource = await read_body(request)
    if not isinstance(resource, dict) or resource.get("resourceType") != _check_type(resource_type):
        raise InvalidInput(f"body must be a {resource_type} resource")
    if if_none_exist is None:
        # Criteria in the query string (POST Type?criteria) are a conditional create too:
        # fhirpy's get_or_create sends them so.
        if not set(request.query_params) - {"_format", "_pretty"}:
            stored = await node.records.create(resource)
            return _written(request, stored, 201)
        if_none_exist = request.url.query
    criteria = parse_criteria(if_none_exist, resource_type)
    conditional = node.conditional
    async with conditional.lock(resource_type):
        match = await conditional.match(resource_type, criteria)
        if match.id is None:
            stored = await node.records.create(resource)
            return _written(request, stored, 201)
    # FHIR R4 §3.1.0.8: one match is "200 OK" with nothing created; showing it is a read.
    async with _audited(node, who, resource_type, match.id) as shown:
        existing = await node.records.read(resource_type, match.id)
        shown.append(existing)
    return _written(request, existing, 200)


@router.post("/{resource_type}/$validate", summary="$validate (type level)")
async def validate_type(
    resource_type: str, request: Request, records: Records, who: Writer
) -> Response:
    """FHIR R4 ``$validate``: 200 with an OperationOutcome whether or not the resource is valid.

    The body is the resource, or a ``Parameters`` with it as ``resource``.
    Nothing is stored and nothing reaches a chain.
    """
    rtype = _check_type(resource_type)
    resource = _validate_input(await read_body(request))
    return await _validation_outcome(records, resource, rtype)


@router.post("/{resource_type}/{rid}/$validate", summary="$validate (instance level)")
async def validate_instance(
    resource_type: str, rid: str, request: Request, records: Records, who: Writer
) -> Response:
    """``$validate`` of an update of this resource: the body's id must be ``rid``."""
    rtype, rid = _check_type(resource_type), validate_id(rid)
    resource = _validate_input(await read_body(request))
    if isinstance(resource, dict) and resource.get("id") != rid:
        issue = Issue(
            severity="error",
            code="invalid",
            diagnostics="an update of this resource must carry the id of the URL",
            expression=(f"{rtype}.id",),
        )
        return fhir_response(operation_outcome([issue]))
    return await _validation_outcome(records, resource, rtype)


def _validate_input(body: Any) -> Any:
    """The resource to validate: the body, or the ``resource`` of a ``Parameters`` body."""
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        for param in body.get("parameter") or []:
            if isinstance(param, dict) and param.get("name") == "resource":
                return param.get("resource")
        raise InvalidInput("$validate takes the resource, or Parameters with a 'resource'")
    return body


async def _validation_outcome(records: RecordsService, resource: Any, rtype: str) -> Response:
    try:
        await records.validate(resource, expected_type=rtype)
    except FhirInvalid as exc:
        return fhir_response(operation_outcome(exc.issues))
    ok = Issue(severity="information", code="informational", diagnostics="the resource is valid")
    return fhir_response(operation_outcome([ok]))


@router.get("/_history", summary="system history")
async def system_history(request: Request, node: NodeDep, who: Writer) -> Response:
    """Every version of every resource, newest first; ``_count``, ``_offset``, ``_since``,
    ``_at`` (the versions current at some moment of that date or instant)."""
    return await _paged_history(request, node, who, None)


@router.get("/{resource_type}/_history", summary="type history")
async def type_history(
    resource_type: str, request: Request, node: NodeDep, who: Writer
) -> Response:
    """Every version of the type's resources, newest first; ``_count``, ``_offset``,
    ``_since``, ``_at`` (the versions current at some moment of that date or instant)."""
    return await _paged_history(request, node, who, _check_type(resource_type))


async def _paged_history(
    request: Request, node: Node, who: TokenInfo, resource_type: str | None
) -> Response:
    count = _int_param(request, "_count", 100, 1, 1000)
    offset = _int_param(request, "_offset", 0, 0, 10**9)
    since, at = _time_param(request, "_since"), _time_param(request, "_at")
    async with _audited(node, who, resource_type or "*") as shown:
        versions, more = await node.records.history_page(
            resource_type,
            since_ms=None if since is None else since[0],
            offset=offset,
            count=count,
            at=at,
        )
        shown.extend(v.stored for v in versions if v.stored is not None)
    path = "_history" if resource_type is None else f"{resource_type}/_history"
    return fhir_response(_history_bundle(request, versions, path, offset, count, more))


def _time_param(request: Request, name: str) -> TimeRange | None:
    text = request.query_params.get(name)
    return None if text is None else parse_time_range(name, text)


@router.get("/{resource_type}", summary="search")
async def search(resource_type: str, request: Request, node: NodeDep, who: Clinical) -> Response:
    async with _audited(node, who, resource_type) as shown:
        pairs = list(request.query_params.multi_items())
        return await _search(resource_type, request, node.records, who, shown, pairs)


@router.post("/{resource_type}/_search", summary="search (parameters in a form body)")
async def search_by_post(
    resource_type: str, request: Request, node: NodeDep, who: Clinical
) -> Response:
    """FHIR R4 §3.1.0.8.1: the same search, its parameters in an urlencoded form body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise InvalidInput("POST _search takes an application/x-www-form-urlencoded body")
    body = await read_raw_body(request, MAX_SEARCH_BODY_BYTES)
    try:
        form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise InvalidInput("the form body is not UTF-8") from None
    async with _audited(node, who, resource_type) as shown:
        pairs = [*request.query_params.multi_items(), *form]
        return await _search(resource_type, request, node.records, who, shown, pairs)


#: A POST _search body holds parameters only: a few kilobytes at most.
MAX_SEARCH_BODY_BYTES = 64 * 1024
#: Result parameters: they shape the answer, they select nothing.
#: ``_totalMethod`` is what fhirpy's ``count()`` sends (an Aidbox name for ``_total``).
_RESULT_PARAMS = {
    "_count",
    "_offset",
    "_format",
    "_summary",
    "_elements",
    "_total",
    "_totalMethod",
    "_pretty",
}
#: Result parameters that may repeat.
_LIST_PARAMS = {"_sort", "_include", "_revinclude", "_include:iterate", "_revinclude:iterate"}
_SUMMARIES = {"count", "false", "true", "text", "data"}


def _elements_of(text: str | None) -> set[str] | None:
    if text is None:
        return None
    names = {n.strip() for n in text.split(",") if n.strip()}
    if not names or not all(n.isascii() and n.replace("_", "").isalnum() for n in names):
        raise InvalidInput("_elements takes a comma separated list of element names")
    return names


def _subset(resource: dict[str, Any], elements: set[str] | None) -> dict[str, Any]:
    """``_elements``: the named top-level elements and the mandatory ones, tagged SUBSETTED."""
    if elements is None:
        return resource
    kept = {k: v for k, v in resource.items() if k in elements or k in ("resourceType", "id")}
    meta = dict(resource.get("meta") or {})
    tag = {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "SUBSETTED",
    }
    meta["tag"] = [*meta.get("tag", []), tag]
    return {**kept, "meta": meta}


async def _search(
    resource_type: str,
    request: Request,
    records: RecordsService,
    who: TokenInfo,
    shown: list[StoredResource],
    pairs: list[tuple[str, str]],
) -> Response:
    _check_type(resource_type)
    lenient = _lenient(request)
    params: dict[str, list[str]] = {}
    results: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    for key, value in pairs:
        if key in _RESULT_PARAMS:
            results[key] = value
        elif key in _LIST_PARAMS:
            lists.setdefault(key, []).append(value)
        elif lenient and not known_parameter(resource_type, key):
            continue  # ignored, and left out of the self link, as the specification asks
        else:
            params.setdefault(key, []).append(value)
    count = _int_value(results.get("_count"), "_count", 50, 0, 500)
    offset = _int_value(results.get("_offset"), "_offset", 0, 0, 10**9)
    summary = results.get("_summary", "false")
    if summary not in _SUMMARIES:
        raise InvalidInput(f"_summary must be one of {', '.join(sorted(_SUMMARIES))}")
    if summary == "count":
        count = 0
    elements = _elements_of(results.get("_elements"))
    if who.role == "patient" and resource_type == "Patient":
        if params:
            raise InvalidInput("a patient token searches Patient without parameters (itself)")
        found = [await records.read("Patient", str(who.patient))]
        total, page = len(found), found[offset : offset + count]
    else:
        if who.role == "patient":
            # These reach into other records than the patient's own (to match or to add).
            reaching = ("_has", "_include", "_revinclude")
            if any(is_chain(k) or k.split(":")[0] in reaching for k in (*params, *lists)):
                raise InvalidInput(
                    "a patient token searches its own records only: no chained parameters, "
                    "_has, _include or _revinclude"
                )
            params["patient"] = [f"Patient/{who.patient}"]
        elif _readable_types(who, None) is not None and any(
            is_chain(k) or k.split(":")[0] == "_has" for k in params
        ):
            # A chain or _has matches on another type's values: an answer would tell a
            # token scoped to this type what those hold (a Patient's name, say).
            raise Forbidden(
                "chained parameters and _has need read scopes on every type (user/*.read)"
            )
        total, page = await records.search_page(
            resource_type, params, offset, count, sort=lists.get("_sort", [])
        )
        for stored in page:  # second line: each is this patient's (raises if not)
            _patient_may_see(who, stored)
    include = [(v, False) for v in lists.get("_include", [])]
    include += [(v, True) for v in lists.get("_include:iterate", [])]
    revinclude = [(v, False) for v in lists.get("_revinclude", [])]
    revinclude += [(v, True) for v in lists.get("_revinclude:iterate", [])]
    extra = await records.included(page, include, revinclude) if include or revinclude else []
    extra = _within_read_scopes(who, extra)
    shown.extend(page)
    shown.extend(extra)
    base = f"{fhir_base(request)}/{resource_type}"
    kept = [(k, v) for k, v in results.items() if k not in ("_count", "_offset")]
    kept += [(k, v) for k, vs in lists.items() for v in vs]

    def page_url(at: int) -> str:
        # Percent-encoded: a value holding '&', '=', '#' or '%' must come back intact.
        used = [(k, v) for k, vs in params.items() for v in vs]
        return f"{base}?{urlencode([*used, *kept, ('_count', count), ('_offset', at)])}"

    links = [{"relation": "self", "url": page_url(offset)}]
    if count and offset + count < total:
        links.append({"relation": "next", "url": page_url(offset + count)})

    def searchset() -> bytes:
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": links,
        }
        if page or extra:
            bundle["entry"] = [
                {
                    "fullUrl": f"{base}/{s.id}",
                    "resource": _subset(s.resource(), elements),
                    "search": {"mode": "match"},
                }
                for s in page
            ] + [
                {
                    "fullUrl": f"/fhir/{s.resource_type}/{s.id}",
                    "resource": s.resource(),
                    "search": {"mode": "include"},
                }
                for s in extra
            ]
        return dump_resource(bundle)

    # Up to 500 resources parsed and re-encoded: off the event loop too.
    return raw_fhir_response(await asyncio.to_thread(searchset))


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    return _int_value(request.query_params.get(name), name, default, lo, hi)


# -- instance level ------------------------------------------------------------------------


@router.get("/{resource_type}/{rid}", summary="read")
async def read(resource_type: str, rid: str, node: NodeDep, who: Clinical) -> Response:
    return await read_answer(node, who, resource_type, rid)


async def read_answer(node: Node, who: TokenInfo, resource_type: str, rid: str) -> Response:
    """FHIR read of ``resource_type/rid`` for an authenticated ``who``: the patient gate,
    the durable ``access`` entry, and the record as stored with its ETag and Last-Modified.

    What both the FastAPI route and the lean read path (``api.lean_reads``) answer.
    """
    async with _audited(node, who, resource_type, rid) as shown:
        rtype, rid = _check_type(resource_type), validate_id(rid)
        _patient_gate(node.records, who, rtype, rid)
        with _as_absent_for_patients(who):
            stored = await node.records.read(rtype, rid)
        _patient_may_see(who, stored)
        shown.append(stored)
    return _stored_answer(stored)


#: JSON Merge Patch (RFC 7386): what fhirpy and other clients send as a partial resource.
_MERGE_PATCH = ("application/merge-patch+json", "application/json")


@router.patch("/{resource_type}/{rid}", summary="patch (JSON Patch or JSON Merge Patch)")
async def patch(
    resource_type: str,
    rid: str,
    request: Request,
    records: Records,
    who: Writer,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    """FHIR R4 §3.1.0.5 with ``application/json-patch+json`` (or a JSON Merge Patch as
    ``application/merge-patch+json`` or ``application/json``); the result is a new version.

    The patch applies to the version read; if another write lands in between,
    the update is refused (412) rather than overwriting it.
    """
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind not in (JSON_PATCH, *_MERGE_PATCH):
        raise UnsupportedMediaType(
            f"a patch is sent as {JSON_PATCH} (or a JSON Merge Patch as application/json)"
        )
    rtype, rid = _check_type(resource_type), validate_id(rid)
    body = await read_body(request)
    current = await records.read(rtype, rid)
    expected = _if_match(if_match)
    if expected is not None and expected != current.version:
        raise PreconditionFailed(f"{rtype}/{rid} is at version {current.version}, not {expected}")
    apply = apply_json_patch if kind == JSON_PATCH else apply_merge_patch
    patched = apply(current.resource(), body)
    stored, _ = await records.update(rtype, rid, patched, if_match=current.version)
    return _written(request, stored, 200)


@router.put("/{resource_type}/{rid}", summary="update (or create with this id)")
async def update(
    resource_type: str,
    rid: str,
    request: Request,
    records: Records,
    who: Writer,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    resource = await read_body(request)
    if not isinstance(resource, dict):
        raise InvalidInput("body must be a FHIR resource")
    rtype, rid = _check_type(resource_type), validate_id(rid)
    _same_id(resource, rtype, rid)
    stored, created = await records.update(rtype, rid, resource, if_match=_if_match(if_match))
    return _written(request, stored, 201 if created else 200)


@router.put("/{resource_type}", summary="conditional update (PUT Type?criteria)")
async def conditional_update(
    resource_type: str,
    request: Request,
    node: NodeDep,
    who: Writer,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    """FHIR R4 §3.1.0.4.3: no match creates, one match is updated, several are 412."""
    rtype = _conditional_type(resource_type)
    criteria = parse_criteria(request.url.query, rtype)
    resource = await read_body(request)
    if not isinstance(resource, dict):
        raise InvalidInput("body must be a FHIR resource")
    conditional, records = node.conditional, node.records
    async with conditional.lock(rtype):
        match = await conditional.match(rtype, criteria)
        if match.id is not None:
            if "id" in resource:
                _same_id(resource, rtype, match.id)
            stored, created = await records.update(
                rtype, match.id, {**resource, "id": match.id}, if_match=_if_match(if_match)
            )
        elif "id" in resource:
            # No match and a client-chosen id: update-as-create, never over another record.
            rid = validate_id(resource["id"], f"{rtype}.id")
            stored, created = await records.update(rtype, rid, resource, if_match=0)
        else:
            stored, created = await records.create(resource), True
    return _written(request, stored, 201 if created else 200)


def _conditional_type(resource_type: str) -> str:
    """The type of a conditional update or delete; ``/fhir/metadata`` only answers GET."""
    if resource_type == "metadata":
        raise StarletteHTTPException(status_code=405, detail="Method Not Allowed")
    return _check_type(resource_type)


_PREFER_RETURN = re.compile(r"(?:^|[;,\s])return\s*=\s*\"?([A-Za-z]+)")


def _written(request: Request, stored: StoredResource, status: int) -> Response:
    """The answer to a create or update, shaped by ``Prefer: return=`` (FHIR R4 §3.1.0.9).

    ``representation`` (the default) is the resource as stored; ``minimal`` an
    empty body; ``OperationOutcome`` an informational outcome. The headers
    (Location, ETag, Last-Modified) are the same in all three.
    """
    found = _PREFER_RETURN.search(request.headers.get("prefer", ""))
    choice = found.group(1) if found else "representation"
    if choice == "minimal":
        return Response(status_code=status, headers=_headers(stored))
    if choice == "OperationOutcome":
        done = "created" if status == 201 else "updated"
        issue = Issue(
            severity="information",
            code="informational",
            diagnostics=f"{stored.resource_type}/{stored.id} {done} (version {stored.version})",
        )
        return fhir_response(operation_outcome([issue]), status=status, headers=_headers(stored))
    return raw_fhir_response(stored.data, status=status, headers=_headers(stored))


def _same_id(resource: dict[str, Any], resource_type: str, rid: str) -> None:
    """FHIR R4 update (§3.1.0.4): the body SHALL have an ``id`` equal to the URL's.

    Without this a body copied from another record (or with its id dropped)
    would silently overwrite the record the URL names.
    """
    if resource.get("id") != rid:
        missing = "id" not in resource
        raise FhirInvalid(
            [
                Issue(
                    severity="error",
                    code="required" if missing else "invalid",
                    diagnostics="the resource in the body has no id; an update must carry the "
                    "id of the URL"
                    if missing
                    else "the resource's id differs from the id in the URL",
                    expression=(f"{resource_type}.id",),
                )
            ]
        )


@router.delete("/{resource_type}/{rid}", summary="delete (older versions are kept)")
async def delete(
    resource_type: str,
    rid: str,
    records: Records,
    who: Writer,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    """FHIR delete: read answers 410 from now on, vread and history keep every version.

    Crypto-shredding erasure is the admin's ``POST /admin/records/{type}/{id}/erase``.
    """
    # FHIR R4 §3.1.0.7: deleting a deleted resource has no effect and answers 204 again.
    with contextlib.suppress(Gone):
        await records.delete(
            _check_type(resource_type), validate_id(rid), if_match=_if_match(if_match)
        )
    return Response(status_code=204)


@router.delete("/{resource_type}", summary="conditional delete (DELETE Type?criteria)")
async def conditional_delete(
    resource_type: str, request: Request, node: NodeDep, who: Writer
) -> Response:
    """FHIR R4 §3.1.0.7.1: no match is 204, one match is deleted, several are 412."""
    rtype = _conditional_type(resource_type)
    criteria = parse_criteria(request.url.query, rtype)
    conditional = node.conditional
    async with conditional.lock(rtype):
        match = await conditional.match(rtype, criteria)
        if match.id is not None:
            with contextlib.suppress(Gone):
                await node.records.delete(rtype, match.id)
    return Response(status_code=204)


@router.get("/{resource_type}/{rid}/_history", summary="instance history")
async def history(
    resource_type: str, rid: str, request: Request, node: NodeDep, who: Clinical
) -> Response:
    """Every version, newest first (deletions included); ``_count``, ``_offset``, ``_since``,
    ``_at`` (the versions current at some moment of that date or instant)."""
    async with _audited(node, who, resource_type, rid) as shown:
        rtype, rid = _check_type(resource_type), validate_id(rid)
        _patient_gate(node.records, who, rtype, rid, whole_history=True)
        with _as_absent_for_patients(who):
            versions = await node.records.history(rtype, rid)
        readable = [v.stored for v in versions if v.stored is not None]
        if who.role == "patient":
            if not readable:  # all erased: whose they were cannot be shown to a patient
                raise NotFound(_ABSENT)
            for stored in readable:
                _patient_may_see(who, stored)
        shown.extend(readable)
    since, at = _time_param(request, "_since"), _time_param(request, "_at")
    if since is not None:
        versions = [v for v in versions if v.updated_ms >= since[0]]
    if at is not None:
        versions = current_during(versions, [v.updated_ms for v in versions], at)
    count = _int_param(request, "_count", 100, 1, 1000)
    offset = _int_param(request, "_offset", 0, 0, 10**9)
    page, more = versions[offset : offset + count], len(versions) > offset + count
    path = f"{rtype}/{rid}/_history"
    bundle = _history_bundle(request, page, path, offset, count, more, total=len(versions))
    return fhir_response(bundle)


@router.get("/{resource_type}/{rid}/_history/{vid}", summary="vread")
async def vread(
    resource_type: str,
    rid: str,
    vid: Annotated[int, Path(ge=0, le=2**53)],
    node: NodeDep,
    who: Clinical,
) -> Response:
    return await vread_answer(node, who, resource_type, rid, vid)


async def vread_answer(
    node: Node, who: TokenInfo, resource_type: str, rid: str, vid: int
) -> Response:
    """FHIR vread of version ``vid`` (already checked: 0 to 2**53): as :func:`read_answer`."""
    async with _audited(node, who, resource_type, rid) as shown:
        rtype, rid = _check_type(resource_type), validate_id(rid)
        _patient_gate(node.records, who, rtype, rid, version=vid)
        with _as_absent_for_patients(who):
            stored = await node.records.vread(rtype, rid, vid)
        _patient_may_see(who, stored)
        shown.append(stored)
    return _stored_answer(stored)


def _history_bundle(
    request: Request,
    versions: list[VersionInfo],
    path: str,
    offset: int,
    count: int,
    more: bool,
    total: int | None = None,
) -> dict[str, Any]:
    """A ``history`` Bundle of one page: absolute, percent-encoded fullUrl and links."""
    base = fhir_base(request)
    kept = [(k, v) for k, v in request.query_params.multi_items() if k in ("_since", "_at")]

    def link(relation: str, at: int) -> dict[str, str]:
        query = urlencode([*kept, ("_count", str(count)), ("_offset", str(at))])
        return {"relation": relation, "url": f"{base}/{path}?{query}"}

    links = [link("self", offset)]
    if more:
        links.append(link("next", offset + count))
    if offset > 0:
        links.append(link("previous", max(0, offset - count)))
    entries = []
    for v in versions:
        url = f"{v.resource_type}/{quote(v.id, safe='')}"
        # A deletion, or a version erased (crypto-shredded) since: nothing to show.
        entry: dict[str, Any] = {
            "fullUrl": f"{base}/{url}",
            "request": {
                "method": "DELETE" if v.stored is None else "POST" if v.version == 1 else "PUT",
                "url": url,
            },
            "response": {
                "status": "204 No Content"
                if v.deleted
                else "410 Gone"
                if v.stored is None
                else "200 OK",
                "etag": f'W/"{v.version}"',
                "lastModified": v.last_updated,
            },
        }
        if v.stored is not None:
            entry["resource"] = v.stored.resource()
        entries.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history"}
    if total is not None:
        bundle["total"] = total
    return {**bundle, "link": links, "entry": entries}
