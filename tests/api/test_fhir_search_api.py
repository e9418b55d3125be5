"""FHIR search over HTTP: strict and lenient handling, result parameters, POST _search."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from api_helpers import FHIR_JSON, LiveServer, assert_outcome, put_json

Resource = dict[str, Any]


def _patient(pid: str, family: str, city: str) -> Resource:
    return {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": family, "given": ["Ann"]}],
        "address": [{"city": city}],
        "gender": "female",
        "birthDate": "1970-01-01",
    }


@pytest.fixture(scope="module")
def stored(live: LiveServer) -> list[Resource]:
    people = [
        _patient("sa-1", "Searchapi", "Lund"),
        _patient("sa-2", "Searchapi", "Malmo"),
        _patient("sa-3", "Searchapi", "Lund"),
    ]
    with live.client(live.clinician) as client:
        for p in people:
            assert put_json(client, f"/fhir/Patient/{p['id']}", p).status_code in (200, 201)
    return people


def _bundle(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return body


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def test_unknown_parameters_are_400_unless_lenient(
    clinician: httpx.Client, stored: list[Resource]
) -> None:
    strict = clinician.get("/fhir/Patient", params={"family": "searchapi", "shoesize": "9"})
    assert "shoesize" in assert_outcome(strict, 400)["issue"][0]["diagnostics"]
    lenient = _bundle(
        clinician.get(
            "/fhir/Patient",
            params={"family": "searchapi", "shoesize": "9"},
            headers={"Prefer": "handling=lenient"},
        )
    )
    assert _ids(lenient) == {"sa-1", "sa-2", "sa-3"}
    # The self link shows what was used: not the ignored parameter.
    (self_link,) = [x["url"] for x in lenient["link"] if x["relation"] == "self"]
    assert "shoesize" not in self_link and "family=searchapi" in self_link
    # Unsupported modifiers are unknown too.
    assert_outcome(clinician.get("/fhir/Patient", params={"family:text": "x"}), 400)


def test_count_zero_and_summary_count_give_the_total_only(
    clinician: httpx.Client, stored: list[Resource]
) -> None:
    for params in ({"_count": "0"}, {"_summary": "count"}):
        bundle = _bundle(clinician.get("/fhir/Patient", params={"address-city": "lund", **params}))
        assert bundle["total"] == 2
        assert "entry" not in bundle
        assert all(x["relation"] != "next" for x in bundle["link"])
    assert_outcome(clinician.get("/fhir/Patient", params={"_summary": "everything"}), 400)


def test_elements_keeps_the_named_elements_and_marks_the_subset(
    clinician: httpx.Client, stored: list[Resource]
) -> None:
    bundle = _bundle(
        clinician.get("/fhir/Patient", params={"_id": "sa-1", "_elements": "gender,name"})
    )
    (entry,) = bundle["entry"]
    resource = entry["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "gender", "name"}
    assert any(t["code"] == "SUBSETTED" for t in resource["meta"]["tag"])
    assert_outcome(clinician.get("/fhir/Patient", params={"_elements": "a b"}), 400)


def test_post_search_takes_a_form(clinician: httpx.Client, stored: list[Resource]) -> None:
    form = {"family": "searchapi", "address-city": "malmo"}
    r = clinician.post(
        "/fhir/Patient/_search",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert _ids(_bundle(r)) == {"sa-2"}
    # Parameters in the URL and the form combine.
    r = clinician.post(
        "/fhir/Patient/_search?_id=sa-1,sa-2",
        content=b"family=searchapi",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert _ids(_bundle(r)) == {"sa-1", "sa-2"}
    # A JSON body is not a search form; an unknown parameter in the form is still 400.
    assert_outcome(
        clinician.post("/fhir/Patient/_search", json={"family": "x"}),
        (400, 415),
    )
    assert_outcome(
        clinician.post(
            "/fhir/Patient/_search",
            content=b"shoesize=9",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        400,
    )


def test_patient_tokens_still_see_only_their_own(live: LiveServer, stored: list[Resource]) -> None:
    """A patient token's search is narrowed to its patient, whatever else it asks."""
    with live.client(live.token("patient", patient="sa-1")) as me:
        mine = _bundle(me.get("/fhir/Patient"))
        assert _ids(mine) == {"sa-1"}
        assert_outcome(me.get("/fhir/Patient", params={"family": "searchapi"}), 400)


def test_sort_include_revinclude_and_chains_over_http(
    clinician: httpx.Client, stored: list[Resource]
) -> None:
    for i, p in enumerate(stored):
        enc = {
            "resourceType": "Encounter",
            "id": f"sa-enc-{i}",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{p['id']}"},
            "period": {"start": f"2020-0{i + 1}-01", "end": f"2020-0{i + 1}-02"},
        }
        assert put_json(clinician, f"/fhir/Encounter/{enc['id']}", enc).status_code in (200, 201)
    sorted_desc = _bundle(
        clinician.get("/fhir/Encounter", params={"subject.family": "searchapi", "_sort": "-date"})
    )
    assert [e["resource"]["id"] for e in sorted_desc["entry"]] == [
        "sa-enc-2",
        "sa-enc-1",
        "sa-enc-0",
    ]
    with_patients = _bundle(
        clinician.get(
            "/fhir/Encounter",
            params={"patient": "sa-2", "_include": "Encounter:subject"},
        )
    )
    modes = {(e["resource"]["id"], e["search"]["mode"]) for e in with_patients["entry"]}
    assert modes == {("sa-enc-1", "match"), ("sa-2", "include")}
    assert with_patients["total"] == 1  # included resources are not counted
    with_encounters = _bundle(
        clinician.get(
            "/fhir/Patient",
            params={"address-city": "lund", "_revinclude": "Encounter:subject"},
        )
    )
    modes = {(e["resource"]["id"], e["search"]["mode"]) for e in with_encounters["entry"]}
    assert modes == {
        ("sa-1", "match"),
        ("sa-3", "match"),
        ("sa-enc-0", "include"),
        ("sa-enc-2", "include"),
    }
    has = _bundle(clinician.get("/fhir/Patient", params={"_has:Encounter:subject:date": "2020-02"}))
    assert _ids(has) == {"sa-2"}
    assert_outcome(clinician.get("/fhir/Encounter", params={"_include": "Encounter:status"}), 400)


def test_patient_tokens_may_not_reach_into_other_records(
    live: LiveServer, stored: list[Resource]
) -> None:
    with live.client(live.token("patient", patient="sa-1")) as me:
        for params in (
            {"subject.family": "searchapi"},
            {"_include": "Encounter:subject"},
            {"_revinclude": "Observation:encounter"},
            {"_has:Observation:encounter:code": "x"},
        ):
            assert_outcome(me.get("/fhir/Encounter", params=params), 400)
        own = _bundle(me.get("/fhir/Encounter", params={"_sort": "date"}))
        assert {e["resource"]["subject"]["reference"] for e in own.get("entry", [])} <= {
            "Patient/sa-1"
        }


def test_last_updated_is_answered_from_the_stored_time(
    clinician: httpx.Client, stored: list[Resource]
) -> None:
    """``_lastUpdated`` compares each version's own time (kept by the index row, not tokens)."""
    written = {
        e["resource"]["id"]: e["resource"]["meta"]["lastUpdated"][:10]
        for e in _bundle(clinician.get("/fhir/Patient", params={"family": "searchapi"}))["entry"]
    }
    day = min(written.values())
    for value, expected in (
        (f"ge{day}", set(written)),
        (day, {i for i, d in written.items() if d == day}),
        ("lt2000", set()),
        (f"sa{day[:4]}", set()),
    ):
        bundle = _bundle(
            clinician.get("/fhir/Patient", params={"family": "searchapi", "_lastUpdated": value})
        )
        assert _ids(bundle) == expected, value
    assert_outcome(clinician.get("/fhir/Patient", params={"_lastUpdated": "yesterday"}), 400)


def test_contains_and_number_prefixes_over_http(
    clinician: httpx.Client, stored: list[Resource]
) -> None:
    """``:contains`` and quantity prefixes are served (they were 400 before)."""
    found = _bundle(clinician.get("/fhir/Patient", params={"family:contains": "RCHAP"}))
    assert _ids(found) >= {"sa-1", "sa-2", "sa-3"}
    both = {"family:contains": "archap", "address-city:contains": "alm"}
    assert _ids(_bundle(clinician.get("/fhir/Patient", params=both))) == {"sa-2"}
    assert_outcome(clinician.get("/fhir/Observation", params={"value-quantity": "gtx"}), 400)
