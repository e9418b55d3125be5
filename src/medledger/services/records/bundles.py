"""FHIR ``transaction`` and ``batch`` Bundles (FHIR R4 §3.1.0.11).

A transaction is all-or-nothing: every entry is planned (conditional
criteria searched, ``urn:uuid`` and conditional references resolved), every
resource validated, then all writes go in as one write — one index batch,
one chain block. Any failure — an invalid resource, an ``ifMatch`` that is
not the current version, criteria matching several resources, a conditional
reference that matches none or several — refuses the whole Bundle and
nothing is written.

A batch is a list of independent requests: each entry is applied as a
transaction of one and answered on its own (``batch-response``).

Entries: ``POST Type`` (``ifNoneExist`` honoured), ``PUT Type/id`` (the
body's id must be ``id``; ``ifMatch`` honoured), ``PUT Type?criteria``
(conditional update), ``DELETE Type/id``, ``DELETE Type?criteria``, and
``PATCH Type/id`` or ``PATCH Type?criteria`` whose resource is a ``Binary``
holding a JSON Patch (``contentType`` ``application/json-patch+json``, the
operations base64 in ``data``): applied to the current version, written with
that version as its ``ifMatch`` (or the entry's own), so nothing written in
between is lost.
Conditional searches run under the conditional-write lock of every type
involved (``services.conditional``), so they are not raced by other
conditional writes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from medledger.core.errors import InvalidInput, MedledgerError, NotFound, PreconditionFailed
from medledger.services.conditional import ConditionalWrites, parse_criteria
from medledger.services.fhir import (
    FhirInvalid,
    Issue,
    is_resource_type,
    validate_id,
    validate_resource,
)
from medledger.services.patching import apply_json_patch
from medledger.services.records.model import StoredResource, WriteIntent
from medledger.services.validation import Validator

__all__ = ["BundleContext", "apply_batch", "apply_transaction"]

#: Entries one Bundle may hold: a whole patient's record is a few thousand.
MAX_ENTRIES = 20_000


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleContext:
    """What applying a Bundle needs of the records service."""

    validator: Validator
    write_many: Callable[[Sequence[WriteIntent]], Awaitable[list[StoredResource]]]
    read: Callable[[str, str], Awaitable[StoredResource]]
    conditional: ConditionalWrites


@dataclass(slots=True, kw_only=True)
class _Entry:
    """One planned entry: a write, or an answer with nothing to write."""

    n: int
    method: Literal["POST", "PUT", "DELETE", "PATCH"]
    resource_type: str
    id: str | None = None
    resource: dict[str, Any] | None = field(default=None, repr=False)
    criteria: dict[str, list[str]] | None = None
    if_match: int | None = None
    full_url: str | None = None
    #: Set when planning finds nothing to write (ifNoneExist matched, delete of no match).
    answer: dict[str, Any] | None = None
    create: bool = False
    #: A PATCH entry's JSON Patch operations (applied once the current version is read).
    patch: Any = field(default=None, repr=False)


def _invalid(n: int, where: str, diagnostics: str, code: str = "invalid") -> FhirInvalid:
    suffix = f".{where}" if where else ""
    return FhirInvalid(
        [
            Issue(
                severity="error",
                code=code,
                diagnostics=diagnostics,
                expression=(f"Bundle.entry[{n}]{suffix}",),
            )
        ]
    )


def _version_etag(value: Any, n: int) -> int:
    text = str(value).strip().removeprefix("W/").strip('"')
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise _invalid(n, "request.ifMatch", 'ifMatch must be a version ETag like W/"3"')
    return int(text)


def _parse_entry(n: int, entry: Any) -> _Entry:
    if not isinstance(entry, dict):
        raise _invalid(n, "", "a Bundle entry must be a JSON object", "structure")
    request = entry.get("request")
    if not isinstance(request, dict):
        raise _invalid(n, "request", "every entry needs a request (method and url)", "required")
    method, url = request.get("method"), request.get("url")
    if method not in ("POST", "PUT", "DELETE", "PATCH") or not isinstance(url, str) or not url:
        raise _invalid(
            n, "request", "entries must POST, PUT, PATCH or DELETE, with a url", "not-supported"
        )
    resource = entry.get("resource")
    if method != "DELETE" and not isinstance(resource, dict):
        raise _invalid(n, "resource", f"a {method} entry needs a resource", "required")
    path, has_query, query = url.partition("?")
    parts = path.strip("/").split("/")
    rtype = parts[0]
    if not is_resource_type(rtype):
        raise _invalid(n, "request.url", f"{rtype!r} is not a FHIR resource type")
    operations = None
    if method == "PATCH":
        operations = _patch_operations(n, resource)
        resource = None  # the patched resource is made from the current version
    elif resource is not None and resource.get("resourceType") != rtype:
        raise _invalid(n, "resource.resourceType", f"the resource is not a {rtype}")
    full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
    planned = _Entry(n=n, method=method, resource_type=rtype, resource=resource, full_url=full_url)
    planned.patch = operations
    if request.get("ifMatch") is not None:
        planned.if_match = _version_etag(request["ifMatch"], n)
    if method == "POST":
        if len(parts) != 1 or has_query:
            raise _invalid(n, "request.url", f"a POST url is the type alone ({rtype})")
        if request.get("ifNoneExist") is not None:
            planned.criteria = _criteria(n, "request.ifNoneExist", request["ifNoneExist"], rtype)
        planned.create = True
        return planned
    if has_query:
        if len(parts) != 1:
            raise _invalid(n, "request.url", "a conditional url is Type?criteria")
        planned.criteria = _criteria(n, "request.url", query, rtype)
        return planned
    if len(parts) != 2:
        raise _invalid(n, "request.url", f"the url must be {rtype}/<id> or {rtype}?criteria")
    planned.id = validate_id(parts[1], f"Bundle.entry[{n}].request.url")
    if method == "PUT" and resource is not None and resource.get("id") != planned.id:
        raise _invalid(n, "resource.id", "the resource's id must be the id in the url")
    return planned


def _patch_operations(n: int, resource: Any) -> Any:
    """The JSON Patch a PATCH entry carries: a Binary of ``application/json-patch+json``."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary":
        raise _invalid(
            n, "resource", "a PATCH entry's resource is a Binary holding a JSON Patch", "required"
        )
    if resource.get("contentType") != "application/json-patch+json":
        raise _invalid(
            n,
            "resource.contentType",
            "only JSON Patch (application/json-patch+json) is applied",
            "not-supported",
        )
    data = resource.get("data")
    try:
        if not isinstance(data, str):
            raise ValueError
        return json.loads(base64.b64decode(data, validate=True))
    except (ValueError, binascii.Error):
        raise _invalid(
            n, "resource.data", "the JSON Patch must be base64 of a JSON array", "structure"
        ) from None


def _criteria(n: int, where: str, text: Any, rtype: str) -> dict[str, list[str]]:
    if not isinstance(text, str):
        raise _invalid(n, where, "search criteria must be a string")
    try:
        return parse_criteria(text, rtype)
    except InvalidInput as exc:
        raise _invalid(n, where, str(exc)) from None


def _conditional_references(value: Any, found: set[str]) -> None:
    """Every ``reference`` of the form ``Type?criteria`` anywhere in ``value``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("reference")
            if isinstance(ref, str) and "?" in ref and not ref.startswith(("http:", "https:")):
                found.add(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _resolve_refs(value: Any, urls: Mapping[str, str]) -> Any:
    """Replace local (``urn:uuid:…``, an entry's fullUrl) and conditional references."""
    if isinstance(value, dict):
        return {
            k: (
                urls.get(v, v)
                if k == "reference" and isinstance(v, str)
                else _resolve_refs(v, urls)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_resolve_refs(v, urls) for v in value]
    return value


def _response(status: str, stored: StoredResource | None) -> dict[str, Any]:
    response: dict[str, Any] = {"status": status}
    if stored is not None:
        response.update(
            location=f"{stored.resource_type}/{stored.id}/_history/{stored.version}",
            etag=f'W/"{stored.version}"',
            lastModified=stored.last_updated,
        )
    return {"response": response}


async def apply_transaction(bundle: Mapping[str, Any], ctx: BundleContext) -> dict[str, Any]:
    """Apply a ``transaction`` Bundle all-or-nothing; return the transaction-response."""
    _validate_shell(bundle)
    if bundle.get("type") != "transaction":
        raise InvalidInput("this takes a Bundle of type 'transaction'")
    entries = bundle.get("entry") or []
    if len(entries) > MAX_ENTRIES:
        raise InvalidInput(f"a Bundle may hold at most {MAX_ENTRIES} entries")
    planned = [_parse_entry(n, e) for n, e in enumerate(entries)]
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": await _apply(planned, ctx),
    }


async def apply_batch(
    bundle: Mapping[str, Any],
    ctx: BundleContext,
    outcome: Callable[[MedledgerError], tuple[int, dict[str, Any]]],
) -> dict[str, Any]:
    """Apply each entry of a ``batch`` Bundle on its own; return the batch-response.

    ``outcome`` maps a refused entry's error to its HTTP status and
    OperationOutcome (the API's one mapping).
    """
    if not isinstance(bundle.get("entry", []), list):
        raise InvalidInput("Bundle.entry must be a list")
    entries = bundle.get("entry") or []
    if len(entries) > MAX_ENTRIES:
        raise InvalidInput(f"a Bundle may hold at most {MAX_ENTRIES} entries")
    answers: list[dict[str, Any]] = []
    for n, entry in enumerate(entries):
        try:
            answers.extend(await _apply([_parse_entry(n, entry)], ctx))
        except MedledgerError as exc:
            status, body = outcome(exc)
            answers.append({"response": {"status": str(status), "outcome": body}})
    return {"resourceType": "Bundle", "type": "batch-response", "entry": answers}


async def _apply(planned: list[_Entry], ctx: BundleContext) -> list[dict[str, Any]]:
    references: set[str] = set()
    for entry in planned:
        if entry.resource is not None:
            _conditional_references(entry.resource, references)
    lock_types = {e.resource_type for e in planned if e.criteria is not None}
    lock_types |= {ref.partition("?")[0] for ref in references}
    async with contextlib.AsyncExitStack() as stack:
        for rtype in sorted(lock_types):
            await stack.enter_async_context(ctx.conditional.lock(rtype))
        urls: dict[str, str] = {}
        for ref in sorted(references):
            urls[ref] = await _conditional_reference(ref, ctx)
        for entry in planned:
            await _decide(entry, ctx)
            if entry.method == "PATCH":
                await _patched(entry, ctx)
            if entry.full_url is not None and entry.id is not None:
                urls[entry.full_url] = f"{entry.resource_type}/{entry.id}"
        writing = [entry for entry in planned if entry.answer is None]
        intents: list[WriteIntent] = []
        for entry in planned:
            if entry.answer is not None:
                continue
            assert entry.id is not None
            resource = {} if entry.resource is None else _resolve_refs(entry.resource, urls)
            intents.append(
                WriteIntent(
                    resource_type=entry.resource_type,
                    id=entry.id,
                    resource=resource,
                    if_match=entry.if_match,
                    create=entry.create,
                    delete=entry.method == "DELETE",
                )
            )
        checked = [(e.n, i.resource) for e, i in zip(writing, intents, strict=True) if not i.delete]
        problems = await ctx.validator.validate_many([resource for _, resource in checked])
        for (n, resource), problem in zip(checked, problems, strict=True):
            if problem is not None:
                raise _at_entry(n, resource, problem)
        stored = iter(await ctx.write_many(intents) if intents else [])
    answers: list[dict[str, Any]] = []
    for entry in planned:
        if entry.answer is not None:
            answers.append(entry.answer)
            continue
        version = next(stored)
        status = (
            "204 No Content"
            if entry.method == "DELETE"
            else "201 Created"
            if version.version == 1 or entry.create
            else "200 OK"
        )
        answers.append(_response(status, version))
    return answers


async def _patched(entry: _Entry, ctx: BundleContext) -> None:
    """A PATCH entry becomes an update of the current version with the patch applied."""
    assert entry.id is not None
    current = await ctx.read(entry.resource_type, entry.id)
    try:
        entry.resource = apply_json_patch(current.resource(), entry.patch)
    except FhirInvalid as exc:  # the patch itself is at fault: say which entry's
        issues = [
            replace(i, expression=(f"Bundle.entry[{entry.n}].resource.data",)) for i in exc.issues
        ]
        raise FhirInvalid(issues) from None
    if entry.if_match is None:
        entry.if_match = current.version  # nothing written since the read may be lost


async def _conditional_reference(ref: str, ctx: BundleContext) -> str:
    rtype, _, query = ref.partition("?")
    if not is_resource_type(rtype):
        raise InvalidInput(f"a conditional reference names no FHIR type ({rtype[:40]!r})")
    ids = await ctx.conditional.search_ids(rtype, parse_criteria(query, rtype))
    if len(ids) != 1:
        raise PreconditionFailed(
            f"a conditional reference to {rtype} matches {len(ids)} resources; it must match"
            " exactly one"
        )
    return f"{rtype}/{ids[0]}"


async def _decide(entry: _Entry, ctx: BundleContext) -> None:
    """Settle the entry's id (and whether it writes anything at all)."""
    if entry.criteria is None:
        if entry.method == "POST":
            entry.id = str(uuid.uuid4())
        return
    match = await ctx.conditional.match(entry.resource_type, entry.criteria)
    if entry.method == "POST":
        if match.id is None:
            entry.id = str(uuid.uuid4())
        else:
            entry.id = match.id
            existing = await ctx.read(entry.resource_type, match.id)
            entry.answer = _response("200 OK", existing)
    elif entry.method == "DELETE":
        entry.id = match.id
        if match.id is None:
            entry.answer = _response("204 No Content", None)
    elif entry.method == "PATCH":
        if match.id is None:
            raise NotFound(f"a conditional PATCH of {entry.resource_type} matches nothing")
        entry.id = match.id
    else:
        body_id = None if entry.resource is None else entry.resource.get("id")
        if match.id is not None:
            if body_id is not None and body_id != match.id:
                raise _invalid(entry.n, "resource.id", "the resource's id is not the match's")
            entry.id = match.id
            assert entry.resource is not None
            entry.resource = {**entry.resource, "id": match.id}
        elif body_id is not None:
            entry.id = validate_id(body_id, f"Bundle.entry[{entry.n}].resource.id")
            entry.if_match = 0  # update-as-create, never over a resource the criteria missed
        else:
            entry.id, entry.create = str(uuid.uuid4()), True


def _validate_shell(bundle: Mapping[str, Any]) -> None:
    """The Bundle without its entries' resources (each is validated once, on its own, later)."""
    entries = bundle.get("entry")
    shell = dict(bundle)
    if isinstance(entries, list):
        shell["entry"] = [
            {k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
            for e in entries
        ]
    validate_resource(shell, expected_type="Bundle")


def _at_entry(n: int, resource: dict[str, Any], exc: FhirInvalid) -> FhirInvalid:
    """``exc`` with its expressions located in entry ``n`` of the Bundle."""
    rtype = f"{resource.get('resourceType')}."
    return FhirInvalid(
        [
            Issue(
                severity=i.severity,
                code=i.code,
                diagnostics=i.diagnostics,
                expression=tuple(
                    f"Bundle.entry[{n}].resource.{e.removeprefix(rtype)}" for e in i.expression
                ),
            )
            for i in exc.issues
        ]
    )
