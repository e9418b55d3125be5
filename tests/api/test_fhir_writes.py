"""FHIR R4 write semantics over real HTTP: what a write must refuse, and conditional writes.

Each test states a rule of the FHIR RESTful API (R4 §3.1.0) that a client relies
on, and checks both the answer and that a refused write changed nothing.
"""

from __future__ import annotations

import asyncio
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


# -- conditional create (If-None-Exist) ----------------------------------------------------

_SYSTEM = "http://example.org/mrn"


def _with_mrn(mrn: str, **fields: Any) -> Resource:
    return _patient(identifier=[{"system": _SYSTEM, "value": mrn}], **fields)


def _count(client: httpx.Client, mrn: str) -> int:
    r = client.get("/fhir/Patient", params={"identifier": f"{_SYSTEM}|{mrn}"})
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


def test_if_none_exist_creates_once_then_returns_the_existing(
    live: LiveServer, clinician: httpx.Client
) -> None:
    mrn = uuid.uuid4().hex
    criteria = {"If-None-Exist": f"identifier={_SYSTEM}|{mrn}"}
    first = post_json(clinician, "/fhir/Patient", _with_mrn(mrn, gender="male"), headers=criteria)
    assert first.status_code == 201, first.text
    before = live.record_writes()
    for _ in range(2):
        again = post_json(
            clinician, "/fhir/Patient", _with_mrn(mrn, gender="female"), headers=criteria
        )
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["gender"] == "male"  # the existing one, unchanged
        assert again.headers["etag"] == 'W/"1"'
    assert live.record_writes() == before
    assert _count(clinician, mrn) == 1

    # Two matches: 412, and nothing is created.
    assert post_json(clinician, "/fhir/Patient", _with_mrn(mrn)).status_code == 201
    before = live.record_writes()
    assert_outcome(post_json(clinician, "/fhir/Patient", _with_mrn(mrn), headers=criteria), 412)
    assert live.record_writes() == before
    assert _count(clinician, mrn) == 2


def test_if_none_exist_needs_valid_criteria(live: LiveServer, clinician: httpx.Client) -> None:
    before = live.record_writes()
    for bad in ("", "_count=3", "nosuchparam=1", "Observation?code=1"):
        assert_outcome(
            post_json(clinician, "/fhir/Patient", _patient(), headers={"If-None-Exist": bad}), 400
        )
    assert live.record_writes() == before


def test_concurrent_identical_conditional_creates_make_one_resource(
    live: LiveServer, clinician: httpx.Client
) -> None:
    mrn = uuid.uuid4().hex
    criteria = {"If-None-Exist": f"identifier={_SYSTEM}|{mrn}"}

    async def send_all() -> list[int]:
        headers = {"Authorization": f"Bearer {live.clinician}", **criteria}
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post("/fhir/Patient", json=_with_mrn(mrn)) for _ in range(6))
            )
        return sorted(r.status_code for r in responses)

    assert asyncio.run(send_all()) == [200] * 5 + [201]
    assert _count(clinician, mrn) == 1


# -- conditional update --------------------------------------------------------------------


def test_conditional_update_creates_updates_or_refuses(
    live: LiveServer, clinician: httpx.Client
) -> None:
    mrn = uuid.uuid4().hex
    url = f"/fhir/Patient?identifier={_SYSTEM}|{mrn}"
    # No match, no id: created under a server id.
    created = put_json(clinician, url, _with_mrn(mrn, gender="male"))
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    # One match: that resource is updated (the body needs no id).
    updated = put_json(clinician, url, _with_mrn(mrn, gender="female"))
    assert updated.status_code == 200, updated.text
    assert updated.json()["id"] == rid
    assert updated.headers["etag"] == 'W/"2"'
    assert clinician.get(f"/fhir/Patient/{rid}").json()["gender"] == "female"
    # One match but the body names another resource: 400.
    before = live.record_writes()
    assert_outcome(put_json(clinician, url, {**_with_mrn(mrn), "id": "someone-else"}), 400)
    # No match, and the body's id is taken by a resource the criteria do not match: 412.
    other = uuid.uuid4().hex
    taken = {**_with_mrn(other), "id": rid}
    assert_outcome(put_json(clinician, f"/fhir/Patient?identifier={_SYSTEM}|{other}", taken), 412)
    # No criteria at all is not "every Patient".
    assert_outcome(put_json(clinician, "/fhir/Patient", _with_mrn(mrn)), 400)
    assert live.record_writes() == before
    # Two matches: 412.
    assert post_json(clinician, "/fhir/Patient", _with_mrn(mrn)).status_code == 201
    before = live.record_writes()
    assert_outcome(put_json(clinician, url, _with_mrn(mrn, gender="other")), 412)
    assert live.record_writes() == before
    assert clinician.get(f"/fhir/Patient/{rid}").json()["gender"] == "female"


# -- Prefer: return= -----------------------------------------------------------------------


def test_prefer_return_shapes_the_answer_to_a_write(clinician: httpx.Client) -> None:
    minimal = post_json(
        clinician, "/fhir/Patient", _patient(), headers={"Prefer": "return=minimal"}
    )
    assert minimal.status_code == 201
    assert minimal.content == b""
    location = minimal.headers["location"]
    assert minimal.headers["etag"] == 'W/"1"'
    rid = location.split("/")[3]
    outcome = put_json(
        clinician,
        f"/fhir/Patient/{rid}",
        _patient(rid, gender="other"),
        headers={"Prefer": "return=OperationOutcome"},
    )
    assert outcome.status_code == 200
    assert outcome.json()["resourceType"] == "OperationOutcome"
    assert outcome.json()["issue"][0]["severity"] == "information"
    assert outcome.headers["etag"] == 'W/"2"'
    full = put_json(
        clinician,
        f"/fhir/Patient/{rid}",
        _patient(rid, gender="male"),
        headers={"Prefer": "return=representation"},
    )
    assert full.json()["gender"] == "male"
    assert full.json()["meta"]["versionId"] == "3"
