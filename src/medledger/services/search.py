"""Blind-index search: HMAC tokens of normalized terms, never a plaintext index.

A token is ``HMAC-SHA256(search key, "<type>|<param>|<term>")`` truncated to
16 bytes. The index maps tokens to record ids; without the institution's
search key, tokens reveal nothing but equality.

Supported parameters (``SEARCH_PARAMS``):

* Patient: ``identifier`` (``system|value`` or ``value``), ``name``,
  ``family``, ``given`` (case- and accent-insensitive, "starts with" as FHIR
  string search: each name word is indexed by its prefixes of up to
  :data:`MAX_PREFIX_CHARS` characters, so a search word compares on at most
  that many characters — a longer one, the whole of a long word included,
  finds every name word starting with the same first
  :data:`MAX_PREFIX_CHARS`), ``birthdate``, ``gender``.
* Observation, Condition, MedicationRequest, Encounter, DiagnosticReport,
  AllergyIntolerance, Immunization, Procedure: ``patient``
  (``id``, ``Patient/id`` or an absolute URL ending in ``Patient/id``), ``code``
  (``system|code`` or ``code``), ``date`` (``YYYY-MM-DD``, ``YYYY-MM``, ``YYYY``,
  with every FHIR prefix, by day; years 1800 to 2200).

Dates and Periods are ranges of days compared as FHIR ranges
(``services.search_dates``): a value is indexed by the calendar buckets of its
start, its end and its whole, so each prefix is answered by a handful of
token look-ups (whole decades, years, months, then days). A query is a small
tree (:class:`AllOf`, :class:`AnyOf`, :class:`Not` over :class:`Match`) that
:func:`evaluate` resolves through the index.
A query is bounded: at most :data:`MAX_ALTERNATIVES` alternatives per
parameter and :data:`MAX_QUERY_TOKENS` tokens in all, refused before any
token is computed. A resource is bounded too: one that would need more than
:data:`MAX_RESOURCE_TERMS` index entries is refused (no legitimate record
comes near; a 30,000-character name once made 60,001), and collecting its
terms stops as soon as it passes the bound.
"""

from __future__ import annotations

import hmac
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from medledger.core.errors import InvalidInput
from medledger.services.search_dates import date_condition, period_days, range_terms, value_days

__all__ = [
    "MAX_ALTERNATIVES",
    "MAX_PREFIX_CHARS",
    "MAX_QUERY_TOKENS",
    "MAX_RESOURCE_TERMS",
    "SEARCH_PARAMS",
    "TOKEN_SIZE",
    "AllOf",
    "AnyOf",
    "Match",
    "Not",
    "Query",
    "evaluate",
    "patient_reference",
    "plan_query",
    "query_tokens",
    "resource_tokens",
]

TOKEN_SIZE = 16
#: Name words are indexed by their prefixes of 1 to this many characters.
MAX_PREFIX_CHARS = 24
#: A resource needing more index entries than this is refused. A patient with three
#: names of four 24-letter words each needs under 600.
MAX_RESOURCE_TERMS = 2048
_CLINICAL = ("patient", "code", "date")
SEARCH_PARAMS: dict[str, tuple[str, ...]] = {
    "Patient": ("identifier", "name", "family", "given", "birthdate", "gender"),
    **{
        t: _CLINICAL
        for t in (
            "Observation",
            "Condition",
            "MedicationRequest",
            "Encounter",
            "DiagnosticReport",
            "AllergyIntolerance",
            "Immunization",
            "Procedure",
        )
    },
}
# Where each clinical type keeps its "code" and "date".
_CODE_FIELDS: dict[str, tuple[str, ...]] = {
    "Observation": ("code",),
    "Condition": ("code",),
    "MedicationRequest": ("medicationCodeableConcept",),
    "Encounter": ("type", "class", "serviceType"),
    "DiagnosticReport": ("code",),
    "AllergyIntolerance": ("code",),
    "Immunization": ("vaccineCode",),
    "Procedure": ("code",),
}
_DATE_FIELDS: dict[str, tuple[str, ...]] = {
    # FHIR R4 ``date`` is the clinically relevant time (``effective[x]``), not ``issued``.
    # A field ending in "Period" (or Encounter.period) is a Period: indexed as its range.
    "Observation": ("effectiveDateTime", "effectivePeriod", "effectiveInstant"),
    "Condition": ("onsetDateTime", "onsetPeriod", "recordedDate"),
    "MedicationRequest": ("authoredOn",),
    "Encounter": ("period",),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod"),
    "AllergyIntolerance": ("onsetDateTime", "onsetPeriod", "recordedDate"),
    "Immunization": ("occurrenceDateTime",),
    "Procedure": ("performedDateTime", "performedPeriod"),
}
_PATIENT_FIELDS = ("subject", "patient")


def _token(key: bytes, rtype: str, param: str, term: str) -> bytes:
    # hmac.digest: the one-shot C path, several times faster than hmac.new(...).digest().
    return hmac.digest(key, f"{rtype}|{param}|{term}".encode(), "sha256")[:TOKEN_SIZE]


def normalize(text: str) -> str:
    """Case-fold, strip accents, collapse white space (FHIR string matching)."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.casefold().split())


def patient_reference(resource: Mapping[str, Any]) -> str | None:
    """The ``Patient/<id>`` a resource is about, if any (a Patient is about itself)."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return f"Patient/{rid}" if isinstance(rid, str) else None
    for name in _PATIENT_FIELDS:
        ref = resource.get(name)
        if isinstance(ref, dict):
            value = ref.get("reference")
            if isinstance(value, str) and value.startswith("Patient/"):
                return value
    return None


def _codings(value: Any) -> Iterator[Mapping[str, Any]]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict):
            if "coding" in item and isinstance(item["coding"], list):
                yield from (c for c in item["coding"] if isinstance(c, dict))
            elif "code" in item:  # a bare Coding (Encounter.class)
                yield item


def _code_terms(system: Any, code: Any) -> list[str]:
    if not isinstance(code, str):
        return []
    terms = [code]
    if isinstance(system, str):
        terms.append(f"{system}|{code}")
    return terms


def _date_value_terms(value: Any) -> list[str]:
    """Index terms of a date, dateTime, instant or Period (see ``services.search_dates``)."""
    if isinstance(value, dict):
        days = period_days(value.get("start"), value.get("end"))
    else:
        days = value_days(value)
    return [] if days is None else range_terms(*days)


def _words(text: str) -> Iterator[str]:
    """Every prefix, up to :data:`MAX_PREFIX_CHARS` characters, of each word of ``text``."""
    for word in normalize(text).replace(",", " ").split():
        for end in range(1, min(len(word), MAX_PREFIX_CHARS) + 1):
            yield word[:end]


class _Terms(set[tuple[str, str]]):
    """A term set that refuses to grow past ``limit`` entries (``None``: unbounded)."""

    def __init__(self, limit: int | None) -> None:
        super().__init__()
        self._limit = limit

    def update(self, *others: Iterable[tuple[str, str]]) -> None:
        for other in others:
            for term in other:
                self.add(term)

    def add(self, term: tuple[str, str]) -> None:
        super().add(term)
        if self._limit is not None and len(self) > self._limit:
            raise InvalidInput(
                f"the resource has too many searchable terms (more than {self._limit} index "
                "entries: names, identifiers, codes); shorten or split it"
            )


def resource_terms(
    resource: Mapping[str, Any], *, limit: int | None = MAX_RESOURCE_TERMS
) -> set[tuple[str, str]]:
    """The ``(param, term)`` pairs a resource is findable by.

    Raises :class:`InvalidInput` once there would be more than ``limit`` of them.
    """
    rtype = resource.get("resourceType")
    terms: set[tuple[str, str]] = _Terms(limit)
    if rtype == "Patient":
        for ident in resource.get("identifier") or []:
            if isinstance(ident, dict):
                terms.update(
                    ("identifier", t) for t in _code_terms(ident.get("system"), ident.get("value"))
                )
        for name in resource.get("name") or []:
            if not isinstance(name, dict):
                continue
            family = name.get("family")
            givens = [g for g in name.get("given") or [] if isinstance(g, str)]
            if isinstance(family, str):
                terms.update(("family", w) for w in _words(family))
                terms.update(("name", w) for w in _words(family))
            for g in givens:
                terms.update(("given", w) for w in _words(g))
                terms.update(("name", w) for w in _words(g))
            if isinstance(name.get("text"), str):
                terms.update(("name", w) for w in _words(name["text"]))
        if isinstance(resource.get("gender"), str):
            terms.add(("gender", resource["gender"]))
        terms.update(("birthdate", t) for t in _date_value_terms(resource.get("birthDate")))
        return terms
    if rtype not in _CODE_FIELDS:
        return terms
    ref = patient_reference(resource)
    if ref is not None:
        terms.add(("patient", ref))
    for name in _PATIENT_FIELDS:
        # An absolute reference is another server's resource: found by its very URL.
        field = resource.get(name)
        value = field.get("reference") if isinstance(field, dict) else None
        if isinstance(value, str) and "://" in value:
            terms.add(("patient", value))
    for field in _CODE_FIELDS[rtype]:
        for coding in _codings(resource.get(field)):
            terms.update(("code", t) for t in _code_terms(coding.get("system"), coding.get("code")))
    for field in _DATE_FIELDS[rtype]:
        terms.update(("date", t) for t in _date_value_terms(resource.get(field)))
    return terms


def resource_tokens(
    key: bytes, resource: Mapping[str, Any], *, limit: int | None = MAX_RESOURCE_TERMS
) -> set[bytes]:
    """Blind-index tokens for a resource (its latest version is what search finds).

    Raises :class:`InvalidInput` for a resource of more than ``limit`` terms
    (``None`` for a version already stored, which must be indexed as it is).
    """
    rtype = str(resource.get("resourceType"))
    return {_token(key, rtype, p, t) for p, t in resource_terms(resource, limit=limit)}


# -- queries ----------------------------------------------------------------------

#: At most this many alternatives (comma-separated values, over all repeats) per parameter.
MAX_ALTERNATIVES = 64
#: At most this many index tokens per query. A date range costs up to ~200 tokens
#: (whole decades, years, months and days at its ends; ``ge`` and ``le`` two such
#: covers), so several open-ended ranges fit; 600 alternatives of one (the 9 s query
#: of issue #14) do not.
MAX_QUERY_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class Match:
    """Resources holding any of ``tokens`` (none: nothing matches)."""

    tokens: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class AllOf:
    """Resources matching every part (no parts: every resource of the type)."""

    parts: tuple[Query, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """Resources matching at least one part."""

    parts: tuple[Query, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """Resources of the type not matching ``part``."""

    part: Query


Query = Match | AllOf | AnyOf | Not
Tokenize = Callable[[str, str], bytes]


def _reference_terms(param: str, value: str) -> list[str]:
    """A reference search value as the terms it may be indexed under.

    ``id``, ``Type/id`` and an absolute URL ending in ``Type/id`` (FHIR allows
    all three) all find a relative ``Patient/id`` reference; an absolute URL
    also finds a resource whose reference is that very URL.
    """
    if "://" in value:
        parts = value.split("?")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "_history" and len(parts) >= 4:
            parts = parts[:-2]
        if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
            return [f"Patient/{parts[-1]}", value]
        return [value]
    if not value.startswith("Patient/"):
        return [f"Patient/{value}"]
    return [value]


def _alternative(
    rtype: str, param: str, value: str, tokenize: Tokenize, today: date
) -> tuple[Query, int]:
    """One alternative of a parameter as a query, and how many tokens it takes."""

    def match(terms: Iterable[str]) -> Match:
        return Match(frozenset(tokenize(param, t) for t in terms))

    if param in ("date", "birthdate"):
        condition = date_condition(value, today=today)
        parts = tuple(match(terms) for terms in condition.all_of)
        size = sum(len(p.tokens) for p in parts)
        query: Query = parts[0] if len(parts) == 1 else AllOf(parts)
        return (Not(query) if condition.negated else query), size
    if param in ("name", "family", "given"):
        words = normalize(value).split()
        if len(words) != 1:
            raise InvalidInput(f"{param} search takes one word, got {value!r}")
        # Only prefixes of up to MAX_PREFIX_CHARS are indexed: compare on those.
        return match([words[0][:MAX_PREFIX_CHARS]]), 1
    if param == "patient" and rtype != "Patient":
        terms = _reference_terms(param, value)
        return match(terms), len(terms)
    return match([value]), 1


def _merge(parts: list[Query]) -> Query:
    """Alternatives as one query: plain matches fold into one set of tokens."""
    plain = [p for p in parts if isinstance(p, Match)]
    rest: list[Query] = [p for p in parts if not isinstance(p, Match)]
    if plain:
        rest.insert(0, Match(frozenset().union(*(p.tokens for p in plain))))
    return rest[0] if len(rest) == 1 else AnyOf(tuple(rest))


def plan_query(
    rtype: str, params: Mapping[str, Iterable[str]], tokenize: Tokenize, *, today: date
) -> Query:
    """The query for ``params``: every parameter must match, each repeat of one too.

    Each value may hold comma separated alternatives (FHIR OR). Raises
    :class:`InvalidInput` for an unsupported type, parameter or value, for
    more than :data:`MAX_ALTERNATIVES` alternatives of one parameter, and for
    a query of more than :data:`MAX_QUERY_TOKENS` tokens; the alternatives are
    counted before any token is computed, and the tokens as they are.
    """
    allowed = SEARCH_PARAMS.get(rtype)
    if allowed is None:
        raise InvalidInput(f"search is not supported for {rtype}")
    parts: list[Query] = []
    total = 0
    for param, values in params.items():
        if param not in allowed:
            raise InvalidInput(
                f"unsupported search parameter {param!r} for {rtype} (supported: {', '.join(allowed)})"
            )
        alternatives_of_param = 0
        for value in values:
            alternatives = [v for v in value.split(",") if v]
            if not alternatives:
                raise InvalidInput(f"empty value for search parameter {param!r}")
            alternatives_of_param += len(alternatives)
            if alternatives_of_param > MAX_ALTERNATIVES:
                raise InvalidInput(
                    f"search parameter {param!r} has more than {MAX_ALTERNATIVES} alternatives"
                )
            queries = []
            for alt in alternatives:
                query, size = _alternative(rtype, param, alt, tokenize, today)
                total += size
                if total > MAX_QUERY_TOKENS:
                    raise InvalidInput(
                        f"the search is too broad: it needs more than {MAX_QUERY_TOKENS} index"
                        " look-ups (use fewer alternatives or narrower date ranges)"
                    )
                queries.append(query)
            parts.append(_merge(queries))
    return AllOf(tuple(parts))


def query_tokens(
    key: bytes, rtype: str, params: Mapping[str, Iterable[str]], *, today: date
) -> Query:
    """:func:`plan_query` with the institution's blind-index tokens."""
    return plan_query(rtype, params, lambda p, t: _token(key, rtype, p, t), today=today)


def evaluate(
    query: Query,
    *,
    find: Callable[[list[frozenset[bytes]]], set[str]],
    every: Callable[[], set[str]],
) -> set[str]:
    """The ids matching ``query``.

    ``find(groups)`` gives the ids holding a token of every group (the index
    resolves a conjunction of plain matches at once, most selective first);
    ``every()`` gives every id of the type, for complements and for no parameters.
    """
    if isinstance(query, Match):
        return find([query.tokens])
    if isinstance(query, Not):
        return every() - evaluate(query.part, find=find, every=every)
    if isinstance(query, AnyOf):
        found: set[str] = set()
        for part in query.parts:
            found |= evaluate(part, find=find, every=every)
        return found
    plain = [p.tokens for p in query.parts if isinstance(p, Match)]
    others = [p for p in query.parts if not isinstance(p, Match)]
    result = find(plain) if plain else None
    for part in sorted(others, key=lambda p: isinstance(p, Not)):
        if result is not None and not result:
            return result
        if isinstance(part, Not):
            base = every() if result is None else result
            result = base - evaluate(part.part, find=find, every=every)
        else:
            ids = evaluate(part, find=find, every=every)
            result = ids if result is None else result & ids
    return every() if result is None else result
