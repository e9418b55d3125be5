"""FHIR Bulk Data export (Bulk Data Access IG v2) at ``/fhir/$export`` and around it.

* Kick-off: ``GET|POST /fhir/$export`` (system: admin only), ``/fhir/Patient/$export``
  (clinician, admin; a patient token exports its own records only) and
  ``/fhir/Group/{id}/$export`` (clinician, admin). ``Prefer: respond-async`` is
  required; ``_type``, ``_since`` and ``_outputFormat`` (NDJSON) are served,
  other parameters refused unless ``Prefer: handling=lenient``. Answer: 202
  with ``Content-Location``, the job's status URL.
* Status: ``GET /fhir/$export-status/{job}``: 202 with ``X-Progress`` and
  ``Retry-After`` while it runs, 200 with the manifest when done;
  ``DELETE`` cancels and removes the files (202).
* Files: ``GET /fhir/$export-file/{job}/{name}``, NDJSON decrypted while it streams.

Status, files and cancel answer only the token that started the job: any
other gets 404, as for a job that never existed. Jobs and their encryption:
``services.bulk_export``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from medledger.api.auth import require
from medledger.api.clinical_reads import fhir_base, lenient, readable_types
from medledger.api.deps import NodeDep
from medledger.api.errors import Forbidden, NotAcceptable
from medledger.api.fhir import read_raw_body
from medledger.api.negotiation import check_formats
from medledger.api.responses import fhir_response
from medledger.core.errors import InvalidInput, StorageError
from medledger.node import Node
from medledger.services.bulk_export import BulkExports, ExportJob, ExportSpec
from medledger.services.fhir import MAX_BODY_BYTES, is_resource_type, load_json, validate_id
from medledger.services.history import parse_time_range
from medledger.storage.ports import TokenInfo

__all__ = ["NDJSON", "router"]

NDJSON = "application/fhir+ndjson"
_OUTPUT_FORMATS = {NDJSON, "application/ndjson", "ndjson"}
_SERVED = {"_type", "_since", "_outputFormat", "_format"}
router = APIRouter(prefix="/fhir", tags=["Bulk Data"])
Exporter = Annotated[TokenInfo, Depends(require("clinician", "patient"))]
#: Status, files and cancel: the job is the token's own (checked by id), and what it may
#: hold was narrowed to the token's scopes at kick-off.
JobOwner = Annotated[TokenInfo, Depends(require("clinician", "patient", scoped=False))]
JSON_ONLY = [Depends(check_formats)]


def _exports(node: Node) -> BulkExports:
    if node.exports is None:
        raise StorageError("bulk export is not running on this node yet")
    return node.exports


def _respond_async(request: Request) -> None:
    prefer = request.headers.get("prefer", "")
    if not any(p.strip().lower() == "respond-async" for p in prefer.split(",")):
        raise InvalidInput("a bulk export needs the header 'Prefer: respond-async'")


async def _pairs(request: Request) -> list[tuple[str, str]]:
    """The kick-off's parameters: the query string, and a ``Parameters`` body on POST."""
    pairs = list(request.query_params.multi_items())
    if request.method == "POST":
        raw = await read_raw_body(request, MAX_BODY_BYTES)
        if raw.strip():
            body = load_json(raw)
            if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
                raise InvalidInput("POST $export takes a Parameters resource (or no body)")
            for param in body.get("parameter") or []:
                name = param.get("name") if isinstance(param, dict) else None
                values = [v for k, v in param.items() if k.startswith("value")] if name else []
                if not isinstance(name, str) or len(values) != 1 or not isinstance(values[0], str):
                    raise InvalidInput("each $export parameter needs a name and one string value")
                pairs.append((name, values[0]))
    return pairs


async def _kick_off(
    request: Request, node: Node, who: TokenInfo, level: str, group: str | None = None
) -> Response:
    _respond_async(request)
    exports = _exports(node)
    tolerant = lenient(request)
    types: set[str] = set()
    since_ms: int | None = None
    for key, value in await _pairs(request):
        if key == "_type":
            names = {n.strip() for n in value.split(",") if n.strip()}
            if not names or not all(is_resource_type(n) for n in names):
                raise InvalidInput("_type takes a comma separated list of FHIR resource types")
            types |= names
        elif key == "_since":
            since_ms = parse_time_range("_since", value)[0]
        elif key == "_outputFormat":
            if value not in _OUTPUT_FORMATS:
                raise InvalidInput(f"_outputFormat must be {NDJSON}")
        elif key not in _SERVED and not tolerant:
            raise InvalidInput(f"$export does not support the parameter {key!r}")
    # The kick-off as the client sent it, but on this node's configured URL (not Host).
    query = request.url.query
    request_url = f"{fhir_base(request)}{request.url.path.removeprefix('/fhir')}"
    request_url += f"?{query}" if query else ""
    allowed = readable_types(who, frozenset(types) if types else None)
    spec = ExportSpec(
        level=level,
        request=request_url,
        types=None if allowed is None else tuple(sorted(allowed)),
        since_ms=since_ms,
        group=group,
        patient=str(who.patient) if who.role == "patient" else None,
    )
    if group is not None:
        # The Group must exist now: a kick-off for a Group that is not there is a 404.
        await node.records.read("Group", group)
    job = exports.submit(spec, owner=who.owner, actor=f"{who.role}:{who.id}")
    status_url = f"{fhir_base(request)}/$export-status/{job.id}"
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": "the export was accepted; poll the Content-Location URL",
            }
        ],
    }
    return fhir_response(outcome, status=202, headers={"Content-Location": status_url})


@router.get("/$export", summary="Bulk Data export: system level", dependencies=JSON_ONLY)
@router.post("/$export", summary="Bulk Data export: system level", dependencies=JSON_ONLY)
async def export_system(request: Request, node: NodeDep, who: Exporter) -> Response:
    """Every resource this node holds: an operator's export, for admin tokens only."""
    if who.role != "admin":
        raise Forbidden("a system-level export is for admin tokens; export patients instead")
    return await _kick_off(request, node, who, "system")


@router.get("/Patient/$export", summary="Bulk Data export: patients", dependencies=JSON_ONLY)
@router.post("/Patient/$export", summary="Bulk Data export: patients", dependencies=JSON_ONLY)
async def export_patients(request: Request, node: NodeDep, who: Exporter) -> Response:
    """Every patient's compartment; a patient token: its own patient's records only."""
    return await _kick_off(request, node, who, "patient")


@router.get("/Group/{gid}/$export", summary="Bulk Data export: a Group", dependencies=JSON_ONLY)
@router.post("/Group/{gid}/$export", summary="Bulk Data export: a Group", dependencies=JSON_ONLY)
async def export_group(gid: str, request: Request, node: NodeDep, who: Exporter) -> Response:
    """The compartments of the Patients the Group's ``member.entity`` names."""
    if who.role == "patient":
        raise Forbidden("a patient token exports its own records: use Patient/$export")
    return await _kick_off(request, node, who, "group", validate_id(gid))


def _http_date(ms: int) -> str:
    return format_datetime(datetime.fromtimestamp(ms / 1000, UTC), usegmt=True)


@router.get("/$export-status/{job_id}", summary="Bulk Data export: status and manifest")
async def export_status(job_id: str, request: Request, node: NodeDep, who: JobOwner) -> Response:
    exports = _exports(node)
    job = exports.job(job_id, who.owner)
    if not job.complete:
        return Response(status_code=202, headers={"X-Progress": job.progress(), "Retry-After": "2"})
    manifest = exports.manifest(job, f"{fhir_base(request)}/$export-file")
    return fhir_response(
        manifest,
        headers={"Content-Type": "application/json", **_expires(exports, job)},
    )


def _expires(exports: BulkExports, job: ExportJob) -> dict[str, str]:
    if job.finished_ms is None:
        return {}
    return {"Expires": _http_date(job.finished_ms + exports.ttl_ms)}


@router.delete("/$export-status/{job_id}", summary="Bulk Data export: cancel")
async def export_cancel(job_id: str, node: NodeDep, who: JobOwner) -> Response:
    """Cancel the job (or forget a finished one) and remove its files."""
    await _exports(node).cancel(job_id, who.owner)
    outcome: dict[str, Any] = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": "the export was cancelled and its files removed",
            }
        ],
    }
    return fhir_response(outcome, status=202)


def _accepts_ndjson(request: Request) -> bool:
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return True
    kinds = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(kinds & {NDJSON, "application/ndjson", "*/*", "application/*"})


@router.get("/$export-file/{job_id}/{name}", summary="Bulk Data export: one NDJSON file")
async def export_file(
    job_id: str, name: str, request: Request, node: NodeDep, who: JobOwner
) -> Response:
    """The file's NDJSON, decrypted while it streams; the job's files go after the last."""
    if not _accepts_ndjson(request):
        raise NotAcceptable(f"export files are {NDJSON}")
    stream = await _exports(node).download(job_id, who.owner, name)
    return StreamingResponse(
        stream,
        media_type=NDJSON,
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"},
    )
