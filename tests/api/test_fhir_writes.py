"""FHIR R4 write semantics over real HTTP: what a write must refuse, and conditional writes.

Each test states a rule of the FHIR RESTful API (R4 §3.1.0) that a client relies
on, and checks both the answer and that a refused write changed nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from api_helpers import LiveServer, assert_outcome, post_json, put_json

Resource = dict[str, Any]


def _patient(rid: str | None = None, **fields: Any) -> Resource:
    body: Resource = {"resourceType": "Patient", "name": [{"family": "Writes"}], **fields}
    if rid is not None:
        body["id"] = rid
    return body


# -- update: the body's id -----------------------------------------------------------------


def test_update_without_an_id_in_the_body_is_400_and_writes_nothing(
    live: LiveServer, clinician: httpx.Client
) -> None:
    rid = f"p-{uuid.uuid4().hex[:12]}"
    assert (
        put_json(clinician, f"/fhir/Patient/{rid}", _patient(rid, gender="male")).status_code == 201
    )
    before = live.record_writes()
    body = assert_outcome(
        put_json(clinician, f"/fhir/Patient/{rid}", _patient(gender="female")), 400, "required"
    )
    assert body["issue"][0]["expression"] == ["Patient.id"]
    # A new id is no exception: update-as-create needs the id in the body too.
    assert_outcome(put_json(clinician, f"/fhir/Patient/{rid}-new", _patient()), 400, "required")
    assert_outcome(
        put_json(clinician, f"/fhir/Patient/{rid}", _patient("someone-else", gender="female")),
        400,
        "invalid",
    )
    assert live.record_writes() == before
    current = clinician.get(f"/fhir/Patient/{rid}")
    assert current.json()["gender"] == "male"
    assert current.headers["etag"] == 'W/"1"'
    assert clinician.get(f"/fhir/Patient/{rid}-new").status_code == 404


# -- required value sets -------------------------------------------------------------------


def test_codes_outside_required_value_sets_are_400_and_write_nothing(
    live: LiveServer, clinician: httpx.Client
) -> None:
    before = live.record_writes()
    body = assert_outcome(post_json(clinician, "/fhir/Patient", _patient(gender="robot")), 400)
    assert body["issue"][0]["code"] == "code-invalid"
    assert body["issue"][0]["expression"] == ["Patient.gender"]
    obs = {
        "resourceType": "Observation",
        "status": "bogus",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    }
    body = assert_outcome(post_json(clinician, "/fhir/Observation", obs), 400, "code-invalid")
    assert body["issue"][0]["expression"] == ["Observation.status"]
    assert live.record_writes() == before
