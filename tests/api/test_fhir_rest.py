"""The FHIR R4 REST contract of ``/fhir`` over real HTTP (uvicorn + httpx).

create / read / vread / update (If-Match) / update-as-create / instance and type
history / search with paging / transaction Bundles / delete / metadata, with the
status codes, headers and Bundle shapes the FHIR RESTful API specifies.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import (
    FHIR_JSON,
    UUID_SHAPE,
    LiveServer,
    assert_outcome,
    post_json,
    put_json,
    seed_patients,
)
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

import medledger
from medledger.synthetic import MRN_SYSTEM, PatientBundle, generate_patients

Resource = dict[str, Any]


@pytest.fixture(scope="module")
def patients(live: LiveServer) -> list[PatientBundle]:
    return seed_patients(live, 4, per_patient=30)


def new_patient(index: int = 100) -> Resource:
    """A synthetic Patient without an id (the server assigns one on create)."""
    patient = generate_patients(1, seed=11, start_index=index, resources_per_patient=0)[0].patient
    del patient["id"]
    return patient


def without_server_fields(resource: Resource) -> Resource:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def observations(p: PatientBundle) -> list[Resource]:
    return [r for r in p.resources if r["resourceType"] == "Observation"]


def search_all(client: httpx.Client, url: str) -> tuple[list[Resource], list[dict[str, Any]]]:
    """Follow ``next`` links from ``url``; returns all resources and every page Bundle."""
    resources: list[Resource] = []
    pages: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url is not None:
        r = client.get(next_url)
        assert r.status_code == 200, r.text
        bundle = r.json()
        pages.append(bundle)
        resources.extend(e["resource"] for e in bundle.get("entry", []))
        links = {link["relation"]: link["url"] for link in bundle.get("link", [])}
        next_url = links.get("next")
        assert len(pages) < 200, "paging does not end"
    return resources, pages


def assert_searchset(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    bundle: dict[str, Any] = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    assert isinstance(bundle["total"], int)
    for entry in bundle.get("entry", []):
        assert entry["search"]["mode"] == "match"
        res = entry["resource"]
        assert entry["fullUrl"].endswith(f"{res['resourceType']}/{res['id']}")
    Bundle.model_validate(bundle)
    return bundle


def ids(resources: list[Resource]) -> set[str]:
    return {str(r["id"]) for r in resources}


# -- create / read / vread / update ------------------------------------------------------


def test_create_returns_201_with_location_etag_last_modified(clinician: httpx.Client) -> None:
    sent = new_patient()
    r = post_json(clinician, "/fhir/Patient", sent)
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    body = r.json()
    rid = body["id"]
    assert UUID_SHAPE.match(rid), rid
    assert body["resourceType"] == "Patient"
    assert body["meta"]["versionId"] == "1"
    assert r.headers["location"] == f"/fhir/Patient/{rid}/_history/1"
    assert r.headers["etag"] == 'W/"1"'
    modified = parsedate_to_datetime(r.headers["last-modified"])
    updated = datetime.fromisoformat(body["meta"]["lastUpdated"].replace("Z", "+00:00"))
    assert modified == updated.replace(microsecond=0)
    assert abs((datetime.now(UTC) - updated).total_seconds()) < 60
    assert without_server_fields(body) == sent


def test_read_returns_exactly_the_created_resource(clinician: httpx.Client) -> None:
    created = post_json(clinician, "/fhir/Patient", new_patient(101))
    assert created.status_code == 201
    rid = created.json()["id"]
    r = clinician.get(f"/fhir/Patient/{rid}")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FHIR_JSON)
    assert r.content == created.content
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["last-modified"] == created.headers["last-modified"]


def test_decimals_keep_their_precision(
    clinician: httpx.Client, patients: list[PatientBundle]
) -> None:
    pid = patients[3].patient_id  # patient 3's Observations are not counted elsewhere
    text = (
        '{"resourceType":"Observation","status":"final",'
        '"code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},'
        f'"subject":{{"reference":"Patient/{pid}"}},'
        '"valueQuantity":{"value":6.50,"unit":"%"}}'
    )
    r = clinician.post(
        "/fhir/Observation", content=text.encode(), headers={"Content-Type": FHIR_JSON}
    )
    assert r.status_code == 201, r.text
    assert '"value":6.50' in clinician.get(f"/fhir/Observation/{r.json()['id']}").text


def test_update_with_if_match_and_vread(clinician: httpx.Client) -> None:
    created = post_json(clinician, "/fhir/Patient", new_patient(102)).json()
    rid = created["id"]
    changed = {**created, "gender": "other"}
    r = put_json(clinician, f"/fhir/Patient/{rid}", changed, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    v2 = r.json()
    assert v2["meta"]["versionId"] == "2"
    assert v2["gender"] == "other"
    assert r.headers["etag"] == 'W/"2"'
    assert r.headers["location"] == f"/fhir/Patient/{rid}/_history/2"
    assert "last-modified" in r.headers

    # Stale If-Match: refused, nothing changes.
    stale = put_json(
        clinician,
        f"/fhir/Patient/{rid}",
        {**created, "gender": "male"},
        headers={"If-Match": 'W/"1"'},
    )
    assert_outcome(stale, 412)
    current = clinician.get(f"/fhir/Patient/{rid}")
    assert current.json()["gender"] == "other"
    assert current.headers["etag"] == 'W/"2"'

    # vread: each version as it was.
    r1 = clinician.get(f"/fhir/Patient/{rid}/_history/1")
    assert r1.status_code == 200
    assert r1.json() == created
    assert r1.headers["etag"] == 'W/"1"'
    r2 = clinician.get(f"/fhir/Patient/{rid}/_history/2")
    assert r2.status_code == 200
    assert r2.content == r.content
    assert_outcome(clinician.get(f"/fhir/Patient/{rid}/_history/3"), 404)


def test_update_as_create_on_a_new_id(clinician: httpx.Client) -> None:
    rid = f"client-chosen-{uuid.uuid4().hex[:12]}"
    body = {**new_patient(103), "id": rid}
    r = put_json(clinician, f"/fhir/Patient/{rid}", body)
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"] == f"/fhir/Patient/{rid}/_history/1"
    assert r.json()["id"] == rid
    again = put_json(clinician, f"/fhir/Patient/{rid}", {**body, "active": False})
    assert again.status_code == 200
    assert again.headers["etag"] == 'W/"2"'
    assert clinician.get(f"/fhir/Patient/{rid}").json()["active"] is False


# -- history -----------------------------------------------------------------------------


def test_instance_history_is_newest_first(clinician: httpx.Client) -> None:
    created = post_json(clinician, "/fhir/Patient", new_patient(104)).json()
    rid = created["id"]
    for n, gender in enumerate(("male", "female"), start=1):
        r = put_json(
            clinician,
            f"/fhir/Patient/{rid}",
            {**created, "gender": gender},
            headers={"If-Match": f'W/"{n}"'},
        )
        assert r.status_code == 200, r.text
    r = clinician.get(f"/fhir/Patient/{rid}/_history")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FHIR_JSON)
    bundle = r.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "history"
    assert bundle["total"] == 3
    entries = bundle["entry"]
    assert [e["resource"]["meta"]["versionId"] for e in entries] == ["3", "2", "1"]
    assert [e["response"]["etag"] for e in entries] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert [e["request"]["method"] for e in entries] == ["PUT", "PUT", "POST"]
    assert [e["resource"]["gender"] for e in entries] == ["female", "male", created["gender"]]
    assert all(e["resource"]["id"] == rid for e in entries)


def test_type_history(clinician: httpx.Client) -> None:
    made = [post_json(clinician, "/fhir/Encounter", enc).json() for enc in _encounters(3)]
    r = clinician.get("/fhir/Encounter/_history")
    assert r.status_code == 200, r.text
    bundle = r.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "history"
    entries = bundle["entry"]
    assert all(e["resource"]["resourceType"] == "Encounter" for e in entries)
    assert {m["id"] for m in made} <= {e["resource"]["id"] for e in entries}
    stamps = [e["response"]["lastModified"] for e in entries]
    assert stamps == sorted(stamps, reverse=True), "type history must be newest first"
    assert {e["resource"]["id"] for e in entries[:3]} == {m["id"] for m in made}, "newest first"
    limited = clinician.get("/fhir/Encounter/_history", params={"_count": 2}).json()
    assert len(limited["entry"]) == 2


def _encounters(count: int) -> list[Resource]:
    bundle = generate_patients(1, seed=12, start_index=5, resources_per_patient=40)[0]
    out = []
    for r in bundle.resources:
        if r["resourceType"] == "Encounter":
            enc = copy.deepcopy(r)
            del enc["id"]
            out.append(enc)
    assert len(out) >= count
    return out[:count]


# -- search ------------------------------------------------------------------------------


def test_search_patient_by_family_name_birthdate_identifier(
    clinician: httpx.Client, patients: list[PatientBundle]
) -> None:
    target = patients[1].patient
    family = target["name"][0]["family"]
    given = target["name"][0]["given"][0]
    mrn = next(i["value"] for i in target["identifier"] if i["system"] == MRN_SYSTEM)

    by_family = assert_searchset(clinician.get("/fhir/Patient", params={"family": family}))
    found = [e["resource"] for e in by_family["entry"]]
    assert target["id"] in ids(found)
    assert all(any(n.get("family") == family for n in r["name"]) for r in found)
    assert by_family["total"] == len(found)

    # name is a "starts with" match on any name part, case-insensitive.
    by_name = assert_searchset(clinician.get("/fhir/Patient", params={"name": given[:3].lower()}))
    assert target["id"] in ids([e["resource"] for e in by_name["entry"]])

    by_birth = assert_searchset(
        clinician.get("/fhir/Patient", params={"birthdate": target["birthDate"]})
    )
    assert all(e["resource"]["birthDate"] == target["birthDate"] for e in by_birth["entry"])
    assert target["id"] in ids([e["resource"] for e in by_birth["entry"]])

    for value in (f"{MRN_SYSTEM}|{mrn}", mrn):
        by_id = assert_searchset(clinician.get("/fhir/Patient", params={"identifier": value}))
        assert [e["resource"]["id"] for e in by_id["entry"]] == [target["id"]]
        assert by_id["total"] == 1

    both = assert_searchset(
        clinician.get("/fhir/Patient", params={"family": family, "birthdate": "1800"})
    )
    assert both["total"] == 0
    assert both.get("entry", []) == []


def test_search_observation_by_patient_code_date(
    clinician: httpx.Client, patients: list[PatientBundle]
) -> None:
    p = patients[0]
    obs = observations(p)
    ref = f"Patient/{p.patient_id}"

    by_patient = assert_searchset(
        clinician.get("/fhir/Observation", params={"patient": ref, "_count": 500})
    )
    assert by_patient["total"] == len(obs)
    assert ids([e["resource"] for e in by_patient["entry"]]) == ids(obs)
    bare = assert_searchset(
        clinician.get("/fhir/Observation", params={"patient": p.patient_id, "_count": 500})
    )
    assert bare["total"] == len(obs)

    coding = obs[0]["code"]["coding"][0]
    with_code = [o for o in obs if o["code"]["coding"][0]["code"] == coding["code"]]
    by_code = assert_searchset(
        clinician.get(
            "/fhir/Observation",
            params={"patient": ref, "code": f"{coding['system']}|{coding['code']}"},
        )
    )
    assert ids([e["resource"] for e in by_code["entry"]]) == ids(with_code)
    assert by_code["total"] == len(with_code)

    day = obs[-1]["effectiveDateTime"][:10]
    on_day = [o for o in obs if o["effectiveDateTime"][:10] == day]
    by_date = assert_searchset(
        clinician.get("/fhir/Observation", params={"patient": ref, "date": day})
    )
    assert ids([e["resource"] for e in by_date["entry"]]) == ids(on_day)

    year = int(day[:4])
    since = [o for o in obs if int(o["effectiveDateTime"][:4]) >= year]
    by_range = assert_searchset(
        clinician.get(
            "/fhir/Observation", params={"patient": ref, "date": f"ge{year}", "_count": 500}
        )
    )
    assert ids([e["resource"] for e in by_range["entry"]]) == ids(since)


def test_search_paging_with_next_links(
    clinician: httpx.Client, patients: list[PatientBundle]
) -> None:
    p = patients[2]
    obs = observations(p)
    assert len(obs) > 5
    url = f"/fhir/Observation?patient=Patient/{p.patient_id}&_count=4"
    found, pages = search_all(clinician, url)
    assert len(pages) == -(-len(obs) // 4)
    assert all(page["total"] == len(obs) for page in pages)
    assert all(len(page["entry"]) <= 4 for page in pages)
    assert len(found) == len(obs), "a resource was repeated or skipped across pages"
    assert ids(found) == ids(obs)
    assert "next" not in {link["relation"] for link in pages[-1]["link"]}

    offset = assert_searchset(
        clinician.get(
            "/fhir/Observation",
            params={"patient": f"Patient/{p.patient_id}", "_count": 3, "_offset": 3},
        )
    )
    assert [e["resource"]["id"] for e in offset["entry"]] == [r["id"] for r in found[3:6]]


def test_search_paging_keeps_query_values_intact(
    clinician: httpx.Client, patients: list[PatientBundle]
) -> None:
    """Next links must carry the same query, percent-encoded (codes hold ``|``, ``:``, ``/``)."""
    obs = [o for p in patients for o in observations(p)]
    coding = obs[0]["code"]["coding"][0]
    token = f"{coding['system']}|{coding['code']}"
    expected = {o["id"] for o in obs if o["code"]["coding"][0]["code"] == coding["code"]}
    assert len(expected) >= 3
    found, pages = search_all(clinician, f"/fhir/Observation?code={token}&_count=2")
    assert ids(found) >= expected
    assert all(page["total"] == pages[0]["total"] for page in pages)


def test_paging_links_are_percent_encoded(clinician: httpx.Client) -> None:
    """A code holding '&', '=', '#', '%' and a space survives the next link (issue #18).

    The links were joined from raw text: '&' cut the value in two, so the next
    page searched for another code (and for a stray parameter).
    """
    code = "a&b=c #1%"
    for i in range(3):
        body = {
            "resourceType": "Observation",
            "id": f"amp-{i}",
            "status": "final",
            "code": {"coding": [{"system": "urn:odd", "code": code}]},
            "subject": {"reference": "Patient/amp"},
            "effectiveDateTime": "2020-01-01",
        }
        assert put_json(clinician, f"/fhir/Observation/amp-{i}", body).status_code in (200, 201)
    first = assert_searchset(
        clinician.get("/fhir/Observation", params={"code": f"urn:odd|{code}", "_count": 1})
    )
    assert first["total"] == 3
    found, pages = search_all(
        clinician, next(x["url"] for x in first["link"] if x["relation"] == "self")
    )
    assert sorted(r["id"] for r in found) == ["amp-0", "amp-1", "amp-2"]
    assert len(pages) == 3
    assert all(page["total"] == 3 for page in pages)


def test_search_with_no_match_is_an_empty_searchset(clinician: httpx.Client) -> None:
    bundle = assert_searchset(clinician.get("/fhir/Patient", params={"family": "Zzyzxqq"}))
    assert bundle["total"] == 0
    assert bundle.get("entry", []) == []


# -- transaction -------------------------------------------------------------------------


def test_transaction_resolves_local_references(clinician: httpx.Client) -> None:
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": patient_url},
        "valueQuantity": {"value": 71, "unit": "/min"},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_url,
                "resource": new_patient(105),
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": obs, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    r = post_json(clinician, "/fhir", bundle)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    response = r.json()
    Bundle.model_validate(response)
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201 Created"] * 2
    locations = [e["response"]["location"] for e in response["entry"]]
    assert locations[0].startswith("Patient/") and locations[0].endswith("/_history/1")
    assert locations[1].startswith("Observation/")
    patient_id = locations[0].split("/")[1]
    stored = clinician.get(f"/fhir/{locations[1].split('/_history')[0]}").json()
    assert stored["subject"]["reference"] == f"Patient/{patient_id}"
    assert clinician.get(f"/fhir/Patient/{patient_id}").status_code == 200


def test_transaction_is_all_or_nothing(live: LiveServer, clinician: httpx.Client) -> None:
    good_id = f"txn-good-{uuid.uuid4().hex[:10]}"
    bad_obs = {
        "resourceType": "Observation",
        "status": "not-a-status",
        "code": {"text": "x"},
        "valueQuantity": {"value": "seventy"},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {**new_patient(106), "id": good_id},
                "request": {"method": "PUT", "url": f"Patient/{good_id}"},
            },
            {"resource": bad_obs, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    before = live.log_size()
    body = assert_outcome(post_json(clinician, "/fhir", bundle), 400)
    assert any(
        expr.startswith("Bundle.entry[1]")
        for i in body["issue"]
        for expr in i.get("expression", [])
    ), body
    assert_outcome(clinician.get(f"/fhir/Patient/{good_id}"), 404)
    assert live.log_size() == before

    # The same id written twice in one transaction is refused as a whole too.
    twice = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {**new_patient(107), "id": good_id},
                "request": {"method": "PUT", "url": f"Patient/{good_id}"},
            }
        ]
        * 2,
    }
    r = post_json(clinician, "/fhir", twice)
    assert_outcome(r, (400, 409))
    assert_outcome(clinician.get(f"/fhir/Patient/{good_id}"), 404)
    assert live.log_size() == before


def test_transaction_rejects_other_bundle_types(clinician: httpx.Client) -> None:
    for kind in ("collection", "searchset", "document"):
        assert_outcome(post_json(clinician, "/fhir", {"resourceType": "Bundle", "type": kind}), 400)
    assert_outcome(post_json(clinician, "/fhir", new_patient()), 400)


# -- delete ------------------------------------------------------------------------------


def test_delete_then_read_is_gone(live: LiveServer, clinician: httpx.Client) -> None:
    created = post_json(clinician, "/fhir/Patient", new_patient(108))
    rid = created.json()["id"]
    family = created.json()["name"][0]["family"]
    r = clinician.delete(f"/fhir/Patient/{rid}")
    assert r.status_code == 204
    assert r.content == b""
    assert_outcome(clinician.get(f"/fhir/Patient/{rid}"), 410, code="deleted")
    # A delete keeps history (FHIR R4 §3.1.0.7): version 1 is still readable.
    assert clinician.get(f"/fhir/Patient/{rid}/_history/1").json() == created.json()
    assert_outcome(clinician.get(f"/fhir/Patient/{rid}/_history/2"), 410)
    # Deleting it again has no effect and answers 204 again (FHIR R4), writing nothing.
    size = live.log_size()
    again = clinician.delete(f"/fhir/Patient/{rid}")
    assert again.status_code == 204 and again.content == b""
    assert live.log_size() == size
    found = clinician.get("/fhir/Patient", params={"family": family, "_count": 500}).json()
    assert rid not in {e["resource"]["id"] for e in found.get("entry", [])}
    assert_outcome(clinician.delete(f"/fhir/Patient/{uuid.uuid4()}"), 404)
    live.verify()


# -- capability statement ----------------------------------------------------------------

IMPLEMENTED = {
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
}


def test_metadata_is_a_truthful_capability_statement(live: LiveServer) -> None:
    with live.client() as anonymous:
        r = anonymous.get("/fhir/metadata")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FHIR_JSON)
    statement = r.json()
    CapabilityStatement.model_validate(statement)
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"].startswith("4.0")
    assert statement["kind"] == "instance"
    assert any("fhir+json" in f or f == "json" for f in statement["format"])
    (rest,) = statement["rest"]
    assert rest["mode"] == "server"
    described = {res["type"]: res for res in rest["resource"]}
    # Read independently from HL7's Bundle: every declared parameter is a standard one
    # of that type (or of every resource), of the type the specification gives it.
    with (Path(medledger.__file__).parent / "data/fhir-r4/search-parameters.json").open() as f:
        hl7 = {e["resource"]["url"]: e["resource"] for e in json.load(f)["entry"]}
    served = {"string", "token", "reference", "date", "number", "quantity", "uri"}
    pairs = {("token", "quantity"), ("token", "date"), ("token", "token")}

    def servable(d: dict[str, Any]) -> bool:
        """A simple type, or a composite of two components the blind index pairs."""
        if d["type"] != "composite":
            return d["type"] in served
        parts = d.get("component", [])
        kinds = tuple(hl7.get(c["definition"], {}).get("type") for c in parts)
        return kinds in pairs and not any("%" in c["expression"] for c in parts)

    assert {"Patient", "Observation", "Encounter", "Practitioner", "Location"} <= set(described)
    for rtype, res in described.items():
        assert {i["code"] for i in res["interaction"]} <= IMPLEMENTED
        names = {p["name"] for p in res["searchParam"]}
        expected = {
            d["code"]
            for d in hl7.values()
            if (rtype in d["base"] or "Resource" in d["base"])
            and servable(d)
            and d.get("expression")
        }
        # All of them, except a shared expression with no branch for this type.
        assert names <= expected and len(names) >= len(expected) - 2, rtype
        for p in res["searchParam"]:
            definition = hl7[p["definition"]]
            assert definition["code"] == p["name"] and definition["type"] == p["type"]
            assert rtype in definition["base"] or "Resource" in definition["base"]
    assert {i["code"] for i in rest.get("interaction", [])} <= {"transaction", "batch"}


def test_every_advertised_type_can_be_searched_and_its_history_read(
    live: LiveServer, clinician: httpx.Client
) -> None:
    with live.client() as anonymous:
        statement = anonymous.get("/fhir/metadata").json()
    for res in statement["rest"][0]["resource"]:
        codes = {i["code"] for i in res["interaction"]}
        if "search-type" in codes:
            assert_searchset(clinician.get(f"/fhir/{res['type']}", params={"_count": 1}))
        if "history-type" in codes:
            r = clinician.get(f"/fhir/{res['type']}/_history", params={"_count": 1})
            assert r.status_code == 200, r.text
            assert r.json()["type"] == "history"


def test_chain_records_every_write(live: LiveServer, clinician: httpx.Client) -> None:
    """Each acknowledged create or update is one more transaction on the private chain."""
    before = live.log_size()
    created = post_json(clinician, "/fhir/Patient", new_patient(109)).json()
    put_json(clinician, f"/fhir/Patient/{created['id']}", {**created, "active": False})
    assert live.log_size() == before + 2
    live.verify()
