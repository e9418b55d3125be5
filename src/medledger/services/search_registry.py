"""The search-parameter registry: every standard R4 SearchParameter, from HL7's own Bundle.

``medledger/data/fhir-r4/search-parameters.json`` is the specification's
Bundle of SearchParameter resources (HL7, CC0), shipped unchanged. For every
resource type it names, the registry holds each parameter of a type the
blind index serves — string, token, reference, date, number, quantity, uri —
with its FHIRPath expression compiled for that type
(``services.fhirpath_subset``). The same registry decides what is indexed,
what a search may ask for and what the CapabilityStatement declares, so the
three cannot drift apart. Composite parameters of two components whose
types pair a token with a quantity, a date or a token
(``code-value-quantity``, ``component-code-value-quantity``,
``code-value-date``, ``context-type-value``...) are served too, each
component's expression compiled relative to the composite's element.
Other composites, special parameters, and those without an expression
(``_text``, ``_content``, ``_query``...), are not served and not declared.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from medledger.services.fhirpath_subset import (
    CompiledPath,
    UnsupportedExpression,
    compile_expression,
)

__all__ = [
    "COMPOSITE_PAIRS",
    "SERVED_TYPES",
    "SearchParameter",
    "SearchRegistry",
    "load_bundle",
    "registry",
]

#: The parameter types the blind index serves.
SERVED_TYPES = frozenset(
    {"string", "token", "reference", "date", "number", "quantity", "uri", "composite"}
)
#: The component types a served composite may pair (first, second).
COMPOSITE_PAIRS = frozenset({("token", "quantity"), ("token", "date"), ("token", "token")})


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
    #: A composite's components: each one's type and its path from the composite's element.
    components: tuple[tuple[str, CompiledPath], ...] = field(default=(), compare=False, repr=False)


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


def _components(
    definition: Mapping[str, Any], by_url: Mapping[str, Mapping[str, Any]]
) -> tuple[tuple[str, CompiledPath], ...] | None:
    """A composite's components compiled, or ``None`` if it is not a served pair."""
    parts = definition.get("component", [])
    if len(parts) != 2:
        return None
    out = []
    for part in parts:
        kind = by_url.get(part.get("definition", ""), {}).get("type")
        text = part.get("expression", "")
        if not isinstance(kind, str) or not text or "%" in text:
            return None
        try:
            # Relative to the composite's element: compiled as a path from a resource.
            compiled = compile_expression(text).get("Resource")
        except UnsupportedExpression:
            return None
        if compiled is None:
            return None
        out.append((kind, compiled))
    if (out[0][0], out[1][0]) not in COMPOSITE_PAIRS:
        return None
    return tuple(out)


def _build(bundle: Mapping[str, Any]) -> SearchRegistry:
    definitions = [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
    by_url = {d["url"]: d for d in definitions if "url" in d}
    types = sorted(
        {b for d in definitions for b in d.get("base", [])} - {"Resource", "DomainResource"}
    )
    by_type: dict[str, dict[str, SearchParameter]] = {t: {} for t in types}
    for d in definitions:
        expression = d.get("expression")
        if d.get("type") not in SERVED_TYPES or not expression:
            continue
        components: tuple[tuple[str, CompiledPath], ...] = ()
        if d["type"] == "composite":
            found = _components(d, by_url)
            if found is None:
                continue
            components = found
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
                components=components,
            )
    return SearchRegistry({t: dict(sorted(p.items())) for t, p in by_type.items()})


@functools.cache
def registry() -> SearchRegistry:
    """The registry from the shipped Bundle (built once per process, ~0.2 s)."""
    return _build(load_bundle("search-parameters.json"))
