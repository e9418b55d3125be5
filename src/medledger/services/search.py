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
  (``Patient/id`` or ``id``), ``code`` (``system|code`` or ``code``),
  ``date`` (``YYYY-MM-DD``, ``YYYY-MM``, ``YYYY``, with ``eq``/``ge``/``le``/
  ``gt``/``lt`` prefixes, by day; years 1800 to 2200).

Dates are indexed at day, month and year granularity, so a range is answered
by a handful of token look-ups (whole years, whole months, then days).
A query is bounded: at most :data:`MAX_ALTERNATIVES` alternatives per
parameter and :data:`MAX_QUERY_TOKENS` tokens in all, refused before any
token is computed. A resource is bounded too: one that would need more than
:data:`MAX_RESOURCE_TERMS` index entries is refused (no legitimate record
comes near; a 30,000-character name once made 60,001), and collecting its
terms stops as soon as it passes the bound.
"""

from __future__ import annotations

import calendar
import hmac
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, timedelta
from typing import Any

from medledger.core.errors import InvalidInput

__all__ = [
    "MAX_ALTERNATIVES",
    "MAX_PREFIX_CHARS",
    "MAX_QUERY_TOKENS",
    "MAX_RESOURCE_TERMS",
    "SEARCH_PARAMS",
    "TOKEN_SIZE",
    "patient_reference",
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
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant"),
    "Condition": ("onsetDateTime", "recordedDate"),
    "MedicationRequest": ("authoredOn",),
    "Encounter": ("period.start",),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start"),
    "AllergyIntolerance": ("onsetDateTime", "recordedDate"),
    "Immunization": ("occurrenceDateTime",),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
}
_PATIENT_FIELDS = ("subject", "patient")
_DAY = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


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


def _get(resource: Mapping[str, Any], dotted: str) -> Any:
    value: Any = resource
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


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


def _day(value: Any) -> date | None:
    if not isinstance(value, str):
        return None
    m = _DAY.match(value)
    if not m or not m.group(3):
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def _date_terms(day: date) -> list[str]:
    return [f"d:{day.isoformat()}", f"m:{day:%Y-%m}", f"y:{day:%Y}"]


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
        day = _day(resource.get("birthDate"))
        if day is not None:
            terms.update(("birthdate", t) for t in _date_terms(day))
        return terms
    if rtype not in _CODE_FIELDS:
        return terms
    ref = patient_reference(resource)
    if ref is not None:
        terms.add(("patient", ref))
    for field in _CODE_FIELDS[rtype]:
        for coding in _codings(resource.get(field)):
            terms.update(("code", t) for t in _code_terms(coding.get("system"), coding.get("code")))
    for field in _DATE_FIELDS[rtype]:
        day = _day(_get(resource, field))
        if day is not None:
            terms.update(("date", t) for t in _date_terms(day))
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

_PREFIXES = ("eq", "ge", "le", "gt", "lt")
_MIN_DAY, _MAX_DAY = date(1800, 1, 1), date(2200, 12, 31)
#: At most this many alternatives (comma-separated values, over all repeats) per parameter.
MAX_ALTERNATIVES = 64
#: At most this many index tokens per query. A date range costs up to ~470 tokens
#: (whole years from 1800 to 2200 plus the months and days at its ends), so two
#: open-ended ranges fit; 600 alternatives of one (the 9 s query of issue #14) do not.
MAX_QUERY_TOKENS = 1024


def _range_for(value: str) -> tuple[date, date]:
    """The inclusive day range a FHIR date search value denotes (years 1800 to 2200)."""
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    text = value[2:] if value[:2] in _PREFIXES else value
    m = _DAY.fullmatch(text)
    if not m:
        raise InvalidInput(f"date search value {value!r} must be YYYY, YYYY-MM or YYYY-MM-DD")
    year, month, day = int(m.group(1)), m.group(2), m.group(3)
    if not _MIN_DAY.year <= year <= _MAX_DAY.year:
        # Open ranges run from 1800 to 2200; outside them a day before or after
        # can fall off the calendar (``gt9999-12-31``), so such values are refused.
        raise InvalidInput(
            f"date search value {value!r}: years from {_MIN_DAY.year} to {_MAX_DAY.year} only"
        )
    try:
        if day:
            lo = hi = date(year, int(month), int(day))
        elif month:
            lo = date(year, int(month), 1)
            hi = date(year, int(month), calendar.monthrange(year, int(month))[1])
        else:
            lo, hi = date(year, 1, 1), date(year, 12, 31)
    except ValueError:
        raise InvalidInput(f"date search value {value!r} is not a real date") from None
    if prefix == "eq":
        return lo, hi
    if prefix == "ge":
        return lo, _MAX_DAY
    if prefix == "gt":
        return hi + timedelta(days=1), _MAX_DAY
    if prefix == "le":
        return _MIN_DAY, hi
    return _MIN_DAY, lo - timedelta(days=1)  # lt


def _range_terms(lo: date, hi: date) -> list[str]:
    """Cover ``[lo, hi]`` with whole years, whole months and single days."""
    terms: list[str] = []
    day = lo
    while day <= hi:
        year_end = date(day.year, 12, 31)
        month_end = date(day.year, day.month, calendar.monthrange(day.year, day.month)[1])
        if day.month == 1 and day.day == 1 and year_end <= hi:
            terms.append(f"y:{day:%Y}")
            last = year_end
        elif day.day == 1 and month_end <= hi:
            terms.append(f"m:{day:%Y-%m}")
            last = month_end
        else:
            terms.append(f"d:{day.isoformat()}")
            last = day
        if last >= hi:  # also ends the walk at date.max, which has no next day
            break
        day = last + timedelta(days=1)
    return terms


def _param_terms(rtype: str, param: str, value: str) -> list[str]:
    if param in ("date", "birthdate"):
        lo, hi = _range_for(value)
        return _range_terms(lo, hi) if lo <= hi else []
    if param in ("name", "family", "given"):
        words = normalize(value).split()
        if len(words) != 1:
            raise InvalidInput(f"{param} search takes one word, got {value!r}")
        # Only prefixes of up to MAX_PREFIX_CHARS are indexed: compare on those.
        return [words[0][:MAX_PREFIX_CHARS]]
    if param == "patient" and rtype != "Patient" and not value.startswith("Patient/"):
        return [f"Patient/{value}"]
    return [value]


def query_tokens(key: bytes, rtype: str, params: Mapping[str, Iterable[str]]) -> list[set[bytes]]:
    """For each parameter, the set of tokens any of which matches (all parameters must match).

    ``params`` maps a parameter to its values; each value may hold comma
    separated alternatives (FHIR OR). Raises :class:`InvalidInput` for an
    unsupported type, parameter or value, for more than
    :data:`MAX_ALTERNATIVES` alternatives of one parameter, and for a query of
    more than :data:`MAX_QUERY_TOKENS` tokens; the bounds are checked before
    any token is computed, so a refused query costs little.
    """
    allowed = SEARCH_PARAMS.get(rtype)
    if allowed is None:
        raise InvalidInput(f"search is not supported for {rtype}")
    planned: list[tuple[str, list[str]]] = []
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
            terms: list[str] = []
            for alt in alternatives:
                terms.extend(_param_terms(rtype, param, alt))
                if total + len(terms) > MAX_QUERY_TOKENS:
                    raise InvalidInput(
                        f"the search is too broad: it needs more than {MAX_QUERY_TOKENS} index"
                        " look-ups (use fewer alternatives or narrower date ranges)"
                    )
            total += len(terms)
            planned.append((param, terms))
    return [{_token(key, rtype, param, term) for term in terms} for param, terms in planned]
