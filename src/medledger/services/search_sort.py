"""``_sort`` keys: what a resource sorts by, read from its decrypted values (never the index).

The blind index cannot order anything (tokens reveal only equality), so a
sorted search decrypts its matches and sorts them in memory by the values
the parameter's FHIRPath selects — a bounded number of matches
(:data:`MAX_SORTED`), refused beyond. Ascending compares each resource's
lowest value, descending its highest (FHIR R4 §3.1.1.4.5: "the lowest
value"/"the highest value"); a resource without a value sorts last either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from medledger.core.errors import InvalidInput
from medledger.services.search_dates import period_days, value_days
from medledger.services.search_registry import SearchParameter, registry
from medledger.services.search_terms import normalize, number_term

__all__ = ["MAX_SORTED", "SortField", "parse_sort", "sort_resources"]

#: A sorted search decrypts every match: at most this many.
MAX_SORTED = 5000


@dataclass(frozen=True, slots=True, kw_only=True)
class SortField:
    param: SearchParameter
    descending: bool


def parse_sort(resource_type: str, values: list[str]) -> list[SortField]:
    """``_sort=-date,name`` as fields; :class:`InvalidInput` for an unknown parameter."""
    fields = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            descending = item.startswith("-")
            code = item.removeprefix("-")
            param = registry().get(resource_type, code)
            if param is None:
                raise InvalidInput(f"cannot sort {resource_type} by {code!r}: no such parameter")
            fields.append(SortField(param=param, descending=descending))
    if len(fields) > 8:
        raise InvalidInput("_sort takes at most 8 parameters")
    return fields


def _values(param: SearchParameter, resource: dict[str, Any]) -> list[Any]:
    found: list[Any] = []
    for value, _ in param.path.evaluate(resource):
        if param.type == "date":
            days = (
                period_days(value.get("start"), value.get("end"))
                if isinstance(value, dict)
                else value_days(value)
            )
            if days is not None:
                found.append(days)
        elif param.type in ("number", "quantity"):
            number = number_term(value.get("value") if isinstance(value, dict) else value)
            if number is not None:
                found.append(Decimal(number))
        elif isinstance(value, str):
            found.append(normalize(value))
        elif isinstance(value, dict):
            for key in ("family", "text", "code", "value", "reference", "display"):
                if isinstance(value.get(key), str):
                    found.append(normalize(value[key]))
                    break
            else:
                codings = value.get("coding")
                if isinstance(codings, list) and codings and isinstance(codings[0], dict):
                    found.append(str(codings[0].get("code", "")))
        elif isinstance(value, bool | int):
            found.append(str(value).lower())
    return found


def _key(field: SortField, resource: dict[str, Any]) -> Any:
    values = _values(field.param, resource)
    if not values:
        return None
    if field.param.type == "date":
        days: list[tuple[date, date]] = values
        return max(hi for _, hi in days) if field.descending else min(lo for lo, _ in days)
    return max(values) if field.descending else min(values)


def sort_resources(items: list[Any], fields: list[SortField], resource_of: Any) -> list[Any]:
    """``items`` sorted by ``fields`` (stable: equal keys keep their order)."""
    ordered = list(items)
    for field in reversed(fields):
        keyed = [(_key(field, resource_of(i)), i) for i in ordered]
        present = [(k, i) for k, i in keyed if k is not None]
        missing = [i for k, i in keyed if k is None]
        present.sort(key=lambda pair: pair[0], reverse=field.descending)
        ordered = [i for _, i in present] + missing
    return ordered
