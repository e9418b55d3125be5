"""The search-parameter registry: every standard R4 SearchParameter, from HL7's own Bundle.

``medledger/data/fhir-r4/search-parameters.json`` is the specification's
Bundle of SearchParameter resources (HL7, CC0), shipped unchanged. For every
resource type it names, the registry holds each parameter of a type the
blind index serves — string, token, reference, date, number, quantity, uri —
with its FHIRPath expression compiled for that type
(``services.fhirpath_subset``). The same registry decides what is indexed,
what a search may ask for and what the CapabilityStatement declares, so the
three cannot drift apart. Composite and special parameters, and those
without an expression (``_text``, ``_content``, ``_query``...), are not
served and not declared.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from medledger.services.fhirpath_subset import CompiledPath, compile_expression

__all__ = [
    "SERVED_TYPES",
    "SearchParameter",
    "SearchRegistry",
    "load_bundle",
    "registry",
]

#: The parameter types the blind index serves.
SERVED_TYPES = frozenset({"string", "token", "reference", "date", "number", "quantity", "uri"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchParameter:
    """One search parameter of one resource type, as the specification defines it."""

    code: str
    type: str
    url: str
    expression: str
    description: str
    #: The resource types a reference parameter may point at.
    targets: tuple[str, ...]
    path: CompiledPath = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class SearchRegistry:
    """Search parameters by resource type and code."""

    by_type: Mapping[str, Mapping[str, SearchParameter]]

    def parameters(self, resource_type: str) -> Mapping[str, SearchParameter]:
        """The parameters of ``resource_type`` (empty for a type the specification lacks)."""
        return self.by_type.get(resource_type, {})

    def get(self, resource_type: str, code: str) -> SearchParameter | None:
        return self.by_type.get(resource_type, {}).get(code)


def load_bundle(name: str) -> dict[str, Any]:
    """One of the shipped HL7 R4 definition Bundles (``search-parameters.json``...)."""
    data = resources.files("medledger").joinpath("data", "fhir-r4", name).read_bytes()
    bundle: dict[str, Any] = json.loads(data)
    return bundle


def _build(bundle: Mapping[str, Any]) -> SearchRegistry:
    definitions = [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
    types = sorted(
        {b for d in definitions for b in d.get("base", [])} - {"Resource", "DomainResource"}
    )
    by_type: dict[str, dict[str, SearchParameter]] = {t: {} for t in types}
    for d in definitions:
        expression = d.get("expression")
        if d.get("type") not in SERVED_TYPES or not expression:
            continue
        paths = compile_expression(expression)
        generic = paths.get("Resource")
        bases = d.get("base", [])
        applies = types if {"Resource", "DomainResource"} & set(bases) else bases
        for rtype in applies:
            path = paths.get(rtype, generic)
            if path is None:
                continue
            by_type[rtype][d["code"]] = SearchParameter(
                code=d["code"],
                type=d["type"],
                url=d["url"],
                expression=expression,
                description=d.get("description", ""),
                targets=tuple(d.get("target", [])),
                path=path,
            )
    return SearchRegistry({t: dict(sorted(p.items())) for t, p in by_type.items()})


@functools.cache
def registry() -> SearchRegistry:
    """The registry from the shipped Bundle (built once per process, ~0.2 s)."""
    return _build(load_bundle("search-parameters.json"))
