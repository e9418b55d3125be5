"""A real FHIR client library, ``fhirpy`` (sync client), works against the node unchanged."""

from __future__ import annotations

import uuid

import pytest
from api_helpers import LiveServer
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import (
    AuthorizationError,
    ForbiddenError,
    MultipleResourcesFound,
    OperationOutcome,
    ResourceNotFound,
)

from medledger.synthetic import PatientBundle, generate_patients


@pytest.fixture(scope="module")
def fhir(live: LiveServer) -> SyncFHIRClient:
    return SyncFHIRClient(f"{live.url}/fhir", authorization=f"Bearer {live.clinician}")


@pytest.fixture(scope="module")
def person() -> PatientBundle:
    return generate_patients(1, seed=21, start_index=3, resources_per_patient=30)[0]


def test_create_read_update_delete(fhir: SyncFHIRClient, person: PatientBundle) -> None:
    data = {k: v for k, v in person.patient.items() if k not in ("resourceType", "id")}
    patient = fhir.resource("Patient", **data)
    patient.save()
    assert patient.id
    assert patient["meta"]["versionId"] == "1"

    read = fhir.reference("Patient", patient.id).to_resource()
    assert read.id == patient.id
    assert read["name"] == person.patient["name"]
    fetched = fhir.get("Patient", patient.id)
    assert fetched["birthDate"] == person.patient["birthDate"]

    read["gender"] = "other"
    read.save()
    assert read["meta"]["versionId"] == "2"
    refreshed = fhir.reference("Patient", patient.id).to_resource()
    refreshed.refresh()
    assert refreshed["gender"] == "other"
    assert refreshed["meta"]["versionId"] == "2"

    fhir.delete(read)
    with pytest.raises(ResourceNotFound):
        fhir.reference("Patient", patient.id).to_resource()
    with pytest.raises(ResourceNotFound):
        fhir.get("Patient", patient.id)


def test_update_as_create_with_client_ids_and_search(
    fhir: SyncFHIRClient, person: PatientBundle
) -> None:
    # Save the synthetic patient and its Observations under their own ids (PUT).
    fhir.resource("Patient", **person.patient).save()
    obs = [r for r in person.resources if r["resourceType"] == "Observation"]
    for o in obs:
        saved = fhir.resource("Observation", **o).save()
        assert saved.id == o["id"]

    family = person.patient["name"][0]["family"]
    found = fhir.resources("Patient").search(family=family).fetch()
    assert person.patient_id in {p.id for p in found}
    assert all(any(n.get("family") == family for n in p["name"]) for p in found)

    mine = (
        fhir.resources("Observation")
        .search(patient=f"Patient/{person.patient_id}")
        .limit(4)
        .fetch()
    )
    assert len(mine) == 4
    everything = (
        fhir.resources("Observation").search(patient=person.patient_id).limit(4).fetch_all()
    )
    assert sorted(o.id for o in everything) == sorted(o["id"] for o in obs)

    coding = obs[0]["code"]["coding"][0]
    by_code = (
        fhir.resources("Observation")
        .search(patient=person.patient_id, code=f"{coding['system']}|{coding['code']}")
        .fetch_all()
    )
    assert {o.id for o in by_code} == {
        o["id"] for o in obs if o["code"]["coding"][0]["code"] == coding["code"]
    }
    first = fhir.resources("Observation").search(patient=person.patient_id).first()
    assert first is not None and first.id in {o["id"] for o in obs}

    # References resolve through the client.
    subject = first["subject"].to_resource()
    assert subject.id == person.patient_id


def test_client_sees_auth_errors(live: LiveServer, person: PatientBundle) -> None:
    anonymous = SyncFHIRClient(f"{live.url}/fhir")
    with pytest.raises(AuthorizationError):
        anonymous.resources("Patient").fetch()
    auditor = SyncFHIRClient(f"{live.url}/fhir", authorization=f"Bearer {live.auditor}")
    with pytest.raises(ForbiddenError):
        auditor.resources("Patient").fetch()


# -- writes: patch, conditional create and update, delete with history, $validate ----------

_MRN = "http://example.org/fhirpy-mrn"


def _identified(mrn: str, **fields: object) -> dict[str, object]:
    return {"identifier": [{"system": _MRN, "value": mrn}], "name": [{"family": "Py"}], **fields}


def test_patch_through_the_client(fhir: SyncFHIRClient) -> None:
    patient = fhir.resource("Patient", **_identified(uuid.uuid4().hex, gender="male"))
    patient.save()
    patient.patch(gender="female", birthDate="1980-02-03")
    stored = fhir.get("Patient", patient.id)
    assert (stored["gender"], stored["birthDate"]) == ("female", "1980-02-03")
    assert stored["meta"]["versionId"] == "2"
    assert stored["name"] == [{"family": "Py"}]  # what the patch did not name is kept
    patched = fhir.patch("Patient", patient.id, active=True)
    assert patched["active"] is True and patched["meta"]["versionId"] == "3"
    with pytest.raises(OperationOutcome):
        fhir.patch("Patient", patient.id, gender="robot")


def test_conditional_create_and_update_through_the_client(fhir: SyncFHIRClient) -> None:
    mrn = uuid.uuid4().hex
    search = fhir.resources("Patient").search(identifier=f"{_MRN}|{mrn}")
    first, created = search.get_or_create(fhir.resource("Patient", **_identified(mrn)))
    assert created
    again, created = search.get_or_create(fhir.resource("Patient", **_identified(mrn)))
    assert not created and again.id == first.id
    updated, created = search.update(fhir.resource("Patient", **_identified(mrn, gender="other")))
    assert not created and updated.id == first.id
    assert fhir.get("Patient", first.id)["gender"] == "other"
    assert len(search.fetch_all()) == 1
    # A second match makes the criteria ambiguous: the client hears 412.
    fhir.resource("Patient", **_identified(mrn)).save()
    with pytest.raises(MultipleResourcesFound):
        search.update(fhir.resource("Patient", **_identified(mrn)))


def test_delete_keeps_history_through_the_client(fhir: SyncFHIRClient) -> None:
    patient = fhir.resource("Patient", **_identified(uuid.uuid4().hex, gender="male"))
    patient.save()
    fhir.delete(patient)
    with pytest.raises(ResourceNotFound):
        fhir.get("Patient", patient.id)
    version_1 = fhir.execute(f"Patient/{patient.id}/_history/1", method="get")
    assert version_1["gender"] == "male"
    history = fhir.execute(f"Patient/{patient.id}/_history", method="get")
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]


def test_validate_through_execute(fhir: SyncFHIRClient) -> None:
    ok = fhir.execute("Patient/$validate", method="post", data={"resourceType": "Patient"})
    assert ok["issue"][0]["severity"] == "information"
    bad = fhir.execute(
        "Patient/$validate", method="post", data={"resourceType": "Patient", "gender": "robot"}
    )
    assert bad["issue"][0]["severity"] == "error"
    assert bad["issue"][0]["expression"] == ["Patient.gender"]


def test_everything_through_execute(fhir: SyncFHIRClient) -> None:
    """``resource.execute('$everything', method='get')``: the patient and its records."""
    patient = fhir.resource("Patient", **_identified(uuid.uuid4().hex))
    patient.save()
    condition = fhir.resource(
        "Condition",
        subject={"reference": f"Patient/{patient.id}"},
        code={"text": "everything-check"},
    )
    condition.save()
    other = fhir.resource("Patient", **_identified(uuid.uuid4().hex))
    other.save()
    bundle = fhir.resource("Patient", id=patient.id).execute("$everything", method="get")
    assert bundle["type"] == "searchset" and bundle["total"] == 2
    keys = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]]
    assert keys == [("Patient", patient.id), ("Condition", condition.id)]
    posted = fhir.resource("Patient", id=patient.id).execute(
        "$everything",
        data={"resourceType": "Parameters", "parameter": [{"name": "_count", "valueInteger": 1}]},
    )
    assert len(posted["entry"]) == 1 and posted["link"][1]["relation"] == "next"


def test_search_features_through_fhirpy(fhir: SyncFHIRClient) -> None:
    """fhirpy's search API unchanged: chaining, include, revinclude, sort, elements, count, has."""
    org = fhir.resource("Organization", id="fp-org", name="Fhirpy Clinic")
    org.save()
    for i, family in enumerate(["Fhirpyone", "Fhirpytwo"]):
        fhir.resource(
            "Patient",
            id=f"fp-{i}",
            name=[{"family": family}],
            birthDate=f"198{i}-01-01",
            managingOrganization={"reference": "Organization/fp-org"},
        ).save()
        fhir.resource(
            "Encounter",
            id=f"fp-enc-{i}",
            status="finished",
            subject={"reference": f"Patient/fp-{i}"},
            period={"start": f"2021-0{i + 1}-01", "end": f"2021-0{i + 1}-03"},
            **{"class": {"code": "AMB"}},
        ).save()
    patients = fhir.resources("Patient").search(organization="fp-org")
    assert patients.count() == 2
    assert [p.id for p in patients.sort("-birthdate").fetch()] == ["fp-1", "fp-0"]
    chained = fhir.resources("Encounter").search(**{"subject:Patient.name": "fhirpytwo"}).fetch()
    assert [e.id for e in chained] == ["fp-enc-1"]
    included = fhir.resources("Encounter").search(_id="fp-enc-0").include("Encounter", "subject")
    raw = included.fetch_raw()
    assert {(e.resource.resourceType, e.resource.id) for e in raw.entry} == {
        ("Encounter", "fp-enc-0"),
        ("Patient", "fp-0"),
    }
    rev = fhir.resources("Patient").search(_id="fp-1").revinclude("Encounter", "subject")
    assert {e.resource.id for e in rev.fetch_raw().entry} == {"fp-1", "fp-enc-1"}
    slim = fhir.resources("Patient").search(_id="fp-0").elements("birthDate").fetch()
    assert "name" not in slim[0] and slim[0]["birthDate"] == "1980-01-01"
    has = fhir.resources("Patient").has("Encounter", "subject", date="2021-02").fetch()
    assert [p.id for p in has] == ["fp-1"]
