"""FHIR R4 input: size and depth limits, JSON parsing, model validation, OperationOutcome.

Resources are validated with ``fhir.resources``' R4B models (FHIR 4.3.0, wire
compatible with R4 4.0.1 for the resources medledger serves). Decimals are
parsed as :class:`decimal.Decimal` and written back with their original
precision, so ``1.50`` stays ``1.50``.

Every rejection is a :class:`FhirInvalid` carrying OperationOutcome issues
with a FHIRPath-like ``expression`` naming where the problem is; nothing is
written for rejected input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import simplejson
from pydantic import ValidationError

from medledger.core.errors import InvalidInput

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_DEPTH",
    "FhirInvalid",
    "Issue",
    "dump_resource",
    "load_json",
    "operation_outcome",
    "validate_id",
    "validate_resource",
]

#: Larger request bodies are refused before parsing.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Deeper JSON is refused: real resources nest far less, and deep input is a
#: denial-of-service vector for recursive parsers and validators.
MAX_DEPTH = 40
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Issue:
    """One OperationOutcome issue."""

    severity: str
    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            out["expression"] = list(self.expression)
        return out


class FhirInvalid(InvalidInput):
    """Input that is not a valid FHIR resource; ``issues`` say what and where."""

    def __init__(self, issues: list[Issue] | tuple[Issue, ...]) -> None:
        self.issues = tuple(issues)
        first = self.issues[0]
        where = f" at {first.expression[0]}" if first.expression else ""
        more = f" (+{len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
        super().__init__(f"{first.diagnostics}{where}{more}")


def _invalid(diagnostics: str, expression: str | None = None, code: str = "invalid") -> FhirInvalid:
    return FhirInvalid(
        [
            Issue(
                severity="error",
                code=code,
                diagnostics=diagnostics,
                expression=(expression,) if expression else (),
            )
        ]
    )


def operation_outcome(issues: list[Issue] | tuple[Issue, ...]) -> dict[str, Any]:
    """A FHIR OperationOutcome resource for ``issues``."""
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item)
    return True


def load_json(body: bytes | str, *, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """Parse a JSON request body with size and depth limits; decimals as ``Decimal``."""
    size = len(body.encode("utf-8")) if isinstance(body, str) else len(body)
    if size > max_bytes:
        raise _invalid(f"request body is {size} bytes; the limit is {max_bytes}", code="too-costly")
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        value = simplejson.loads(text, use_decimal=True)
    except UnicodeDecodeError as exc:
        raise _invalid(f"body is not valid UTF-8 (byte {exc.start})", code="structure") from None
    except simplejson.JSONDecodeError as exc:
        raise _invalid(
            f"body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            code="structure",
        ) from None
    except RecursionError:
        raise _invalid(f"JSON nests deeper than {MAX_DEPTH} levels", code="structure") from None
    except ValueError as exc:
        raise _invalid(f"body is not valid JSON: {exc}", code="structure") from None
    if not _depth_ok(value, MAX_DEPTH):
        raise _invalid(f"JSON nests deeper than {MAX_DEPTH} levels", code="structure")
    return value


def dump_resource(resource: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes of a resource, decimals with their original precision."""
    return simplejson.dumps(
        resource, use_decimal=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def validate_id(resource_id: object, expression: str = "id") -> str:
    """A FHIR logical id: 1 to 64 of ``A-Z a-z 0-9 - .``."""
    if not isinstance(resource_id, str) or not _ID.match(resource_id):
        raise _invalid("id must be 1-64 characters of A-Z, a-z, 0-9, '-' and '.'", expression)
    return resource_id


def _expression(resource_type: str, loc: tuple[int | str, ...]) -> str:
    out = resource_type
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate_resource(value: Any, *, expected_type: str | None = None) -> dict[str, Any]:
    """Check that ``value`` is a valid FHIR R4 resource (of ``expected_type`` if given).

    Returns the resource dict unchanged. Raises :class:`FhirInvalid`.
    """
    if not isinstance(value, dict):
        raise _invalid("a FHIR resource must be a JSON object", code="structure")
    rtype = value.get("resourceType")
    if not isinstance(rtype, str):
        raise _invalid("resourceType is missing", "resourceType", code="required")
    if expected_type is not None and rtype != expected_type:
        raise _invalid(
            f"resourceType is {rtype!r} but the request is for {expected_type!r}", "resourceType"
        )
    model = _model(rtype)
    if "id" in value:
        validate_id(value["id"], f"{rtype}.id")
    try:
        model.model_validate(value)
    except ValidationError as exc:
        issues = [
            Issue(
                severity="error",
                code="invalid" if e["type"] != "missing" else "required",
                diagnostics=f"{e['msg']}",
                expression=(_expression(rtype, tuple(e["loc"])),),
            )
            for e in exc.errors(include_url=False, include_input=False)[:20]
        ]
        raise FhirInvalid(issues) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise _invalid(f"invalid {rtype}: {type(exc).__name__}", rtype) from None
    return value


_MODELS: dict[str, Any] = {}


def _model(resource_type: str) -> Any:
    model = _MODELS.get(resource_type)
    if model is None:
        from fhir.resources.R4B import get_fhir_model_class

        if not resource_type.isalpha() or resource_type in ("Resource", "DomainResource"):
            raise _invalid(
                f"unknown resource type {resource_type!r}", "resourceType", code="not-supported"
            )
        try:
            model = get_fhir_model_class(resource_type)
        except (ValueError, KeyError, AttributeError, ImportError):
            raise _invalid(
                f"unknown resource type {resource_type!r}", "resourceType", code="not-supported"
            ) from None
        _MODELS[resource_type] = model
    return model


def decimal_free(value: Any) -> Any:
    """``value`` with Decimals as their exact string (for hashing or logging shapes)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {k: decimal_free(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decimal_free(v) for v in value]
    return value
