"""FHIR ``transaction`` Bundles: every entry validated, then written as one write."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from medledger.core.errors import InvalidInput
from medledger.services.fhir import FhirInvalid, Issue, validate_id, validate_resource
from medledger.services.records.model import StoredResource, WriteIntent
from medledger.services.validation import Validator

__all__ = ["apply_transaction", "plan_transaction"]


async def apply_transaction(
    bundle: Mapping[str, Any],
    *,
    validator: Validator,
    write_many: Callable[[Sequence[WriteIntent]], Awaitable[list[StoredResource]]],
) -> dict[str, Any]:
    """Apply a ``transaction`` Bundle all-or-nothing; return the transaction-response.

    A refused entry's issues name it (``Bundle.entry[n].resource…``).
    """
    intents = plan_transaction(bundle)
    for n, intent in enumerate(intents):
        try:
            await validator.validate(intent.resource)
        except FhirInvalid as exc:
            raise FhirInvalid(
                [
                    Issue(
                        severity=i.severity,
                        code=i.code,
                        diagnostics=i.diagnostics,
                        expression=tuple(f"Bundle.entry[{n}].resource.{e}" for e in i.expression),
                    )
                    for i in exc.issues
                ]
            ) from None
    stored = await write_many(intents)
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {
                "response": {
                    "status": "201 Created" if s.version == 1 else "200 OK",
                    "location": f"{s.resource_type}/{s.id}/_history/{s.version}",
                    "etag": f'W/"{s.version}"',
                    "lastModified": s.last_updated,
                }
            }
            for s in stored
        ],
    }


def plan_transaction(bundle: Mapping[str, Any]) -> list[WriteIntent]:
    """The write intents of a ``transaction`` Bundle, in entry order.

    POST entries get a new id; PUT entries name theirs (``Type/id``). References
    to an entry's ``fullUrl`` (``urn:uuid:…``) become the assigned ``Type/id``.
    The resources themselves are not validated here.
    """
    validate_resource(dict(bundle), expected_type="Bundle")
    if bundle.get("type") != "transaction":
        raise InvalidInput("only Bundles of type 'transaction' can be submitted")
    entries = bundle.get("entry") or []
    plan: list[WriteIntent] = []
    urls: dict[str, str] = {}
    for n, entry in enumerate(entries):
        request, resource = entry.get("request") or {}, entry.get("resource")
        method, url = request.get("method"), str(request.get("url", ""))
        if not isinstance(resource, dict) or method not in ("POST", "PUT"):
            raise FhirInvalid(
                [
                    Issue(
                        severity="error",
                        code="not-supported",
                        diagnostics="transaction entries must POST or PUT a resource",
                        expression=(f"Bundle.entry[{n}]",),
                    )
                ]
            )
        rtype = str(resource.get("resourceType"))
        if method == "POST":
            rid, create = str(uuid.uuid4()), True
        else:
            parts = url.split("/")
            if len(parts) != 2 or parts[0] != rtype:
                raise FhirInvalid(
                    [
                        Issue(
                            severity="error",
                            code="invalid",
                            diagnostics=f"PUT url must be {rtype}/<id>",
                            expression=(f"Bundle.entry[{n}].request.url",),
                        )
                    ]
                )
            rid, create = validate_id(parts[1], f"Bundle.entry[{n}].request.url"), False
        if isinstance(entry.get("fullUrl"), str):
            urls[entry["fullUrl"]] = f"{rtype}/{rid}"
        plan.append(WriteIntent(resource_type=rtype, id=rid, resource=resource, create=create))
    return [
        WriteIntent(
            resource_type=i.resource_type,
            id=i.id,
            resource=_resolve_refs(i.resource, urls),
            create=i.create,
        )
        for i in plan
    ]


def _resolve_refs(value: Any, urls: Mapping[str, str]) -> Any:
    """Replace transaction-local references (``urn:uuid:…``) with the assigned ``Type/id``."""
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
