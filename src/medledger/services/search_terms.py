"""What a resource is findable by: the index terms of each search parameter's values.

For each parameter of the registry (``services.search_registry``) the
compiled FHIRPath gives the elements; their type of search parameter decides
the terms. Plain terms are what an ordinary search compares with; terms for
modifiers begin with :data:`MARK` (a control character no FHIR string may
hold, so no value can pose as one):

=========  ===========================================================================
string     each word's prefixes up to :data:`MAX_PREFIX_CHARS` (normalized: "starts
           with", case and accents ignored); ``MARK=`` + the whole value (``:exact``);
           :func:`contains_terms` of the normalized value (``:contains``)
token      ``code``, ``system|code``, ``system|``, ``|code`` (no system); ``MARK~`` +
           whole words of ``display``/``text`` (``:text``); for an Identifier
           ``MARKo`` + ``typesystem|typecode|value`` (``:of-type``)
reference  ``Type/id`` (relative) or the absolute URL as written; ``MARKi`` +
           ``system|value`` and ``value`` of a logical reference (``:identifier``);
           a canonical as written and without its ``|version``
date       ``services.search_dates.range_terms`` of the value's day range
number     ``services.search_numbers.point_cells`` of the decimal (magnitude, digit prefixes, end)
quantity   those cells; ``MARK u`` + each unit form (``||code``, ``||unit``, ``|system|code``)
uri        the URI as written; :func:`contains_terms` of it (``:contains``); ``MARK b``
           + the URI cut after each of its path segments (``:below``)
composite  per element, ``first$second`` for each pair of its components' plain terms:
           a token's ``code`` and ``system|code``, a quantity's cells (no unit), a
           date's range terms
=========  ===========================================================================

Every parameter with at least one value also gets ``MARK?`` (``:missing``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator
from decimal import Decimal, InvalidOperation
from typing import Any

from medledger.services.search_dates import period_days, range_terms, value_days
from medledger.services.search_numbers import parse_number, point_cells, quantity_units
from medledger.services.search_registry import SearchParameter

__all__ = [
    "CONTAINS_CHARS",
    "MARK",
    "MAX_PREFIX_CHARS",
    "contains_grams",
    "contains_terms",
    "composite_terms",
    "plain_token_terms",
    "string_values",
    "uri_segments",
    "normalize",
    "number_term",
    "parameter_terms",
    "words",
]

#: Starts every modifier term (ASCII unit separator: FHIR strings hold no control characters).
MARK = "\x1f"
#: Words are indexed by their prefixes of 1 to this many characters.
MAX_PREFIX_CHARS = 24
#: ``:contains`` indexes the 3-character pieces of a value's first this many characters;
#: a longer value is marked instead (``MARK`` + ``C``) and is a candidate for every needle.
CONTAINS_CHARS = 64
_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


def normalize(text: str) -> str:
    """Case-fold, strip accents, collapse white space (FHIR string matching)."""
    if text.isascii():  # the common case, and the same answer: no accents to strip
        return " ".join(text.lower().split())
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.casefold().split())


def words(text: str) -> Iterator[str]:
    """Every prefix, up to :data:`MAX_PREFIX_CHARS` characters, of each word of ``text``."""
    for word in normalize(text).replace(",", " ").split():
        for end in range(1, min(len(word), MAX_PREFIX_CHARS) + 1):
            yield word[:end]


def number_term(value: object) -> str | None:
    """A number as its normalized decimal text (``1.50`` and ``1.5`` are one term)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    text = format(number.normalize(), "f")
    return "0" if text in ("-0", "") else text


def contains_grams(text: str) -> list[str]:
    """The distinct 3-character pieces of ``text``, in order (none for a shorter text)."""
    return list(dict.fromkeys(text[i : i + 3] for i in range(len(text) - 2)))


def contains_terms(text: str) -> Iterator[str]:
    """``:contains`` terms of a (normalized) value: ``MARK c`` + each 3-character piece
    of its first :data:`CONTAINS_CHARS` characters, and ``MARK C`` if it is longer.

    A search decrypts the candidates these find and checks each (``services.search``),
    so the pieces need only find a superset.
    """
    yield from (f"{MARK}c{gram}" for gram in contains_grams(text[:CONTAINS_CHARS]))
    if len(text) > CONTAINS_CHARS:
        yield f"{MARK}C"


def string_values(value: Any) -> Iterator[str]:
    """The strings a string parameter's element holds (a HumanName's and an Address's parts)."""
    yield from _strings(value)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        parts: tuple[str, ...] = (
            _NAME_PARTS if "family" in value or "given" in value else _ADDRESS_PARTS
        )
        if "name" in value and isinstance(value["name"], str):  # e.g. a Reference's display
            parts = ("name",)
        for part in parts:
            item = value.get(part)
            for text in item if isinstance(item, list) else [item]:
                if isinstance(text, str):
                    yield text


def _string_terms(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        for text in _strings(value):
            yield f"{MARK}={text}"
            yield from words(text)
            yield from contains_terms(normalize(text))


def _text_terms(text: str) -> Iterator[str]:
    """``:text`` terms: each whole word of a display or text (not every prefix: these
    texts are long and many, and a code's words are searched whole)."""
    for word in normalize(text).replace(",", " ").split():
        yield f"{MARK}~{word[:MAX_PREFIX_CHARS]}"


def _system_code(system: Any, code: Any) -> Iterator[str]:
    if not isinstance(code, str | bool | int) or code == "":
        return
    code = str(code).lower() if isinstance(code, bool) else str(code)
    yield code
    if isinstance(system, str):
        yield f"{system}|{code}"
        yield f"{system}|"
    else:
        yield f"|{code}"


def _token_terms(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        if not isinstance(value, dict):
            yield from _system_code(None, value)
            continue
        codings = value.get("coding")
        if isinstance(codings, list):  # CodeableConcept
            for coding in codings:
                if isinstance(coding, dict):
                    yield from _token_terms([coding])
            if isinstance(value.get("text"), str):
                yield from _text_terms(value["text"])
            continue
        if "code" in value:  # Coding
            yield from _system_code(value.get("system"), value.get("code"))
            if isinstance(value.get("display"), str):
                yield from _text_terms(value["display"])
        elif "value" in value:  # Identifier, ContactPoint
            yield from _system_code(value.get("system"), value.get("value"))
            kind = value.get("type")
            for coding in kind.get("coding", []) if isinstance(kind, dict) else []:
                if isinstance(coding, dict) and isinstance(value.get("value"), str):
                    yield f"{MARK}o{coding.get('system', '')}|{coding.get('code', '')}|{value['value']}"
            if isinstance(kind, dict) and isinstance(kind.get("text"), str):
                yield from _text_terms(kind["text"])


def _reference_terms(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        if isinstance(value, str):  # canonical
            yield value
            yield value.split("|")[0]
            continue
        if not isinstance(value, dict):
            continue
        ref = value.get("reference")
        if isinstance(ref, str) and ref and not ref.startswith("#"):
            yield ref
        ident = value.get("identifier")
        if isinstance(ident, dict):
            yield from (
                f"{MARK}i{t}" for t in _system_code(ident.get("system"), ident.get("value"))
            )


def _date_terms(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        if isinstance(value, dict) and ("start" in value or "end" in value):
            days = period_days(value.get("start"), value.get("end"))
        elif isinstance(value, dict) and isinstance(value.get("event"), list):  # Timing
            yield from _date_terms(value["event"])
            continue
        else:
            days = value_days(value)
        if days is not None:
            yield from range_terms(*days)


def _number_terms(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        number = parse_number(value)
        if number is not None:
            yield from point_cells(number)


def _quantity_terms(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        if not isinstance(value, dict):
            continue
        number = parse_number(value.get("value"))
        if number is None:
            continue
        yield from point_cells(number)
        # The unit on its own: a search with a unit asks for both (cells and unit).
        yield from (f"{MARK}u{unit}" for unit in quantity_units(value) if unit)


def uri_segments(uri: str) -> list[str]:
    """``uri`` cut after each of its path segments, shortest first, without a trailing
    ``/`` (``http://a.org/fhir/x`` → ``http://a.org``, ``http://a.org/fhir``, the whole)."""
    uri = uri.rstrip("/")
    scheme, sep, rest = uri.partition("://")
    head = f"{scheme}{sep}" if sep else ""
    body = rest if sep else uri
    parts = body.split("/")
    return [head + "/".join(parts[: i + 1]) for i in range(len(parts)) if parts[i] or i == 0]


def _uri_terms(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        if isinstance(value, str):
            yield value
            yield from contains_terms(value)
            yield from (f"{MARK}b{prefix}" for prefix in uri_segments(value))


def plain_token_terms(values: Iterable[Any]) -> list[str]:
    """A token's ``code`` and ``system|code`` terms (a composite's token component)."""
    out: list[str] = []
    for value in values:
        codings = value.get("coding") if isinstance(value, dict) else None
        items = codings if isinstance(codings, list) else [value]
        for item in items:
            if isinstance(item, dict):
                system, code = item.get("system"), item.get("code", item.get("value"))
            else:
                system, code = None, item
            if isinstance(code, bool):
                code = str(code).lower()
            if isinstance(code, str | int) and code != "":
                out.append(str(code))
                if isinstance(system, str):
                    out.append(f"{system}|{code}")
    return out


def _composite_part(kind: str, values: list[Any]) -> list[str]:
    if kind == "token":
        return plain_token_terms(values)
    if kind == "quantity":
        numbers = [parse_number(v.get("value")) for v in values if isinstance(v, dict)]
        return [cell for n in numbers if n is not None for cell in point_cells(n)]
    return list(_date_terms(values))


def composite_terms(param: SearchParameter, values: Iterable[Any]) -> Iterator[str]:
    """``first$second`` for each element's pairs of component terms."""
    (first_kind, first_path), (second_kind, second_path) = param.components
    for element in values:
        if not isinstance(element, dict):
            continue
        firsts = _composite_part(first_kind, [v for v, _ in first_path.evaluate(element)])
        if not firsts:
            continue
        seconds = _composite_part(second_kind, [v for v, _ in second_path.evaluate(element)])
        for left in dict.fromkeys(firsts):
            for right in dict.fromkeys(seconds):
                yield f"{left}${right}"


_BY_TYPE = {
    "string": _string_terms,
    "token": _token_terms,
    "reference": _reference_terms,
    "date": _date_terms,
    "number": _number_terms,
    "quantity": _quantity_terms,
    "uri": _uri_terms,
}


def parameter_terms(
    param: SearchParameter, resource: dict[str, Any], present: frozenset[str] | None = None
) -> Iterator[str]:
    """The terms ``resource`` is indexed by for ``param`` (lazily: callers may stop early).

    ``present``: the resource's ``fhirpath_subset.top_level_names``, to skip absent paths.
    """
    values = [v for v, _ in param.path.evaluate(resource, present)]
    if not values:
        return
    found = False
    terms = composite_terms(param, values) if param.type == "composite" else None
    for term in terms if terms is not None else _BY_TYPE[param.type](values):
        found = True
        yield term
    if found:
        yield f"{MARK}?"
