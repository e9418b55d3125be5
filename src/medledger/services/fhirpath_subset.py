"""A compiled evaluator for the FHIRPath the R4 SearchParameter expressions use.

The 1,375 standard search parameters use a small part of FHIRPath: paths
(``Observation.subject``), unions (``|``), choice types (``Observation.value
as Quantity``, ``Condition.onset.as(Period)``), indexes (``entry[0]``),
``where(resolve() is Patient)``, ``where(system='email')`` and, once,
``exists() and ... != false``. This module compiles each expression once into
a list of steps and walks the resource's JSON with them; decision 0034
records why (measured against ``fhirpathpy``, several times faster at the
same values). Anything outside the subset is refused at compile time
(:class:`UnsupportedExpression`), so a parameter is either served exactly or
not at all.

Elements are ``(value, type)`` pairs: the type is known where a choice
element named it (``valueQuantity`` is a ``Quantity``) and ``None`` elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CompiledPath",
    "Element",
    "UnsupportedExpression",
    "compile_expression",
    "reference_type",
    "top_level_names",
]

Element = tuple[Any, str | None]

#: FHIR R4 data types a choice element's JSON name may end in (``value[x]`` → ``valueQuantity``).
_CHOICE_TYPES = frozenset(
    [
        "Base64Binary",
        "Boolean",
        "Canonical",
        "Code",
        "Date",
        "DateTime",
        "Decimal",
        "Id",
        "Instant",
        "Integer",
        "Markdown",
        "Oid",
        "PositiveInt",
        "String",
        "Time",
        "UnsignedInt",
        "Uri",
        "Url",
        "Uuid",
        "Address",
        "Age",
        "Annotation",
        "Attachment",
        "CodeableConcept",
        "Coding",
        "ContactPoint",
        "Count",
        "Distance",
        "Duration",
        "HumanName",
        "Identifier",
        "Money",
        "Period",
        "Quantity",
        "Range",
        "Ratio",
        "Reference",
        "SampledData",
        "Signature",
        "Timing",
        "ContactDetail",
        "Contributor",
        "DataRequirement",
        "Expression",
        "ParameterDefinition",
        "RelatedArtifact",
        "TriggerDefinition",
        "UsageContext",
        "Dosage",
        "Meta",
    ]
)


class UnsupportedExpression(ValueError):
    """The expression uses FHIRPath outside the compiled subset."""


Step = Callable[[list[Element]], list[Element]]


def _children(value: Any, name: str) -> Iterator[Element]:
    if not isinstance(value, dict):
        return
    if name in value:
        child = value[name]
        for item in child if isinstance(child, list) else [child]:
            yield item, None
        return
    # A choice element: ``onset`` is stored as ``onsetDateTime``, ``onsetPeriod``, ...
    for key, child in value.items():
        if key.startswith(name) and key[len(name) :] in _CHOICE_TYPES:
            for item in child if isinstance(child, list) else [child]:
                yield item, key[len(name) :]


def _name_step(name: str) -> Step:
    return lambda elements: [c for v, _ in elements for c in _children(v, name)]


def _same_type(found: str | None, wanted: str) -> bool:
    # Without a known type (not a choice element) the element is taken as it is.
    return found is None or found.lower() == wanted.lower()


def _as_step(type_name: str) -> Step:
    return lambda elements: [(v, t) for v, t in elements if _same_type(t, type_name)]


def reference_type(reference: object) -> str | None:
    """The resource type a literal reference names (``Patient/1``, ``http://x/fhir/Patient/1``)."""
    if not isinstance(reference, str):
        return None
    parts = reference.split("?")[0].split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2].isalpha():
        return parts[-2]
    return None


def _resolve_is_step(type_name: str) -> Step:
    def step(elements: list[Element]) -> list[Element]:
        return [
            (v, t)
            for v, t in elements
            if isinstance(v, dict) and reference_type(v.get("reference")) == type_name
        ]

    return step


def _where_equals_step(field: str, literal: str) -> Step:
    def step(elements: list[Element]) -> list[Element]:
        return [(v, t) for v, t in elements if isinstance(v, dict) and v.get(field) == literal]

    return step


def _index_step(index: int) -> Step:
    return lambda elements: elements[index : index + 1]


_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\([^()]*(?:\([^()]*\))?[^()]*\))?(?:\[\d+\])?")
_WHERE_RESOLVE = re.compile(r"^where\(resolve\(\) is ([A-Za-z]+)\)$")
_WHERE_EQUALS = re.compile(r"^where\(([A-Za-z]+) ?= ?'([^']*)'\)$")
_AS_CALL = re.compile(r"^as\(([A-Za-z]+)\)$")
_DECEASED = re.compile(r"^([A-Za-z]+)\.([a-z][A-Za-z]*)\.exists\(\) and \1\.\2 != false$")


def _split_union(expression: str) -> list[str]:
    """The top-level ``|`` alternatives (not inside parentheses or quotes)."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(expression):
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and ch == "|":
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return parts


def _split_dots(path: str) -> list[str]:
    segments, pos = [], 0
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if not m:
            raise UnsupportedExpression(f"cannot read {path!r} at {pos}")
        segments.append(m.group(0))
        pos = m.end()
        if pos < len(path):
            if path[pos] != ".":
                raise UnsupportedExpression(f"cannot read {path!r} at {pos}")
            pos += 1
    return segments


@dataclass(frozen=True, slots=True)
class _Branch:
    root: str
    steps: tuple[Step, ...]
    #: ``X.deceased.exists() and X.deceased != false``: present and not ``false``.
    not_false: bool = False
    #: The top-level element the branch starts with (``None``: unknown).
    first: str | None = None


def _closing(text: str) -> int:
    """Where the parenthesis opening ``text`` closes."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i
    raise UnsupportedExpression(f"unbalanced parentheses in {text!r}")


def _compile_branch(text: str) -> _Branch:
    text = text.strip()
    if text.startswith("("):
        end = _closing(text)
        inner = _compile_branch(text[1:end])
        rest = text[end + 1 :].strip()
        if not rest:
            return inner
        if not rest.startswith(".") or inner.not_false:
            raise UnsupportedExpression(f"cannot read {text!r}")
        tail = _compile_branch(f"{inner.root}{rest}")
        return _Branch(root=inner.root, steps=inner.steps + tail.steps, first=inner.first)
    m = _DECEASED.match(text)
    if m:
        return _Branch(
            root=m.group(1), steps=(_name_step(m.group(2)),), not_false=True, first=m.group(2)
        )
    as_type = None
    if " as " in text:
        text, as_type = (part.strip() for part in text.rsplit(" as ", 1))
        if not as_type.isalpha():
            raise UnsupportedExpression(f"cannot read 'as {as_type}'")
    segments = _split_dots(text)
    steps: list[Step] = []
    for segment in segments[1:]:
        name, _, index = segment.partition("[")
        if m := _WHERE_RESOLVE.match(segment):
            steps.append(_resolve_is_step(m.group(1)))
        elif m := _WHERE_EQUALS.match(segment):
            steps.append(_where_equals_step(m.group(1), m.group(2)))
        elif m := _AS_CALL.match(segment):
            steps.append(_as_step(m.group(1)))
        elif "(" in segment:
            raise UnsupportedExpression(f"function {segment!r} is not in the compiled subset")
        else:
            steps.append(_name_step(name))
            if index:
                steps.append(_index_step(int(index.rstrip("]"))))
    if as_type is not None:
        steps.append(_as_step(as_type))
    if segments[0][:1].islower():  # a path from the resource itself (``name | alias``)
        stem = segments[0].partition("[")[0]
        return _Branch(root="Resource", steps=(_name_step(stem), *steps), first=stem)
    first: str | None = segments[1].partition("[")[0] if len(segments) > 1 else None
    if first is not None and "(" in first:
        first = None
    return _Branch(root=segments[0], steps=tuple(steps), first=first)


@dataclass(frozen=True, slots=True)
class CompiledPath:
    """An expression compiled for one resource type: :meth:`evaluate` gives its elements."""

    branches: tuple[_Branch, ...]

    def may_select(self, present: frozenset[str]) -> bool:
        """Whether any branch could select something, given the resource's element names."""
        return any(b.first is None or b.first in present or b.not_false for b in self.branches)

    def evaluate(
        self, resource: dict[str, Any], present: frozenset[str] | None = None
    ) -> list[Element]:
        """The elements the expression selects in ``resource``.

        ``present`` (:func:`top_level_names` of the resource) lets a branch whose
        first element is absent be skipped without walking it.
        """
        found: list[Element] = []
        for branch in self.branches:
            if (
                present is not None
                and branch.first is not None
                and branch.first not in present
                and not branch.not_false
            ):
                continue
            elements: list[Element] = [(resource, None)]
            for step in branch.steps:
                elements = step(elements)
                if not elements:
                    break
            if branch.not_false:  # a boolean result: present and not false
                elements = [(any(v is not False for v, _ in elements), "boolean")]
            found.extend(elements)
        return found


def top_level_names(resource: dict[str, Any]) -> frozenset[str]:
    """The resource's element names, choice elements also by their stem (``onset``)."""
    names = set(resource)
    for key in resource:
        for i in range(1, len(key)):
            if key[i].isupper() and key[i:] in _CHOICE_TYPES:
                names.add(key[:i])
    return frozenset(names)


_GENERIC_ROOTS = frozenset({"Resource", "DomainResource"})


def compile_expression(expression: str) -> dict[str, CompiledPath]:
    """``expression`` compiled, by the resource type its branches start at.

    A shared expression (``AllergyIntolerance.patient | CarePlan.subject...``)
    gives one path per type; branches rooted at ``Resource`` or
    ``DomainResource`` are under ``"Resource"``. Raises
    :class:`UnsupportedExpression` for FHIRPath outside the subset.
    """
    by_root: dict[str, list[_Branch]] = {}
    for text in _split_union(expression):
        branch = _compile_branch(text)
        root = "Resource" if branch.root in _GENERIC_ROOTS else branch.root
        by_root.setdefault(root, []).append(branch)
    return {root: CompiledPath(tuple(branches)) for root, branches in by_root.items()}
