"""FHIR R4 write semantics over real HTTP: what a write must refuse, and conditional writes.

Each test states a rule of the FHIR RESTful API (R4 §3.1.0) that a client relies
on, and checks both the answer and that a refused write changed nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
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


# -- delete keeps history; erasure is the admin's --------------------------------------------


def _history(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    r = client.get(f"{path}/_history")
    assert r.status_code == 200, r.text
    return list(r.json()["entry"])


def test_delete_keeps_older_versions_and_shows_in_history(
    live: LiveServer, clinician: httpx.Client
) -> None:
    rid = f"del-{uuid.uuid4().hex[:12]}"
    path = f"/fhir/Patient/{rid}"
    v1 = put_json(clinician, path, _patient(rid, gender="male")).json()
    v2 = put_json(clinician, path, _patient(rid, gender="female")).json()
    family = v1["name"][0]["family"]
    assert clinician.delete(path).status_code == 204
    assert_outcome(clinician.get(path), 410, "deleted")
    # Older versions stay readable, exactly as they were.
    assert clinician.get(f"{path}/_history/1").json() == v1
    assert clinician.get(f"{path}/_history/2").json() == v2
    assert_outcome(clinician.get(f"{path}/_history/3"), 410)
    entries = _history(clinician, path)
    assert [e["request"]["method"] for e in entries] == ["DELETE", "PUT", "POST"]
    assert entries[0]["response"]["etag"] == 'W/"3"'
    assert "resource" not in entries[0]
    assert [e["resource"]["gender"] for e in entries[1:]] == ["female", "male"]
    # Search no longer finds it; deleting again changes nothing.
    found = clinician.get("/fhir/Patient", params={"family": family, "_count": 500}).json()
    assert rid not in {e["resource"]["id"] for e in found.get("entry", [])}
    before = live.record_writes()
    assert clinician.delete(path).status_code == 204
    assert live.record_writes() == before
    # An update brings it back as version 4.
    back = put_json(clinician, path, _patient(rid, gender="other"))
    assert back.status_code in (200, 201), back.text
    assert back.headers["etag"] == 'W/"4"'
    assert clinician.get(path).json()["gender"] == "other"
    live.verify()


def test_delete_honours_if_match(live: LiveServer, clinician: httpx.Client) -> None:
    rid = f"del-{uuid.uuid4().hex[:12]}"
    path = f"/fhir/Patient/{rid}"
    put_json(clinician, path, _patient(rid))
    put_json(clinician, path, _patient(rid, gender="male"))
    assert_outcome(clinician.delete(path, headers={"If-Match": 'W/"1"'}), 412)
    assert clinician.get(path).status_code == 200
    assert clinician.delete(path, headers={"If-Match": 'W/"2"'}).status_code == 204


def test_admin_erasure_crypto_shreds_every_version(
    live: LiveServer, clinician: httpx.Client
) -> None:
    rid = f"erase-{uuid.uuid4().hex[:12]}"
    path = f"/fhir/Patient/{rid}"
    put_json(clinician, path, _patient(rid, gender="male"))
    assert clinician.delete(path).status_code == 204
    erase = f"/admin/records/Patient/{rid}/erase"
    # A clinician may delete, but only an admin may erase.
    assert_outcome(clinician.post(erase), 403)
    assert clinician.get(f"{path}/_history/1").status_code == 200
    with live.client(live.admin) as admin:
        r = admin.post(erase)
        assert r.status_code == 200, r.text
        assert r.json()["versions"] == 2
        assert_outcome(admin.post("/admin/records/Spaceship/x/erase"), 400)
    assert_outcome(clinician.get(f"{path}/_history/1"), 410)
    live.verify()


def test_conditional_delete(live: LiveServer, clinician: httpx.Client) -> None:
    mrn = uuid.uuid4().hex
    url = f"/fhir/Patient?identifier={_SYSTEM}|{mrn}"
    # No match: 204 and nothing written.
    before = live.record_writes()
    assert clinician.delete(url).status_code == 204
    assert live.record_writes() == before
    assert_outcome(clinician.delete("/fhir/Patient"), 400)  # no criteria: not "every Patient"
    a = post_json(clinician, "/fhir/Patient", _with_mrn(mrn)).json()["id"]
    b = post_json(clinician, "/fhir/Patient", _with_mrn(mrn)).json()["id"]
    # Two matches: 412 and both stay.
    assert_outcome(clinician.delete(url), 412)
    assert clinician.get(f"/fhir/Patient/{a}").status_code == 200
    assert clinician.delete(f"/fhir/Patient/{b}").status_code == 204
    # One match: deleted.
    assert clinician.delete(url).status_code == 204
    assert_outcome(clinician.get(f"/fhir/Patient/{a}"), 410)
    assert _count(clinician, mrn) == 0


# -- transaction and batch Bundles ---------------------------------------------------------


def _bundle(kind: str, *entries: dict[str, Any]) -> Resource:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _put(resource: Resource, **request: Any) -> dict[str, Any]:
    url = f"{resource['resourceType']}/{resource['id']}"
    return {
        "fullUrl": url,
        "resource": resource,
        "request": {"method": "PUT", "url": url, **request},
    }


def _observation(subject: str) -> Resource:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": subject},
    }


def test_transaction_if_match_is_honoured_and_a_stale_one_rolls_back_everything(
    live: LiveServer, clinician: httpx.Client
) -> None:
    a, b = (f"tx-{uuid.uuid4().hex[:10]}" for _ in range(2))
    put_json(clinician, f"/fhir/Patient/{a}", _patient(a, gender="male"))
    put_json(clinician, f"/fhir/Patient/{a}", _patient(a, gender="female"))  # now version 2
    before = live.record_writes()
    stale = _bundle(
        "transaction",
        _put(_patient(b, gender="other")),
        _put(_patient(a, gender="unknown"), ifMatch='W/"1"'),
    )
    assert_outcome(post_json(clinician, "/fhir", stale), 412)
    assert live.record_writes() == before
    assert clinician.get(f"/fhir/Patient/{a}").json()["gender"] == "female"
    assert clinician.get(f"/fhir/Patient/{b}").status_code == 404
    fresh = _bundle("transaction", _put(_patient(a, gender="unknown"), ifMatch='W/"2"'))
    r = post_json(clinician, "/fhir", fresh)
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["etag"] == 'W/"3"'


def test_transaction_if_none_exist_and_conditional_references(
    live: LiveServer, clinician: httpx.Client
) -> None:
    mrn = uuid.uuid4().hex
    existing = post_json(clinician, "/fhir/Patient", _with_mrn(mrn)).json()["id"]
    bundle = _bundle(
        "transaction",
        {
            "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
            "resource": _with_mrn(mrn, gender="female"),
            "request": {
                "method": "POST",
                "url": "Patient",
                "ifNoneExist": f"identifier={_SYSTEM}|{mrn}",
            },
        },
        {
            "resource": _observation("urn:uuid:11111111-1111-4111-8111-111111111111"),
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "resource": _observation(f"Patient?identifier={_SYSTEM}|{mrn}"),
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    r = post_json(clinician, "/fhir", bundle)
    assert r.status_code == 200, r.text
    answers = [e["response"] for e in r.json()["entry"]]
    assert answers[0]["status"] == "200 OK"
    assert answers[0]["location"].startswith(f"Patient/{existing}/_history/")
    assert [a["status"] for a in answers[1:]] == ["201 Created", "201 Created"]
    for answer in answers[1:]:
        stored = clinician.get(f"/fhir/{answer['location']}").json()
        assert stored["subject"]["reference"] == f"Patient/{existing}"
    assert _count(clinician, mrn) == 1

    # A conditional reference that matches nothing (or several) refuses the whole Bundle.
    before = live.record_writes()
    for mrn_ref in (uuid.uuid4().hex, mrn):
        if mrn_ref == mrn:
            post_json(clinician, "/fhir/Patient", _with_mrn(mrn))  # now two match
            before = live.record_writes()
        refused = _bundle(
            "transaction",
            _put(_patient(f"tx-{uuid.uuid4().hex[:10]}")),
            {
                "resource": _observation(f"Patient?identifier={_SYSTEM}|{mrn_ref}"),
                "request": {"method": "POST", "url": "Observation"},
            },
        )
        assert_outcome(post_json(clinician, "/fhir", refused), 412)
        assert live.record_writes() == before


def test_transaction_delete_and_conditional_entries(
    live: LiveServer, clinician: httpx.Client
) -> None:
    gone, mrn = f"tx-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    put_json(clinician, f"/fhir/Patient/{gone}", _patient(gone))
    bundle = _bundle(
        "transaction",
        {"request": {"method": "DELETE", "url": f"Patient/{gone}"}},
        {
            "resource": _with_mrn(mrn, gender="male"),
            "request": {"method": "PUT", "url": f"Patient?identifier={_SYSTEM}|{mrn}"},
        },
        {
            "request": {
                "method": "DELETE",
                "url": f"Patient?identifier={_SYSTEM}|{uuid.uuid4().hex}",
            }
        },
    )
    r = post_json(clinician, "/fhir", bundle)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["204 No Content", "201 Created", "204 No Content"]
    assert_outcome(clinician.get(f"/fhir/Patient/{gone}"), 410)
    assert clinician.get(f"/fhir/Patient/{gone}/_history/1").status_code == 200
    assert _count(clinician, mrn) == 1
    # A PUT entry whose body has no id, or another id, is refused as a PUT is.
    before = live.record_writes()
    rid = f"tx-{uuid.uuid4().hex[:10]}"
    for body in (_patient(), _patient("other-id")):
        entry = {"resource": body, "request": {"method": "PUT", "url": f"Patient/{rid}"}}
        assert_outcome(post_json(clinician, "/fhir", _bundle("transaction", entry)), 400)
    assert live.record_writes() == before


def test_batch_answers_each_entry_on_its_own(live: LiveServer, clinician: httpx.Client) -> None:
    good = f"b-{uuid.uuid4().hex[:10]}"
    bundle = _bundle(
        "batch",
        _put(_patient(good)),
        {"resource": _patient(gender="robot"), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "DELETE", "url": f"Patient/{uuid.uuid4()}"}},
    )
    r = post_json(clinician, "/fhir", bundle)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "batch-response"
    answers = [e["response"] for e in body["entry"]]
    assert answers[0]["status"] == "201 Created"
    assert answers[1]["status"] == "400"
    assert answers[1]["outcome"]["issue"][0]["code"] == "code-invalid"
    assert answers[2]["status"] == "404"
    assert clinician.get(f"/fhir/Patient/{good}").status_code == 200


@pytest.mark.slow
def test_a_whole_patient_in_one_transaction_beyond_the_resource_limit(
    live: LiveServer, clinician: httpx.Client
) -> None:
    """Thousands of entries, more than one resource may weigh (4 MiB), under the Bundle limit."""
    from medledger.synthetic import generate_patients

    patient = generate_patients(1, seed=23, resources_per_patient=2300)[0]
    resources = patient.all_resources()
    bundle = _bundle("transaction", *(_put(r) for r in resources))
    data = json.dumps(bundle, indent=4).encode()  # pretty-printed, as many clients send it
    assert len(data) > 4 * 1024 * 1024
    r = clinician.post(
        "/fhir",
        content=data,
        headers={"Content-Type": "application/fhir+json"},
        timeout=600,  # a hang guard: thousands of entries take minutes on a loaded machine
    )
    assert r.status_code == 200, r.text[:500]
    assert len(r.json()["entry"]) == len(resources)
    assert clinician.get(f"/fhir/Patient/{patient.patient_id}").status_code == 200


# -- patch -------------------------------------------------------------------------------------

_PATCH = {"Content-Type": "application/json-patch+json"}


def _patch(client: httpx.Client, path: str, ops: Any, **headers: str) -> httpx.Response:
    return client.patch(path, content=json.dumps(ops).encode(), headers={**_PATCH, **headers})


def test_json_patch_makes_a_new_version(live: LiveServer, clinician: httpx.Client) -> None:
    rid = f"patch-{uuid.uuid4().hex[:10]}"
    path = f"/fhir/Patient/{rid}"
    put_json(clinician, path, _patient(rid, gender="male"))
    ops = [
        {"op": "test", "path": "/gender", "value": "male"},
        {"op": "replace", "path": "/gender", "value": "female"},
        {"op": "add", "path": "/birthDate", "value": "1970-01-02"},
    ]
    r = _patch(clinician, path, ops, **{"If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"2"'
    current = clinician.get(path).json()
    assert (current["gender"], current["birthDate"]) == ("female", "1970-01-02")
    assert clinician.get(f"{path}/_history/1").json()["gender"] == "male"

    before = live.record_writes()
    # A failing test operation, a stale If-Match: 412. The result must still be valid FHIR.
    assert_outcome(_patch(clinician, path, [ops[0]]), 412)
    assert_outcome(_patch(clinician, path, ops[1:2], **{"If-Match": 'W/"1"'}), 412)
    bad = [{"op": "replace", "path": "/gender", "value": "robot"}]
    assert_outcome(_patch(clinician, path, bad), 400, "code-invalid")
    for malformed in (
        {"op": "replace"},
        [{"op": "remove", "path": "/nothing/here"}],
        [{"op": "replace", "path": "/id", "value": "else"}],
        [{"op": "frobnicate", "path": "/gender"}],
    ):
        assert_outcome(_patch(clinician, path, malformed), 400)
    # A patch is JSON Patch: a resource sent as a patch is refused (415).
    r = clinician.patch(path, content=b"{}", headers={"Content-Type": "application/fhir+json"})
    assert_outcome(r, 415)
    assert_outcome(_patch(clinician, f"/fhir/Patient/{uuid.uuid4()}", ops[1:2]), 404)
    assert live.record_writes() == before
    assert clinician.get(path).headers["etag"] == 'W/"2"'


# -- $validate -----------------------------------------------------------------------------


def test_validate_answers_an_outcome_and_stores_nothing(
    live: LiveServer, clinician: httpx.Client
) -> None:
    before = live.record_writes()
    ok = post_json(clinician, "/fhir/Patient/$validate", _patient(gender="male"))
    assert ok.status_code == 200, ok.text
    assert [i["severity"] for i in ok.json()["issue"]] == ["information"]
    wrapped = {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": _patient(gender="robot")}],
    }
    bad = post_json(clinician, "/fhir/Patient/$validate", wrapped)
    assert bad.status_code == 200, bad.text
    issue = bad.json()["issue"][0]
    assert (issue["severity"], issue["code"], issue["expression"]) == (
        "error",
        "code-invalid",
        ["Patient.gender"],
    )
    other_type = post_json(clinician, "/fhir/Observation/$validate", _patient())
    assert other_type.json()["issue"][0]["severity"] == "error"
    # Instance level: an update of this resource must carry its id.
    good = post_json(clinician, "/fhir/Patient/p1/$validate", _patient("p1"))
    assert good.json()["issue"][0]["severity"] == "information"
    wrong = post_json(clinician, "/fhir/Patient/p1/$validate", _patient("p2"))
    assert wrong.json()["issue"][0]["severity"] == "error"
    assert live.record_writes() == before
    assert clinician.get("/fhir/Patient/p1").status_code == 404


# -- history: _count, _since, _at and next links ----------------------------------------------


def _follow(client: httpx.Client, url: str, base: str) -> list[dict[str, Any]]:
    """Every entry along ``next`` links; each link absolute, on this server."""
    entries: list[dict[str, Any]] = []
    next_url: str | None = url
    for _ in range(50):
        if next_url is None:
            return entries
        r = client.get(next_url)
        assert r.status_code == 200, r.text
        bundle = r.json()
        assert bundle["type"] == "history"
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert links["self"].startswith(f"{base}/fhir/")
        for entry in bundle.get("entry", []):
            assert entry["fullUrl"].startswith(f"{base}/fhir/")
        entries.extend(bundle.get("entry", []))
        next_url = links.get("next")
    raise AssertionError("paging does not end")


def test_history_pages_and_filters(live: LiveServer, clinician: httpx.Client) -> None:
    rid = f"h-{uuid.uuid4().hex[:10]}"
    path = f"/fhir/Patient/{rid}"
    stamps = []
    for gender in ("male", "female", "other", "unknown"):
        r = put_json(clinician, path, _patient(rid, gender=gender))
        stamps.append(r.json()["meta"]["lastUpdated"])
    entries = _follow(clinician, f"{path}/_history?_count=1", live.url)
    assert [e["response"]["etag"] for e in entries] == [f'W/"{n}"' for n in (4, 3, 2, 1)]
    assert entries[0]["fullUrl"] == f"{live.url}/fhir/Patient/{rid}"
    # _since: the versions written at or after that instant.
    since = clinician.get(f"{path}/_history", params={"_since": stamps[2]}).json()
    assert {e["resource"]["gender"] for e in since["entry"]} >= {"other", "unknown"}
    assert all(e["response"]["lastModified"] >= stamps[2] for e in since["entry"])
    # _at: the versions current at some moment of that instant.
    at = clinician.get(f"{path}/_history", params={"_at": stamps[1]}).json()
    genders = ("male", "female", "other", "unknown")
    t = stamps[1]  # millisecond precision: the period [t, t + 1 ms)
    expected = {
        g
        for i, g in enumerate(genders)
        if stamps[i] <= t and (i == len(genders) - 1 or stamps[i + 1] > t)
    }
    assert {e["resource"]["gender"] for e in at["entry"]} == expected
    assert expected  # some version was current then
    # Type and system history page the same way, newest first.
    typed = _follow(clinician, "/fhir/Patient/_history?_count=3", live.url)
    mine = [e["response"]["etag"] for e in typed if e["request"]["url"] == f"Patient/{rid}"]
    assert mine == [f'W/"{n}"' for n in (4, 3, 2, 1)]
    system = clinician.get("/fhir/_history", params={"_count": 2, "_since": stamps[3]}).json()
    assert system["entry"][0]["request"]["url"] == f"Patient/{rid}"
    for bad in ({"_since": "last week"}, {"_count": "0"}):
        assert_outcome(clinician.get(f"{path}/_history", params=bad), 400)
    # _at on type and system history: the same versions of this resource, as for the
    # instance (other resources may have versions current then too).
    for url in ("/fhir/Patient/_history", "/fhir/_history"):
        entries = _follow(clinician, f"{url}?_count=50&_at={t}", live.url)
        mine_at = {
            e["resource"]["gender"] for e in entries if e["request"]["url"] == f"Patient/{rid}"
        }
        assert mine_at == expected, url
        assert all(e["response"]["lastModified"] <= t for e in entries)
    assert_outcome(clinician.get("/fhir/Patient/_history", params={"_at": "yesterday"}), 400)
