"""Blind-index search: FHIR search semantics through HMAC tokens, and the pure term logic."""

from __future__ import annotations

import asyncio
import calendar
import itertools
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.core.errors import InvalidInput
from medledger.node import Node, init_node, open_node
from medledger.services.records.sealing import Sealer
from medledger.services.search import (
    MAX_ALTERNATIVES,
    MAX_PREFIX_CHARS,
    MAX_QUERY_TOKENS,
    MAX_RESOURCE_TERMS,
    TOKEN_SIZE,
    AllOf,
    AnyOf,
    Match,
    Query,
    _token,
    evaluate,
    normalize,
    patient_reference,
    resource_terms,
    resource_tokens,
)
from medledger.services.search import query_tokens as plan_tokens
from medledger.services.search_dates import cover, search_days
from medledger.services.search_terms import CONTAINS_CHARS, MARK
from medledger.storage.keystore import KdfParams
from medledger.synthetic import generate_patient

T = TypeVar("T")
PW = b"records test passphrase"
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"


def run(root: Path, fn: Callable[[Node], Awaitable[T]]) -> T:
    async def go() -> T:
        node = open_node(root, PW)
        try:
            return await fn(node)
        finally:
            await node.close()

    return asyncio.run(go())


def patient(
    pid: str,
    family: str,
    given_names: list[str],
    birth: str,
    gender: str,
    ident: tuple[str, str],
    text: str | None = None,
) -> dict[str, Any]:
    name: dict[str, Any] = {"family": family, "given": given_names}
    if text is not None:
        name["text"] = text
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": ident[0], "value": ident[1]}],
        "name": [name],
        "birthDate": birth,
        "gender": gender,
    }


def observation(oid: str, pid: str, system: str, code: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
    }


PATIENTS = [
    patient("mueller", "Müller", ["Anna", "Maria"], "1980-02-29", "female", ("urn:mrn", "MRN-1")),
    patient("smith", "Smith", ["John"], "1980-03-01", "male", ("urn:other", "MRN-1")),
    patient("mulligan", "Mulligan", ["Peter"], "1975-12-31", "male", ("urn:mrn", "X9")),
    patient("garcia", "García", ["José"], "1999-07-04", "other", ("urn:mrn", "G7"), "José García"),
]
OBSERVATIONS = [
    observation("o1", "mueller", LOINC, "8867-4", "2020-01-15T10:00:00Z"),
    observation("o2", "mueller", LOINC, "2339-0", "2020-02-29"),
    observation("o3", "mueller", SCT, "271649006", "2021-12-31T23:59:59+01:00"),
    observation("o4", "smith", LOINC, "8867-4", "2019-12-31"),
    observation("o5", "smith", SCT, "8867-4", "2020-06-01"),
]
SYNTH = generate_patient(16, seed=3, resources_per_patient=40)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node_root = tmp_path_factory.mktemp("search") / "node"
    init_node(node_root, name="Search Test", passphrase=PW, kdf=KdfParams(n=2**12))

    async def fill(node: Node) -> None:
        for r in [*PATIENTS, *OBSERVATIONS]:
            await node.records.update(r["resourceType"], r["id"], r)
        # o6 is written with one code, then updated: only its latest version is findable.
        await node.records.update(
            "Observation", "o6", observation("o6", "garcia", LOINC, "1-8", "2000-01-01")
        )
        await node.records.update(
            "Observation", "o6", observation("o6", "garcia", LOINC, "2-6", "2001-01-01")
        )
        for r in SYNTH.all_resources():
            await node.records.update(r["resourceType"], r["id"], r)

    run(node_root, fill)
    return node_root


def search_ids(root: Path, rtype: str, params: Mapping[str, Sequence[str]]) -> set[str]:
    async def go(node: Node) -> set[str]:
        found = await node.records.search(rtype, params)
        for s in found:
            assert s.resource_type == rtype
            assert s.resource()["id"] == s.id
        ids = [s.id for s in found]
        assert len(ids) == len(set(ids)), "duplicates in search results"
        # The index-only form (nothing decrypted) finds exactly the same, in order.
        assert await node.records.search_ids(rtype, params) == ids
        return set(ids)

    return run(root, go)


def ours(ids: set[str]) -> set[str]:
    """Results restricted to the hand-made records (the synthetic patient is also stored)."""
    return ids - {r["id"] for r in SYNTH.all_resources()}


# -- Patient ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"identifier": ["MRN-1"]}, {"mueller", "smith"}),
        ({"identifier": ["urn:mrn|MRN-1"]}, {"mueller"}),
        ({"identifier": ["urn:other|MRN-1"]}, {"smith"}),
        ({"identifier": ["urn:none|MRN-1"]}, set()),
        ({"identifier": ["MRN-"]}, set()),  # tokens match exactly, not by prefix
        ({"identifier": ["X9,G7"]}, {"mulligan", "garcia"}),
        ({"name": ["mull"]}, {"mueller", "mulligan"}),
        ({"name": ["MÜLL"]}, {"mueller", "mulligan"}),
        ({"name": ["Müller"]}, {"mueller"}),
        ({"name": ["muller"]}, {"mueller"}),
        ({"name": ["ller"]}, set()),  # "starts with", not "contains"
        ({"name": ["m"]}, {"mueller", "mulligan"}),  # Maria, Müller, Mulligan
        ({"name": ["anna"]}, {"mueller"}),
        ({"name": ["mar"]}, {"mueller"}),
        ({"name": ["jose"]}, {"garcia"}),
        ({"name": ["GARC"]}, {"garcia"}),
        ({"family": ["mull"]}, {"mueller", "mulligan"}),
        ({"family": ["anna"]}, set()),
        ({"given": ["mull"]}, set()),
        ({"given": ["pete"]}, {"mulligan"}),
        ({"given": ["JOSÉ"]}, {"garcia"}),
        ({"name": ["  Mull  "]}, {"mueller", "mulligan"}),
        ({"birthdate": ["1980-02-29"]}, {"mueller"}),
        ({"birthdate": ["eq1980-02-29"]}, {"mueller"}),
        ({"birthdate": ["1980-02"]}, {"mueller"}),
        ({"birthdate": ["1980"]}, {"mueller", "smith"}),
        ({"birthdate": ["1980-03-02"]}, set()),
        ({"birthdate": ["ge1980-03-01"]}, {"smith", "garcia"}),
        ({"birthdate": ["gt1980-02-29"]}, {"smith", "garcia"}),
        ({"birthdate": ["gt1980-02"]}, {"smith", "garcia"}),
        ({"birthdate": ["gt1980"]}, {"garcia"}),
        ({"birthdate": ["le1980-02-29"]}, {"mueller", "mulligan"}),
        ({"birthdate": ["lt1980-02-29"]}, {"mulligan"}),
        ({"birthdate": ["lt1980"]}, {"mulligan"}),
        ({"birthdate": ["le1975-12-31"]}, {"mulligan"}),
        ({"birthdate": ["ge1976", "le1980-02-29"]}, {"mueller"}),
        ({"birthdate": ["1975,1999"]}, {"mulligan", "garcia"}),
        ({"gender": ["male"]}, {"smith", "mulligan"}),
        ({"gender": ["female"]}, {"mueller"}),
        ({"gender": ["male,other"]}, {"smith", "mulligan", "garcia"}),
        ({"name": ["mull"], "gender": ["male"]}, {"mulligan"}),
        ({"identifier": ["MRN-1"], "birthdate": ["1980-03"]}, {"smith"}),
        ({"name": ["mull"], "gender": ["other"]}, set()),
    ],
)
def test_patient_search(root: Path, params: dict[str, list[str]], expected: set[str]) -> None:
    assert ours(search_ids(root, "Patient", params)) == expected


def test_synthetic_patient_is_findable(root: Path) -> None:
    p = SYNTH.patient
    ident = p["identifier"][0]
    family = p["name"][0]["family"]
    for params in (
        {"identifier": [ident["value"]]},
        {"identifier": [f"{ident['system']}|{ident['value']}"]},
        {"family": [family[:3].lower()], "birthdate": [p["birthDate"]]},
        {"given": [p["name"][0]["given"][0].upper()], "gender": [p["gender"]]},
    ):
        assert SYNTH.patient_id in search_ids(root, "Patient", params), params


def test_search_without_params_lists_the_type(root: Path) -> None:
    assert ours(search_ids(root, "Patient", {})) == {p["id"] for p in PATIENTS}


# -- clinical types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"patient": ["mueller"]}, {"o1", "o2", "o3"}),
        ({"patient": ["Patient/mueller"]}, {"o1", "o2", "o3"}),
        ({"patient": ["smith,garcia"]}, {"o4", "o5", "o6"}),
        ({"patient": ["nobody"]}, set()),
        ({"code": ["8867-4"]}, {"o1", "o4", "o5"}),
        ({"code": [f"{LOINC}|8867-4"]}, {"o1", "o4"}),
        ({"code": [f"{SCT}|8867-4"]}, {"o5"}),
        ({"code": [f"{SCT}|2339-0"]}, set()),
        ({"code": ["2339-0,271649006"]}, {"o2", "o3"}),
        ({"code": ["1-8"]}, set()),  # o6's old code: only the latest version is indexed
        ({"code": ["2-6"]}, {"o6"}),
        ({"date": ["2020-01-15"]}, {"o1"}),
        ({"date": ["eq2020-01-15"]}, {"o1"}),
        ({"date": ["2020-01"]}, {"o1"}),
        ({"date": ["2020-02"]}, {"o2"}),
        ({"date": ["2020"]}, {"o1", "o2", "o5"}),
        ({"date": ["2021-12-31"]}, {"o3"}),
        ({"date": ["ge2020-02-29"]}, {"o2", "o3", "o5"}),
        ({"date": ["gt2020-02-29"]}, {"o3", "o5"}),
        ({"date": ["le2020-01-15"]}, {"o1", "o4", "o6"}),
        ({"date": ["lt2020-01-15"]}, {"o4", "o6"}),
        ({"date": ["lt2020"]}, {"o4", "o6"}),
        ({"date": ["gt2019-12"]}, {"o1", "o2", "o3", "o5"}),
        ({"date": ["ge2020-01-16", "le2020-06-01"]}, {"o2", "o5"}),
        ({"date": ["2019,2021"]}, {"o3", "o4"}),
        ({"date": ["2000"]}, set()),  # o6's old date
        ({"date": ["2001-01-01"]}, {"o6"}),
        ({"patient": ["mueller"], "code": ["8867-4"]}, {"o1"}),
        ({"patient": ["smith"], "code": ["8867-4"], "date": ["2020"]}, {"o5"}),
        ({"patient": ["mueller"], "date": ["2019"]}, set()),
    ],
)
def test_observation_search(root: Path, params: dict[str, list[str]], expected: set[str]) -> None:
    assert ours(search_ids(root, "Observation", params)) == expected


#: For each clinical type: the R4 search parameters of its code and its clinical date.
CLINICAL = {
    "Observation": ("code", "date"),
    "Condition": ("code", "onset-date"),
    "MedicationRequest": ("code", "authoredon"),
    "Encounter": ("type", "date"),
    "DiagnosticReport": ("code", "date"),
    "AllergyIntolerance": ("code", "date"),
    "Immunization": ("vaccine-code", "date"),
    "Procedure": ("code", "date"),
}


def _clinical_cases() -> list[tuple[str, str, dict[str, list[str]]]]:
    """For one synthetic resource of each clinical type: (type, id, params it must match)."""
    cases = []
    seen: set[str] = set()
    for r in SYNTH.resources:
        rtype = r["resourceType"]
        if rtype in seen:
            continue
        seen.add(rtype)
        code_param, date_param = CLINICAL[rtype]
        terms = resource_terms(r)
        codes = sorted(t for p, t in terms if p == code_param and "|" in t[1:-1])
        days = [(t[:1], t[4:]) for p, t in terms if p == date_param and t[1:4] == ":d:"]
        starts = sorted(d for kind, d in days if kind in "sp")
        ends = sorted(d for kind, d in days if kind in "ep")
        assert codes and starts and ends, rtype
        # The first date value's range lies in [ge its start month, le its end year].
        dates = [f"ge{starts[0][:7]}", f"le{max(ends)[:4]}"]
        if len(starts) == 1 and starts == ends:  # one day: eq that day finds it too
            dates.append(starts[0])
        params = {"patient": [SYNTH.patient_id], code_param: [codes[0]], date_param: dates}
        cases.append((rtype, r["id"], params))
    return cases


@pytest.mark.parametrize(("rtype", "rid", "params"), _clinical_cases(), ids=lambda v: str(v)[:20])
def test_every_clinical_type_is_searchable(
    root: Path, rtype: str, rid: str, params: dict[str, list[str]]
) -> None:
    assert rid in search_ids(root, rtype, params)
    assert rid in search_ids(root, rtype, {"patient": [f"Patient/{SYNTH.patient_id}"]})
    assert rid not in search_ids(root, rtype, {"patient": ["mueller"]})


def test_clinical_cases_cover_all_types() -> None:
    types = {c[0] for c in _clinical_cases()}
    assert types == set(CLINICAL)


@pytest.mark.parametrize(
    ("rtype", "params"),
    [
        ("Patient", {"foo": ["x"]}),
        ("Patient", {"code": ["x"]}),
        ("Patient", {"gender:contains": ["x"]}),
        ("Patient", {"gender:below": ["x"]}),
        ("Patient", {"name:missing": ["maybe"]}),
        ("Observation", {"value-quantity": ["gt5|mg"]}),
        ("Observation", {"value-quantity": ["five"]}),
        ("Observation", {"code:of-type": ["a|b"]}),
        ("Patient", {"name": [""]}),
        ("Patient", {"gender": [","]}),
        ("Patient", {"birthdate": ["1980-02-30"]}),
        ("Patient", {"birthdate": ["yesterday"]}),
        ("Patient", {"birthdate": ["xx1980"]}),
        ("Patient", {"birthdate": ["1980-1-1"]}),
        ("Observation", {"name": ["x"]}),
        ("Observation", {"date": ["2020-13"]}),
        ("Binary", {}),
        ("Binary", {"patient": ["x"]}),
        ("Bundle", {"code": ["x"]}),
    ],
)
def test_unsupported_search_is_invalid_input(
    root: Path, rtype: str, params: dict[str, list[str]]
) -> None:
    async def go(node: Node) -> None:
        with pytest.raises(InvalidInput):
            await node.records.search(rtype, params)

    run(root, go)


@pytest.mark.parametrize(
    ("rtype", "param", "value"),
    [
        ("Observation", "date", "gt9999-12-31"),
        ("Observation", "date", "lt0001-01-01"),
        ("Patient", "birthdate", "9999-12-31"),
        ("Patient", "birthdate", "ge9999"),
        ("Observation", "date", "1799-12-31"),
        ("Observation", "date", "lt2201"),
    ],
)
def test_date_values_beyond_the_supported_years_are_invalid_input(
    rtype: str, param: str, value: str
) -> None:
    """Issue #14 item 9: these were OverflowErrors (HTTP 500) at the calendar's ends."""
    with pytest.raises(InvalidInput, match="years from 1800 to 2200"):
        query_tokens(KEY_A, rtype, {param: [value]})


def test_range_terms_end_at_the_last_day_of_the_calendar() -> None:
    assert cover(date(9999, 12, 1), date.max) == ["m:9999-12"]
    assert cover(date(9999, 1, 1), date.max) == ["y:9999"]
    assert cover(date(9990, 1, 1), date.max) == ["x:999"]
    assert cover(date.max, date.max) == ["d:9999-12-31"]


def test_a_parameter_takes_at_most_max_alternatives() -> None:
    codes = [f"c{i}" for i in range(MAX_ALTERNATIVES + 1)]
    (group,) = groups_of(query_tokens(KEY_A, "Observation", {"code": [",".join(codes[:-1])]}))
    assert len(group) == MAX_ALTERNATIVES
    for split in ([",".join(codes)], [",".join(codes[:40]), ",".join(codes[40:])]):
        with pytest.raises(InvalidInput, match=f"more than {MAX_ALTERNATIVES} alternatives"):
            query_tokens(KEY_A, "Observation", {"code": split})


def test_a_query_takes_at_most_max_query_tokens() -> None:
    # Issue #14 item 6: 600 date alternatives kept the event loop busy for 9.4 s.
    many = ",".join(f"ge1800-01-{d:02}" for d in range(2, 29))
    with pytest.raises(InvalidInput, match="too broad"):
        query_tokens(KEY_A, "Observation", {"date": [many]})
    # Open-ended ranges (the widest ordinary query) fit, several of them.
    both = {"date": ["ge1800-01-02", "le2200-12-30", "ap1801-02-03", "ne1802"]}
    assert size_of(query_tokens(KEY_A, "Observation", both)) <= MAX_QUERY_TOKENS


# -- pure: terms, tokens, ranges ----------------------------------------------------------------


def test_normalize() -> None:
    assert normalize("  MÜLLER\tvon  Ölberg ") == "muller von olberg"
    assert normalize("José") == normalize("JOSE") == "jose"
    assert normalize("Straße") == "strasse"


def test_patient_reference() -> None:
    assert patient_reference({"resourceType": "Patient", "id": "p"}) == "Patient/p"
    assert (
        patient_reference({"resourceType": "Observation", "subject": {"reference": "Patient/x"}})
        == "Patient/x"
    )
    assert (
        patient_reference({"resourceType": "Immunization", "patient": {"reference": "Patient/y"}})
        == "Patient/y"
    )
    assert (
        patient_reference({"resourceType": "Observation", "subject": {"reference": "Group/g"}})
        is None
    )
    assert patient_reference({"resourceType": "Observation"}) is None


KEY_A = b"A" * 32
KEY_B = b"B" * 32
TODAY = date(2026, 12, 5)


def query_tokens(key: bytes, rtype: str, params: Mapping[str, Sequence[str]]) -> Query:
    return plan_tokens(key, rtype, params, today=TODAY)


def groups_of(query: Query) -> list[frozenset[bytes]]:
    """The token sets of a plain conjunction (one per parameter value)."""
    assert isinstance(query, AllOf)
    assert all(isinstance(p, Match) for p in query.parts), query
    return [p.tokens for p in query.parts if isinstance(p, Match)]


def size_of(query: Query) -> int:
    if isinstance(query, Match):
        return len(query.tokens)
    if isinstance(query, AllOf | AnyOf):
        return sum(size_of(p) for p in query.parts)
    return size_of(query.part)


def matches(query: Query, tokens: set[bytes]) -> bool:
    """Whether a resource of these index tokens matches ``query``."""
    found = evaluate(
        query,
        find=lambda groups: {"r"} if all(g & tokens for g in groups) else set(),
        every=lambda: {"r"},
    )
    return found == {"r"}


def test_tokens_are_16_bytes_and_keyed() -> None:
    assert TOKEN_SIZE == 16
    tokens_a = resource_tokens(KEY_A, PATIENTS[0])
    tokens_b = resource_tokens(KEY_B, PATIENTS[0])
    assert tokens_a and all(len(t) == 16 for t in tokens_a)
    assert len(tokens_a) == len(resource_terms(PATIENTS[0]))
    assert tokens_a.isdisjoint(tokens_b)
    assert _token(KEY_A, "Patient", "name", "mull") != _token(KEY_B, "Patient", "name", "mull")
    assert _token(KEY_A, "Patient", "name", "mull") != _token(KEY_A, "Patient", "family", "mull")
    assert _token(KEY_A, "Patient", "code", "x") != _token(KEY_A, "Observation", "code", "x")
    # No plaintext term appears in any token.
    for t in tokens_a:
        assert b"mull" not in t.lower()


def test_query_tokens_match_resource_tokens() -> None:
    tokens = resource_tokens(KEY_A, PATIENTS[0])
    for params in (
        {"name": ["MÜLL"]},
        {"identifier": ["urn:mrn|MRN-1"]},
        {"birthdate": ["1980-02-29"]},
        {"birthdate": ["1980"]},
        {"gender": ["female"]},
    ):
        query = query_tokens(KEY_A, "Patient", params)
        assert size_of(query) and matches(query, tokens), params
        assert not matches(query_tokens(KEY_B, "Patient", params), tokens), params
    groups = groups_of(query_tokens(KEY_A, "Patient", {"name": ["a", "b,c"], "gender": ["male"]}))
    assert [len(g) for g in groups] == [1, 2, 1]


def test_observation_terms() -> None:
    terms = resource_terms(OBSERVATIONS[0])
    plain = {(p, t) for p, t in terms if not t.startswith(MARK)}
    assert plain == {
        ("_id", "o1"),
        ("_id", "|o1"),
        ("status", "final"),
        ("status", "|final"),
        ("patient", "Patient/mueller"),
        ("subject", "Patient/mueller"),
        *(
            (param, t)
            for param in ("code", "combo-code")
            for t in ("8867-4", f"{LOINC}|8867-4", f"{LOINC}|")
        ),
        # A single day is indexed once, as a point (p:), by its decade, year, month, day.
        *(("date", f"p:{b}") for b in ("x:202", "y:2020", "m:2020-01", "d:2020-01-15")),
    }
    # Each parameter with a value is also marked present (for :missing), and nothing else.
    marked = {(p, t) for p, t in terms if t.startswith(MARK)}
    assert marked == {(p, f"{MARK}?") for p, _ in plain}


@pytest.mark.parametrize(
    ("value", "prefix", "lo", "hi"),
    [
        ("2020-02-29", "eq", date(2020, 2, 29), date(2020, 2, 29)),
        ("2020-02", "eq", date(2020, 2, 1), date(2020, 2, 29)),
        ("2019-02", "eq", date(2019, 2, 1), date(2019, 2, 28)),
        ("2020", "eq", date(2020, 1, 1), date(2020, 12, 31)),
        ("ge2020-02", "ge", date(2020, 2, 1), date(2020, 2, 29)),
        ("sa2020", "sa", date(2020, 1, 1), date(2020, 12, 31)),
    ],
)
def test_search_days(value: str, prefix: str, lo: date, hi: date) -> None:
    assert search_days(value) == (prefix, lo, hi)


def test_cover_examples() -> None:
    assert cover(date(2020, 1, 1), date(2020, 12, 31)) == ["y:2020"]
    assert cover(date(2020, 2, 1), date(2020, 2, 29)) == ["m:2020-02"]
    assert cover(date(2020, 2, 29), date(2020, 2, 29)) == ["d:2020-02-29"]
    assert cover(date(2020, 1, 30), date(2020, 3, 2)) == [
        "d:2020-01-30",
        "d:2020-01-31",
        "m:2020-02",
        "d:2020-03-01",
        "d:2020-03-02",
    ]
    assert cover(date(2019, 12, 1), date(2021, 1, 31)) == ["m:2019-12", "y:2020", "m:2021-01"]
    assert cover(date(2019, 1, 1), date(2031, 12, 31)) == ["y:2019", "x:202", "y:2030", "y:2031"]
    assert cover(date(2020, 3, 1), date(2020, 2, 1)) == []
    whole = cover(date(1800, 1, 1), date(2200, 12, 31))
    assert whole == [f"x:{d}" for d in range(180, 220)] + ["y:2200"]


def _term_days(term: str) -> tuple[date, date]:
    kind, text = term.split(":", 1)
    if kind == "x":
        return date(int(text) * 10, 1, 1), date(int(text) * 10 + 9, 12, 31)
    if kind == "y":
        y = int(text)
        return date(y, 1, 1), date(y, 12, 31)
    if kind == "m":
        y, m = map(int, text.split("-"))
        return date(y, m, 1), date(y, m, calendar.monthrange(y, m)[1])
    assert kind == "d", term
    d = date.fromisoformat(text)
    return d, d


def _days(lo: date, hi: date) -> list[date]:
    return [lo + timedelta(days=i) for i in range((hi - lo).days + 1)]


DAYS = st.dates(min_value=date(1990, 1, 1), max_value=date(2030, 12, 31))
ANY_DAYS = st.dates(min_value=date(1800, 1, 1), max_value=date(2200, 12, 31))


@settings(max_examples=150, deadline=None)
@given(a=DAYS, b=DAYS)
def test_range_terms_cover_exactly_the_days(a: date, b: date) -> None:
    lo, hi = min(a, b), max(a, b)
    expanded: list[date] = []
    for term in cover(lo, hi):
        start, end = _term_days(term)
        expanded.extend(_days(start, end))
    # Exactly [lo, hi]: nothing missing, nothing outside, nothing twice.
    assert sorted(expanded) == _days(lo, hi)


@settings(max_examples=200, deadline=None)
@given(a=ANY_DAYS, b=ANY_DAYS)
def test_range_terms_are_contiguous_and_few(a: date, b: date) -> None:
    lo, hi = min(a, b), max(a, b)
    terms = cover(lo, hi)
    intervals = [_term_days(t) for t in terms]
    assert intervals[0][0] == lo
    assert intervals[-1][1] == hi
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start == end + timedelta(days=1)
    # Whole decades, then at most 9 years, 11 months and 30 days on each side.
    decades = sum(t.startswith("x:") for t in terms)
    assert len(terms) - decades <= 2 * (9 + 11 + 30)
    assert len(set(terms)) == len(terms)


@settings(max_examples=40, deadline=None)
@given(day=DAYS, other=DAYS)
def test_date_query_matches_iff_in_range(day: date, other: date) -> None:
    """A resource dated ``day`` matches a date query iff ``day`` lies in the query's range."""
    obs = observation("x", "p", LOINC, "1", day.isoformat())
    tokens = resource_tokens(KEY_A, obs)
    for prefix in ("", "ge", "gt", "le", "lt"):
        for text in (other.isoformat(), f"{other:%Y-%m}", f"{other:%Y}"):
            value = prefix + text
            _, ps, pe = search_days(text)
            lo, hi = {
                "": (ps, pe),
                "ge": (ps, date.max),
                "gt": (pe + timedelta(days=1), date.max),
                "le": (date.min, pe),
                "lt": (date.min, ps - timedelta(days=1)),
            }[prefix]
            query = query_tokens(KEY_A, "Observation", {"date": [value]})
            assert matches(query, tokens) == (lo <= day <= hi), value


@pytest.mark.parametrize("rtype", ["Observation", "DiagnosticReport"])
def test_date_is_the_effective_time_not_when_the_result_was_issued(rtype: str) -> None:
    resource = {
        "resourceType": rtype,
        "id": "x",
        "effectiveDateTime": "2020-01-01",
        "issued": "2021-05-05T10:00:00Z",
    }
    tokens = resource_tokens(KEY_A, resource)
    assert matches(query_tokens(KEY_A, rtype, {"date": ["2020-01-01"]}), tokens)
    assert not matches(query_tokens(KEY_A, rtype, {"date": ["2021-05-05"]}), tokens)


# -- write-side bounds (issue #15, item 8) ---------------------------------------------

LONG_WORD = "".join(chr(ord("a") + (i * 7) % 26) for i in range(30_000))


def test_a_long_name_word_is_indexed_by_a_bounded_number_of_prefixes() -> None:
    """A 30,000-character name once made 60,001 index entries; now a handful."""
    long_patient = patient("long", LONG_WORD, ["Ann"], "1990-01-01", "female", ("urn:mrn", "L1"))
    terms = resource_terms(long_patient)
    family = {t for p, t in terms if p == "family" and not t.startswith(MARK)}
    assert len(family) == MAX_PREFIX_CHARS
    assert max(map(len, family)) == MAX_PREFIX_CHARS
    # ... and the 3-character pieces of its first CONTAINS_CHARS characters (:contains).
    assert len(terms) < 6 * MAX_PREFIX_CHARS + 3 * CONTAINS_CHARS
    tokens = resource_tokens(KEY_A, long_patient)
    # Any prefix finds it, up to and beyond the indexed length, and so does the whole word.
    for query in (LONG_WORD[:3], LONG_WORD[:MAX_PREFIX_CHARS], LONG_WORD[:100], LONG_WORD):
        for param in ("family", "name"):
            assert matches(query_tokens(KEY_A, "Patient", {param: [query.upper()]}), tokens)
    assert not matches(query_tokens(KEY_A, "Patient", {"family": ["b" + LONG_WORD[:50]]}), tokens)


def many_words_patient(pid: str, words: int) -> dict[str, Any]:
    text = " ".join(f"w{i:05d}" for i in range(words))
    return patient(pid, "Doe", ["Jo"], "1990-01-01", "male", ("urn:mrn", pid), text=text)


def test_a_resource_of_too_many_terms_is_refused_early() -> None:
    # Six-letter distinct words: 6 prefixes each (some shared); far beyond the bound.
    with pytest.raises(InvalidInput, match="too many searchable terms"):
        resource_terms(many_words_patient("wordy", 5_000))
    with pytest.raises(InvalidInput, match=f"more than {MAX_RESOURCE_TERMS}"):
        resource_tokens(KEY_A, many_words_patient("wordy", 5_000))
    # Under the bound it is indexed; an already stored version is indexed whatever its size.
    assert len(resource_terms(many_words_patient("ok", 100))) <= MAX_RESOURCE_TERMS
    assert len(resource_terms(many_words_patient("old", 5_000), limit=None)) > MAX_RESOURCE_TERMS


def _token_rows(node_root: Path) -> int:
    conn = sqlite3.connect(node_root / "records.db")
    try:
        return int(conn.execute("SELECT count(*) FROM tokens").fetchone()[0])
    finally:
        conn.close()


def test_long_and_wordy_names_through_a_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the records service: a 30,000-character name is stored with a bounded
    number of token rows, off the event loop's thread, and found by its prefix; a
    resource of too many terms is refused and writes nothing (no version, no token,
    no blob)."""
    node_root = tmp_path / "node"
    init_node(node_root, name="Long Names", passphrase=PW, kdf=KdfParams(n=2**12))
    long_patient = patient("long", LONG_WORD, ["Ann"], "1990-01-01", "female", ("urn:mrn", "L1"))
    # Which thread tokenizes and seals each resource (the real work still runs).
    sealing_threads: dict[str, int] = {}
    real = Sealer._tokens_and_blob

    def recording(self: Sealer, resource: dict[str, Any], *args: Any) -> Any:
        sealing_threads[str(resource["id"])] = threading.get_ident()
        return real(self, resource, *args)

    monkeypatch.setattr(Sealer, "_tokens_and_blob", recording)

    stored: list[dict[str, Any]] = []

    async def go(node: Node) -> tuple[set[str], set[str]]:
        for r in ({**PATIENTS[1], "id": "short"}, long_patient):
            written, _ = await node.records.update("Patient", r["id"], r)
            stored.append(written.resource())  # as indexed: with meta.lastUpdated
        found = {s.id for s in await node.records.search("Patient", {"name": [LONG_WORD[:5]]})}
        exact = {s.id for s in await node.records.search("Patient", {"family": [LONG_WORD]})}
        return found, exact

    assert run(node_root, go) == ({"long"}, {"long"})
    # asyncio.run runs the loop on this thread: small resources stay on it, large ones not.
    assert sealing_threads["short"] == threading.get_ident()
    assert sealing_threads["long"] != threading.get_ident()
    rows = _token_rows(node_root)
    long_terms = len(resource_terms(long_patient))
    assert long_terms < 6 * MAX_PREFIX_CHARS + 3 * CONTAINS_CHARS
    assert rows == sum(len(resource_terms(r)) for r in stored)
    blobs = sorted(p.name for p in (node_root / "blobs").rglob("*") if p.is_file())

    async def refused(node: Node) -> set[str]:
        with pytest.raises(InvalidInput, match="too many searchable terms"):
            await node.records.update("Patient", "wordy", many_words_patient("wordy", 5_000))
        return {s.id for s in await node.records.search("Patient", {"name": ["w00001"]})}

    assert run(node_root, refused) == set()
    assert _token_rows(node_root) == rows
    assert sorted(p.name for p in (node_root / "blobs").rglob("*") if p.is_file()) == blobs


# -- dates and Periods as ranges (issue #18: Periods were indexed by their start only) --------


def _spec_relation(prefix: str, r: tuple[date, date], p: tuple[date, date], today: date) -> bool:
    """FHIR R4 search.html#prefix, read literally over day sets (a slow reference)."""
    r_days, p_days = set(_days(*r)), set(_days(*p))
    contains = r_days <= p_days
    if prefix == "eq":
        return contains
    if prefix == "ne":
        return not contains
    if prefix in ("gt", "ge"):
        above = any(d > p[1] for d in r_days)
        return above or (prefix == "ge" and contains)
    if prefix in ("lt", "le"):
        below = any(d < p[0] for d in r_days)
        return below or (prefix == "le" and contains)
    if prefix == "sa":
        return all(d > p[1] for d in r_days)
    if prefix == "eb":
        return all(d < p[0] for d in r_days)
    assert prefix == "ap"
    slack = timedelta(days=abs((today - p[0]).days) // 10)
    return bool(r_days & set(_days(p[0] - slack, p[1] + slack)))


def encounter(eid: str, start: str | None, end: str | None) -> dict[str, Any]:
    period = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": "IMP"},
        "subject": {"reference": "Patient/p"},
        "period": period,
    }


NEAR = st.dates(min_value=date(2019, 11, 1), max_value=date(2021, 2, 28))


@settings(max_examples=150, deadline=None)
@given(a=NEAR, b=NEAR, other=NEAR, precision=st.sampled_from([10, 7, 4]))
def test_period_search_follows_the_specification_for_every_prefix(
    a: date, b: date, other: date, precision: int
) -> None:
    """Every prefix over a Period's whole range matches as the specification's text says."""
    lo, hi = min(a, b), max(a, b)
    tokens = resource_tokens(KEY_A, encounter("e", lo.isoformat(), hi.isoformat()))
    text = other.isoformat()[:precision]
    _, ps, pe = search_days(text)
    for prefix in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"):
        query = query_tokens(KEY_A, "Encounter", {"date": [prefix + text]})
        expected = _spec_relation(prefix, (lo, hi), (ps, pe), TODAY)
        assert matches(query, tokens) == expected, (prefix + text, lo, hi)


@pytest.mark.parametrize(
    ("start", "end", "value", "expected"),
    [
        # In progress on the searched day: found by the day's bounds.
        ("2020-03-01", "2020-03-10", "ge2020-03-05", True),
        ("2020-03-01", "2020-03-10", "le2020-03-05", True),
        # eq on the start day does not match a longer stay; eq on its month does.
        ("2020-03-01", "2020-03-10", "2020-03-01", False),
        ("2020-03-01", "2020-03-10", "2020-03", True),
        ("2020-03-01", "2020-03-10", "ne2020-03-01", True),
        # An open end is ongoing: after any later day, and never within a year.
        ("2020-03-01", None, "gt2150-01-01", True),
        ("2020-03-01", None, "2020", False),
        ("2020-03-01", None, "sa2020-02-29", True),
        ("2020-03-01", None, "eb2199-01-01", False),
        # A missing start reaches back: before any earlier day.
        (None, "2020-03-10", "lt1900", True),
        (None, "2020-03-10", "eb2020-03-11", True),
        ("2020-03-01", "2020-03-10", "eb2020-03-10", False),
        ("2020-03-01", "2020-03-10", "sa2020-02-29", True),
        ("2020-03-01", "2020-03-10", "sa2020-03-01", False),
        ("2020-03-01T22:00:00+02:00", "2020-03-01T23:00:00+02:00", "2020-03-01", True),
    ],
)
def test_period_examples(start: str | None, end: str | None, value: str, expected: bool) -> None:
    tokens = resource_tokens(KEY_A, encounter("e", start, end))
    assert matches(query_tokens(KEY_A, "Encounter", {"date": [value]}), tokens) == expected


def test_a_year_only_birth_date_is_a_range() -> None:
    """A birthDate of "1980" was not indexed at all (only full days were)."""
    born = patient("y", "Year", ["Only"], "1980", "female", ("urn:mrn", "Y1"))
    tokens = resource_tokens(KEY_A, born)
    for value, expected in (("1980", True), ("1980-05", False), ("ge1980-05", True)):
        assert matches(query_tokens(KEY_A, "Patient", {"birthdate": [value]}), tokens) == expected
    assert not matches(query_tokens(KEY_A, "Patient", {"birthdate": ["lt1980"]}), tokens)


def test_periods_and_absolute_references_through_a_node(tmp_path: Path) -> None:
    """Through the records service and the index: ranges, complements and URL references."""
    node_root = tmp_path / "node"
    init_node(node_root, name="Periods", passphrase=PW, kdf=KdfParams(n=2**12))
    stays = {
        "long": encounter("long", "2020-03-01", "2020-03-10"),
        "day": encounter("day", "2020-03-01", "2020-03-01"),
        "open": encounter("open", "2020-03-08", None),
        "before": encounter("before", "2020-01-01", "2020-01-05"),
    }
    elsewhere = {
        **encounter("far", "2020-03-05", "2020-03-05"),
        "subject": {"reference": "https://other.example/fhir/Patient/q"},
    }

    async def go(node: Node) -> dict[str, set[str]]:
        for r in [*stays.values(), elsewhere]:
            await node.records.update("Encounter", r["id"], r)
        queries = {
            "in progress on 03-05": {"date": ["ge2020-03-05", "le2020-03-05"]},
            "eq start day": {"date": ["2020-03-01"]},
            "ne start day": {"date": ["ne2020-03-01"], "patient": ["p"]},
            "url": {"patient": ["http://host:8080/fhir/Patient/p"]},
            "url with version": {
                "patient": ["https://h/fhir/Patient/p/_history/2"],
                "date": ["eb2020-02"],
            },
            "their url": {"patient": ["https://other.example/fhir/Patient/q"]},
        }
        return {
            name: {s.id for s in await node.records.search("Encounter", q)}
            for name, q in queries.items()
        }

    assert run(node_root, go) == {
        "in progress on 03-05": {"long", "far"},  # "open" begins on 03-08
        "eq start day": {"day"},
        "ne start day": {"long", "open", "before"},
        "url": set(stays),
        "url with version": {"before"},
        "their url": {"far"},
    }
