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

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from importlib import resources
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import simplejson
from pydantic import ValidationError

from medledger.core.errors import InvalidInput
from medledger.services.value_sets import (
    CONCEPT_BINDINGS,
    invariant_violations,
    required_codes,
)

__all__ = [
    "FHIR_JSON",
    "model_type_names",
    "MAX_BODY_BYTES",
    "MAX_DEPTH",
    "R4_ONLY_TYPES",
    "FhirInvalid",
    "Issue",
    "dump_resource",
    "is_resource_type",
    "load_json",
    "operation_outcome",
    "validate_id",
    "validate_resource",
]

#: The FHIR JSON media type (API responses, and clients of the API).
FHIR_JSON = "application/fhir+json"
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

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its issues when it crosses a process boundary (validation workers).
        return (FhirInvalid, (self.issues,))


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
    # fhir.resources coerces ("yes" -> True, "3" -> 3); FHIR JSON does not.
    type_issues: list[Issue] = []
    _check_json_types(value, model, rtype, type_issues)
    _check_concept_bindings(value, rtype, rtype, type_issues)
    if type_issues:
        raise FhirInvalid(type_issues[:20])
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
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise _invalid(f"invalid {rtype}: {type(exc).__name__}", rtype) from None
    broken = invariant_violations(value)
    if broken:
        raise FhirInvalid(
            [
                Issue(
                    severity="error",
                    code="invariant",
                    diagnostics=f"{key}: {text}",
                    expression=(where,),
                )
                for key, where, text in broken
            ]
        )
    return value


# -- FHIR JSON primitive representation (R4 §2.6.2): booleans are JSON booleans,
# integers JSON integers, decimals JSON numbers, every other primitive a string.

#: Per model, per JSON property: (kind, nested model or None, is_list, required codes or None).
_Kind = tuple[str, Any, bool, frozenset[str] | None]
_KIND_CACHE: dict[Any, dict[str, _Kind]] = {}


def _field_kinds(model: Any) -> dict[str, _Kind]:
    """For each JSON property of ``model``: its :data:`_Kind`."""
    kinds = _KIND_CACHE.get(model)
    if kinds is None:
        kinds = {}
        for field in model.model_fields.values():
            prop = field.alias or ""
            kind, nested, is_list = _classify(field.annotation)
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            codes = (
                required_codes(model.__name__, prop, extra.get("enum_values"))
                if kind == "string"
                else None
            )
            kinds[prop] = (kind, nested, is_list, codes)
        _KIND_CACHE[model] = kinds
    return kinds


def _classify(annotation: Any) -> tuple[str, Any, bool]:
    is_list = False
    t = annotation
    while True:
        origin = get_origin(t)
        args = [a for a in get_args(t) if a is not type(None)]
        if origin in (Union, UnionType) and len(args) == 1:
            t = args[0]
        elif origin is list and args:
            is_list, t = True, args[0]
        elif origin is Annotated:
            t = args[0]
        else:
            break
    if t is bool:
        return "boolean", None, is_list
    if t is int:
        return "integer", None, is_list
    if t is Decimal:
        return "decimal", None, is_list
    if isinstance(t, type) and hasattr(t, "get_model_klass"):
        try:
            nested = t.get_model_klass()
        except (AttributeError, KeyError, ImportError, ValueError):
            return "any", None, is_list
        name = getattr(nested, "__name__", "")
        return ("resource" if name in ("Resource", "DomainResource") else "model"), nested, is_list
    if t in (str, date, datetime, time) or (isinstance(t, type) and issubclass(t, str)):
        return "string", None, is_list
    return "any", None, is_list


def _json_kind_ok(kind: str, v: Any) -> bool:
    if kind == "boolean":
        return type(v) is bool
    if kind == "integer":
        return type(v) is int
    if kind == "decimal":
        # In-process callers may pass floats; JSON input arrives as Decimal or int.
        return type(v) in (int, Decimal) or (type(v) is float and math.isfinite(v))
    if kind == "string":
        return type(v) is str
    if kind in ("model", "resource"):
        return type(v) is dict
    return True


_JSON_NAMES = {
    "boolean": "a JSON boolean",
    "integer": "a JSON integer",
    "decimal": "a JSON number",
    "string": "a JSON string",
    "model": "a JSON object",
    "resource": "a JSON object",
}


def _check_json_types(value: dict[str, Any], model: Any, path: str, issues: list[Issue]) -> None:
    kinds = _field_kinds(model)
    for key, item in value.items():
        spec = kinds.get(key)
        if spec is None or item is None:
            continue  # unknown or null properties: the model validation reports them
        kind, nested, is_list, codes = spec
        where = f"{path}.{key}"
        if is_list and type(item) is not list:
            issues.append(
                Issue(
                    severity="error",
                    code="structure",
                    diagnostics="must be a JSON array",
                    expression=(where,),
                )
            )
            continue
        for i, v in enumerate(item if is_list else [item]):
            here = f"{where}[{i}]" if is_list else where
            if not _json_kind_ok(kind, v):
                issues.append(
                    Issue(
                        severity="error",
                        code="structure",
                        diagnostics=f"must be {_JSON_NAMES[kind]}",
                        expression=(here,),
                    )
                )
            elif codes is not None and v not in codes:
                # The code itself is not echoed: OperationOutcomes may be logged.
                issues.append(
                    Issue(
                        severity="error",
                        code="code-invalid",
                        diagnostics="the code is not in the required value set ("
                        + " | ".join(sorted(codes))
                        + ")",
                        expression=(here,),
                    )
                )
            elif kind == "model":
                _check_json_types(v, nested, here, issues)
            elif kind == "resource":
                _check_contained(v, here, issues)


def _check_concept_bindings(
    value: dict[str, Any], rtype: str, path: str, issues: list[Issue]
) -> None:
    """Required ``CodeableConcept`` bindings (:data:`CONCEPT_BINDINGS`) of a resource."""
    for (bound_type, prop), (system, codes) in CONCEPT_BINDINGS.items():
        concept = value.get(prop) if bound_type == rtype else None
        if not isinstance(concept, dict):
            continue  # absent, or a shape the type check reports
        codings = concept.get("coding")
        ours = [
            c
            for c in (codings if isinstance(codings, list) else [])
            if isinstance(c, dict) and c.get("system") == system
        ]
        if not ours or any(c.get("code") not in codes for c in ours):
            issues.append(
                Issue(
                    severity="error",
                    code="code-invalid",
                    diagnostics=f"{prop} is bound (required) to {system}: a coding of that"
                    f" system with one of {' | '.join(sorted(codes))}",
                    expression=(f"{path}.{prop}",),
                )
            )


def _check_contained(value: dict[str, Any], path: str, issues: list[Issue]) -> None:
    """A resource inside another (Bundle.entry.resource, contained)."""
    rtype = value.get("resourceType")
    try:
        if not isinstance(rtype, str):
            raise _invalid("resourceType is missing", f"{path}.resourceType", code="required")
        model = _model(rtype)
    except FhirInvalid as exc:
        issues.extend(
            Issue(
                severity=i.severity,
                code=i.code,
                diagnostics=i.diagnostics,
                expression=(f"{path}.resourceType",),
            )
            for i in exc.issues
        )
        return
    _check_json_types(value, model, path, issues)
    _check_concept_bindings(value, rtype, path, issues)


#: FHIR R4 (4.0.1) resource types that R4B (4.3.0) dropped or replaced: valid R4, but
#: there is no model to validate them against, so they are refused by name.
R4_ONLY_TYPES = frozenset(
    {
        "EffectEvidenceSynthesis",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "RiskEvidenceSynthesis",
        "SubstanceSpecification",
    }
)
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
            if resource_type in R4_ONLY_TYPES:
                raise _invalid(
                    f"{resource_type} is an R4 resource type this server does not hold: its"
                    " models follow FHIR 4.3 (R4B), which replaced it",
                    "resourceType",
                    code="not-supported",
                ) from None
            raise _invalid(
                f"unknown resource type {resource_type!r}", "resourceType", code="not-supported"
            ) from None
        _MODELS[resource_type] = model
    return model


@functools.cache
def model_type_names() -> frozenset[str]:
    """Lower-cased names of the R4B model modules: a superset of the types medledger can
    hold, found without importing each (``is_resource_type`` imports one to be sure)."""
    package = resources.files("fhir.resources.R4B")
    return frozenset(
        p.name.removesuffix(".py") for p in package.iterdir() if p.name.endswith(".py")
    )


def is_resource_type(name: str) -> bool:
    """``name`` is a FHIR R4 type medledger can hold (not merely something shaped like one)."""
    try:
        _model(name)
    except FhirInvalid:
        return False
    return True


def decimal_free(value: Any) -> Any:
    """``value`` with Decimals as their exact string (for hashing or logging shapes)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {k: decimal_free(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decimal_free(v) for v in value]
    return value
