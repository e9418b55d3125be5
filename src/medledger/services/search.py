"""Blind-index search: HMAC tokens of normalized terms, never a plaintext index.

A token is ``HMAC-SHA256(search key, "<type>|<param>|<term>")`` truncated to
16 bytes. The index maps tokens to record ids; without the institution's
search key, tokens reveal nothing but equality.

Every standard R4 search parameter of type string, token, reference, date,
number, quantity or uri is served (``services.search_registry``); what terms
a value gives is ``services.search_terms``. String search is "starts with"
by word, case- and accent-insensitive: each word is indexed by its prefixes of
up to :data:`MAX_PREFIX_CHARS` characters, so a search word compares on at
most that many. Dates and Periods are ranges of days compared as FHIR ranges
with every prefix (``services.search_dates``). Modifiers: ``:missing`` (all
types), ``:exact`` (string), ``:not``, ``:text``, ``:of-type`` (token),
``:identifier`` and type modifiers (reference). Numbers and quantities are
compared with every prefix, with the search value's implicit precision
(``services.search_numbers``).

A query is a small tree (:class:`AllOf`, :class:`AnyOf`, :class:`Not` over
:class:`Match`) that :func:`evaluate` resolves through the index. It is
bounded: at most :data:`MAX_ALTERNATIVES` alternatives per parameter and
:data:`MAX_QUERY_TOKENS` tokens in all, refused as soon as they are passed. A
resource is bounded too: one that would need more than
:data:`MAX_RESOURCE_TERMS` index entries is refused (no legitimate record
comes near; a 30,000-character name once made 60,001), and collecting its
terms stops as soon as it passes the bound.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from itertools import islice
from typing import Any

from medledger.core.errors import InvalidInput
from medledger.services.fhirpath_subset import reference_type, top_level_names
from medledger.services.search_dates import date_condition
from medledger.services.search_numbers import number_condition
from medledger.services.search_registry import SearchParameter, registry
from medledger.services.search_terms import (
    MARK,
    MAX_PREFIX_CHARS,
    contains_grams,
    normalize,
    parameter_terms,
    string_values,
    uri_segments,
)
from medledger.services.value_sets import SEARCH_VALUE_SETS

__all__ = [
    "MAX_ALTERNATIVES",
    "MAX_PREFIX_CHARS",
    "MAX_QUERY_TOKENS",
    "MAX_RESOURCE_TERMS",
    "ROW_PARAMETERS",
    "TERMS_VERSION",
    "TOKEN_SIZE",
    "AllOf",
    "AnyOf",
    "Match",
    "Not",
    "Query",
    "Verified",
    "evaluate",
    "is_chain",
    "known_parameter",
    "normalize",
    "patient_reference",
    "plan_query",
    "query_tokens",
    "reference_match",
    "resource_terms",
    "resource_tokens",
    "split_parameter",
]

TOKEN_SIZE = 16
#: The set of terms :func:`resource_terms` makes. Bump it whenever any resource's terms
#: change (a test pins them): an index made with another version is re-indexed
#: (``services.records.reindex``). 1 (or none recorded): decision 0034's registry
#: terms; 2: numbers as decimal cells, ``:contains`` pieces; 3: uri ``:below`` segments,
#: composite parameters; 4: a quantity's unit indexed apart from its cells.
TERMS_VERSION = 4
#: Parameters answered from the index row, not from tokens: ``_lastUpdated`` is the
#: row's own time (plaintext there already), so it costs no tokens.
ROW_PARAMETERS = frozenset({"_lastUpdated"})
#: A resource needing more index entries than this is refused. A patient with three
#: names of four 24-letter words each needs under 600.
MAX_RESOURCE_TERMS = 2048
_PATIENT_FIELDS = ("subject", "patient")


def _token(key: bytes, rtype: str, param: str, term: str) -> bytes:
    # hmac.digest: the one-shot C path, several times faster than hmac.new(...).digest().
    return hmac.digest(key, f"{rtype}|{param}|{term}".encode(), "sha256")[:TOKEN_SIZE]


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


def resource_terms(
    resource: Mapping[str, Any], *, limit: int | None = MAX_RESOURCE_TERMS
) -> set[tuple[str, str]]:
    """The ``(param, term)`` pairs a resource is findable by, over every registry parameter.

    Raises :class:`InvalidInput` once there would be more than ``limit`` of them
    (terms are taken in bounded slices, so a huge value is never expanded whole).
    """
    terms: set[tuple[str, str]] = set()
    body = dict(resource)
    present = top_level_names(body)
    for code, param in registry().parameters(str(resource.get("resourceType"))).items():
        if code in ROW_PARAMETERS or not param.path.may_select(present):
            continue
        pending = parameter_terms(param, body, present)
        room = 1 + (limit - len(terms) if limit is not None else 4096)
        while True:
            chunk = list(islice(pending, room))
            terms.update((code, t) for t in chunk)
            if limit is not None and len(terms) > limit:
                raise InvalidInput(
                    f"the resource has too many searchable terms (more than {limit} index "
                    "entries: names, identifiers, codes); shorten or split it"
                )
            if len(chunk) < room:
                break
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


@dataclass(frozen=True, slots=True)
class Verified:
    """Resources matching ``part`` (candidates) whose decrypted content ``accept`` holds.

    The index finds a superset (``:contains`` pieces); the exact test needs the
    values, so the caller decrypts each candidate (a bounded number of them).
    """

    part: Query
    accept: Callable[[Mapping[str, Any]], bool] = field(compare=False)


Query = Match | AllOf | AnyOf | Not | Verified
Check = Callable[[set[str], Callable[[Mapping[str, Any]], bool]], set[str]]
Tokenize = Callable[[str, str], bytes]


def split_parameter(key: str) -> tuple[str, str | None]:
    """``code:text`` → ``("code", "text")``; ``code`` → ``("code", None)``."""
    name, _, modifier = key.partition(":")
    return name, (modifier or None)


def _reference_query_terms(
    param: SearchParameter, value: str, type_modifier: str | None
) -> list[str]:
    """A reference search value as the terms it may be indexed under.

    ``id`` (with the parameter's target types, or the type modifier's),
    ``Type/id``, and an absolute URL — which finds a reference written as
    that URL and, when it ends in ``Type/id``, the relative ``Type/id`` too.
    """
    if "://" in value:
        kind = reference_type(value)
        if kind is None:
            return [value, value.split("|")[0]]
        parts = value.split("?")[0].rstrip("/").split("/")
        if len(parts) >= 4 and parts[-2] == "_history":
            parts = parts[:-2]
        return [f"{kind}/{parts[-1]}", value]
    if "/" in value:
        if type_modifier is not None and not value.startswith(f"{type_modifier}/"):
            return []
        return [value]
    targets = (type_modifier,) if type_modifier else param.targets
    return [f"{t}/{value}" for t in targets] or [value]


def _number_terms(param: SearchParameter, value: str) -> tuple[list[str], bool, str]:
    """A number or quantity search value as index terms, whether they are negated (``ne``),
    and the unit form it names (``""``, ``||code`` or ``|system|code``).

    ``[prefix]number`` for both; a quantity may add ``|system|code`` or ``||code``.
    """
    number, unit = value, ""
    if "|" in value:
        number, _, rest = value.partition("|")
        if param.type != "quantity" or rest.count("|") != 1 or not rest.split("|")[1]:
            raise InvalidInput(
                f"{param.code!r}: {value!r} is not [prefix]number"
                + ("|system|code or [prefix]number||code" if param.type == "quantity" else "")
            )
        unit = f"|{rest}"
    condition = number_condition(number)
    return list(condition.cells), condition.negated, unit


#: A ``:contains`` search asks the index for at most this many of its needle's pieces
#: (any subset finds a superset of the matches; the check after decryption is exact).
MAX_CONTAINS_GRAMS = 12


def _contains(param: SearchParameter, value: str, match: Callable[[Iterable[str]], Match]) -> Query:
    """``:contains``: the candidates holding the needle's 3-character pieces (or a value
    too long to be indexed whole), each checked after decryption.

    A needle of one or two characters has no piece: every resource with a value is a
    candidate (the caller bounds how many it decrypts).
    """
    needle = normalize(value) if param.type == "string" else value
    if not needle.strip():
        raise InvalidInput(f"empty value for {param.code}:contains")
    grams = contains_grams(needle)[:MAX_CONTAINS_GRAMS]
    if grams:
        pieces = [match([f"{MARK}c{g}"]) for g in grams]
        candidates: Query = AnyOf((AllOf(tuple(pieces)), match([f"{MARK}C"])))
    else:
        candidates = match([f"{MARK}?"])

    def accept(resource: Mapping[str, Any]) -> bool:
        for element, _ in param.path.evaluate(dict(resource)):
            if param.type == "string":
                if any(needle in normalize(text) for text in string_values(element)):
                    return True
            elif isinstance(element, str) and needle in element:
                return True
        return False

    return Verified(candidates, accept)


def _value_set_terms(param: SearchParameter, value: str) -> list[str]:
    """``:in`` / ``:not-in``: every code of a value set the node knows, with its system
    and (for a bare ``code`` element, which has none) without."""
    known = SEARCH_VALUE_SETS.get(value.split("|")[0])
    if known is None:
        raise InvalidInput(
            f"{param.code}: unknown value set {value!r} (known: "
            f"{', '.join(sorted(SEARCH_VALUE_SETS))})"
        )
    system, codes = known
    return [term for code in sorted(codes) for term in (f"{system}|{code}", f"|{code}")]


def _composite_query(
    param: SearchParameter, value: str, match: Callable[[Iterable[str]], Match], today: date
) -> tuple[Query, int]:
    """``first$second``: a token, then a quantity, a date or a token (no ``ne``, no unit)."""
    first, sep, second = value.partition("$")
    if not sep or "$" in second or not first or not second:
        raise InvalidInput(f"{param.code} takes two values joined by '$', got {value!r}")
    if first.startswith("|") or first.endswith("|"):
        raise InvalidInput(f"{param.code}: the first value is code or system|code")
    kind = param.components[1][0]
    if kind == "token":
        return match([f"{first}${second}"]), 1
    if kind == "quantity":
        if "|" in second:
            raise InvalidInput(f"{param.code}: the quantity is compared without a unit")
        numbers = number_condition(second)
        if numbers.negated:
            raise InvalidInput(f"{param.code}: the prefix ne is not served for composites")
        return match([f"{first}${c}" for c in numbers.cells]), len(numbers.cells)
    dates = date_condition(second, today=today)
    if dates.negated:
        raise InvalidInput(f"{param.code}: the prefix ne is not served for composites")
    parts = tuple(match([f"{first}${t}" for t in terms]) for terms in dates.all_of)
    size = sum(len(p.tokens) for p in parts)
    return (parts[0] if len(parts) == 1 else AllOf(parts)), size


_MODIFIERS = {
    "string": {"exact", "contains", "missing"},
    "token": {"not", "text", "of-type", "in", "not-in", "missing"},
    "reference": {"identifier", "missing"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "uri": {"contains", "below", "above", "missing"},
    "composite": {"missing"},
}


def _alternative(
    param: SearchParameter, modifier: str | None, value: str, tokenize: Tokenize, today: date
) -> tuple[Query, int]:
    """One alternative of a parameter as a query, and how many tokens it takes."""

    def match(terms: Iterable[str]) -> Match:
        return Match(frozenset(tokenize(param.code, t) for t in terms))

    if modifier == "missing":
        if value not in ("true", "false"):
            raise InvalidInput(f"{param.code}:missing takes true or false, got {value!r}")
        present = match([f"{MARK}?"])
        return (Not(present) if value == "true" else present), 1
    if param.type == "date":
        condition = date_condition(value, today=today)
        parts = tuple(match(terms) for terms in condition.all_of)
        size = sum(len(p.tokens) for p in parts)
        query: Query = parts[0] if len(parts) == 1 else AllOf(parts)
        if condition.negated:  # ``ne`` compares values: a resource without one is not "ne"
            return AllOf((match([f"{MARK}?"]), Not(query))), size + 1
        return query, size
    if modifier == "contains":
        return _contains(param, value, match), MAX_CONTAINS_GRAMS + 1
    if param.type == "composite":
        return _composite_query(param, value, match, today)
    if modifier in ("in", "not-in"):
        terms = _value_set_terms(param, value)
        found_in = match(terms)
        return (Not(found_in) if modifier == "not-in" else found_in), len(terms)
    if modifier == "below":  # the value is a prefix of the resource's URI, by segments
        return match([f"{MARK}b{value.rstrip('/')}"]), 1
    if modifier == "above":  # the resource's URI is a prefix of the value, by segments
        terms = [t for p in uri_segments(value) for t in (p, f"{p}/")]
        return match(terms), len(terms)
    if param.type == "string" and modifier == "exact":
        return match([f"{MARK}={value}"]), 1
    if param.type == "string" or modifier == "text":
        found = normalize(value).replace(",", " ").split()
        if not found:
            raise InvalidInput(f"empty value for search parameter {param.code!r}")
        # Every word must start a word of the value; only prefixes of up to
        # MAX_PREFIX_CHARS are indexed, so compare on those.
        mark = f"{MARK}~" if modifier == "text" else ""
        each = [match([f"{mark}{w[:MAX_PREFIX_CHARS]}"]) for w in found]
        return (each[0] if len(each) == 1 else AllOf(tuple(each))), len(each)
    if param.type == "token":
        if modifier == "of-type":
            if value.count("|") != 2:
                raise InvalidInput(f"{param.code}:of-type takes system|code|value, got {value!r}")
            return match([f"{MARK}o{value}"]), 1
        found_match = match([value])
        return (Not(found_match) if modifier == "not" else found_match), 1
    if param.type == "reference":
        if modifier == "identifier":
            return match([f"{MARK}i{value}"]), 1
        terms = _reference_query_terms(param, value, modifier)
        return match(terms), len(terms)
    if param.type in ("number", "quantity"):
        terms, negated, unit = _number_terms(param, value)
        # The value's cells, and the unit (indexed apart: a resource holding several
        # quantities may pair one's value with another's unit).
        present = match([f"{MARK}u{unit}" if unit else f"{MARK}?"])
        if negated:  # ``ne`` compares values: a resource without one (in the unit) is not "ne"
            return AllOf((present, Not(match(terms)))), len(terms) + 1
        return (AllOf((match(terms), present)) if unit else match(terms)), len(terms) + 1
    return match([value]), 1  # uri


def _check_modifier(rtype: str, param: SearchParameter, modifier: str | None) -> None:
    if modifier is None:
        return
    if param.type == "reference" and modifier in param.targets:
        return
    if modifier not in _MODIFIERS[param.type]:
        raise InvalidInput(
            f"modifier :{modifier} is not supported for {rtype} search parameter "
            f"{param.code!r} ({param.type})"
        )


def _merge(parts: list[Query]) -> Query:
    """Alternatives as one query: plain matches fold into one set of tokens."""
    plain = [p for p in parts if isinstance(p, Match)]
    rest: list[Query] = [p for p in parts if not isinstance(p, Match)]
    if plain:
        rest.insert(0, Match(frozenset().union(*(p.tokens for p in plain))))
    return rest[0] if len(rest) == 1 else AnyOf(tuple(rest))


def reference_match(key: bytes, rtype: str, code: str, references: Iterable[str]) -> Match:
    """Resources of ``rtype`` whose reference parameter ``code`` names any of ``references``
    (``Type/id``): how a chained parameter's or ``_has``'s findings become a query."""
    return Match(frozenset(_token(key, rtype, code, ref) for ref in references))


def is_chain(key: str) -> bool:
    """``subject.name`` or ``subject:Patient.name``: a chained parameter."""
    return "." in key and not key.startswith("_has:")


def known_parameter(rtype: str, key: str) -> bool:
    """Whether ``key`` (with its modifier) names a parameter search serves for ``rtype``."""
    if key.startswith("_has:"):
        parts = key.split(":", 3)
        return len(parts) == 4 and registry().get(parts[1], parts[2]) is not None
    if is_chain(key):
        head, _, rest = key.partition(".")
        name, modifier = split_parameter(head)
        param = registry().get(rtype, name)
        if param is None or param.type != "reference":
            return False
        targets = (modifier,) if modifier else param.targets
        return any(known_parameter(t, rest) for t in targets)
    name, modifier = split_parameter(key)
    param = registry().get(rtype, name)
    if param is None:
        return False
    try:
        _check_modifier(rtype, param, modifier)
    except InvalidInput:
        return False
    return True


def plan_query(
    rtype: str, params: Mapping[str, Iterable[str]], tokenize: Tokenize, *, today: date
) -> Query:
    """The query for ``params``: every parameter must match, each repeat of one too.

    Keys are parameter codes with an optional modifier (``code:not``); each
    value may hold comma separated alternatives (FHIR OR). Raises
    :class:`InvalidInput` for an unknown type, parameter or modifier, a bad
    value, more than :data:`MAX_ALTERNATIVES` alternatives of one parameter,
    and a query of more than :data:`MAX_QUERY_TOKENS` tokens.
    """
    served = registry().parameters(rtype)
    if not served:
        raise InvalidInput(f"search is not supported for {rtype}")
    parts: list[Query] = []
    total = 0
    for key, values in params.items():
        name, modifier = split_parameter(key)
        if name in ROW_PARAMETERS:
            continue  # the caller filters rows by these (RecordSearch.matching)
        param = served.get(name)
        if param is None:
            raise InvalidInput(
                f"unknown search parameter {name!r} for {rtype} (see GET /fhir/metadata; "
                "send 'Prefer: handling=lenient' to have unknown parameters ignored)"
            )
        _check_modifier(rtype, param, modifier)
        alternatives_of_param = 0
        for value in values:
            alternatives = [v for v in value.split(",") if v]
            if not alternatives:
                raise InvalidInput(f"empty value for search parameter {name!r}")
            alternatives_of_param += len(alternatives)
            if alternatives_of_param > MAX_ALTERNATIVES:
                raise InvalidInput(
                    f"search parameter {name!r} has more than {MAX_ALTERNATIVES} alternatives"
                )
            queries = []
            for alt in alternatives:
                query, size = _alternative(param, modifier, alt, tokenize, today)
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
    check: Check | None = None,
) -> set[str]:
    """The ids matching ``query``.

    ``find(groups)`` gives the ids holding a token of every group (the index
    resolves a conjunction of plain matches at once, most selective first);
    ``every()`` gives every id of the type, for complements and for no parameters;
    ``check(ids, accept)`` the ids whose decrypted resource ``accept`` holds (for
    :class:`Verified`: applied last in a conjunction, to the fewest candidates).
    """

    def again(part: Query) -> set[str]:
        return evaluate(part, find=find, every=every, check=check)

    def verify(part: Verified, candidates: set[str]) -> set[str]:
        if check is None:
            raise InvalidInput("this search needs the records' contents (:contains)")
        return check(candidates, part.accept) if candidates else set()

    if isinstance(query, Match):
        return find([query.tokens])
    if isinstance(query, Verified):
        return verify(query, again(query.part))
    if isinstance(query, Not):
        return every() - again(query.part)
    if isinstance(query, AnyOf):
        found: set[str] = set()
        for part in query.parts:
            found |= again(part)
        return found
    plain = [p.tokens for p in query.parts if isinstance(p, Match)]
    others = [p for p in query.parts if not isinstance(p, Match)]
    result = find(plain) if plain else None
    # Index look-ups first, complements next, decryption last (on the fewest ids).
    for part in sorted(others, key=lambda p: (isinstance(p, Verified), isinstance(p, Not))):
        if result is not None and not result:
            return result
        if isinstance(part, Not):
            base = every() if result is None else result
            result = base - again(part.part)
        elif isinstance(part, Verified):
            candidates = again(part.part)
            result = verify(part, candidates if result is None else result & candidates)
        else:
            ids = again(part)
            result = ids if result is None else result & ids
    return every() if result is None else result
