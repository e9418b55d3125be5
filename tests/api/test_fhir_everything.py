"""``Patient/$everything`` over HTTP: the compartment computed from the input, paging, access."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from api_helpers import FHIR_JSON, LiveServer, assert_outcome, post_json, put_json

from medledger.synthetic import generate_patients

Resource = dict[str, Any]
Key = tuple[str, str]


def _key(resource: Resource) -> Key:
    return (resource["resourceType"], resource["id"])


def _refers_to(resource: Resource, target: str) -> bool:
    """Oracle: the resource names ``target`` in its ``subject``, ``patient`` or ``performer``."""
    for name in ("subject", "patient", "performer"):
        value = resource.get(name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and item.get("reference") == target:
                return True
    return False


class World:
    """Two synthetic patients plus hand-made links, and what $everything must show for A."""

    def __init__(self) -> None:
        a, b = generate_patients(2, seed=41, start_index=50, resources_per_patient=20)
        self.a, self.b = a, b
        ref_a, ref_b = f"Patient/{a.patient_id}", f"Patient/{b.patient_id}"
        org = {"resourceType": "Organization", "id": "ev-org", "name": "Everything Clinic"}
        doc = {"resourceType": "Practitioner", "id": "ev-doc", "name": [{"family": "Doc"}]}
        lone = {"resourceType": "Practitioner", "id": "ev-lone", "name": [{"family": "Lone"}]}
        room = {"resourceType": "Location", "id": "ev-room", "name": "Room 1"}
        pump = {"resourceType": "Device", "id": "ev-pump"}
        # A's own, pointing at the shared resources above.
        seen_by = {
            "resourceType": "Observation",
            "id": "ev-obs-a",
            "status": "final",
            "code": {"text": "pulse"},
            "subject": {"reference": ref_a},
            "performer": [{"reference": "Practitioner/ev-doc"}],
            "device": {"reference": "Device/ev-pump"},
        }
        visit = {
            "resourceType": "Encounter",
            "id": "ev-enc-a",
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "AMB",
            },
            "subject": {"reference": ref_a},
            "location": [{"location": {"reference": "Location/ev-room"}}],
        }
        # In A's compartment through ``performer``, though it is about B.
        performed = {
            "resourceType": "Observation",
            "id": "ev-obs-perf",
            "status": "final",
            "code": {"text": "helped"},
            "subject": {"reference": ref_b},
            "performer": [{"reference": ref_a}],
        }
        group = {
            "resourceType": "Group",
            "id": "ev-group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": ref_a}}],
        }
        patient_a = {**a.patient, "managingOrganization": {"reference": "Organization/ev-org"}}
        self.loaded: list[Resource] = [
            org,
            doc,
            lone,
            room,
            pump,
            patient_a,
            *a.resources,
            *b.all_resources(),
            seen_by,
            visit,
            performed,
            group,
        ]
        # The oracle, from the input alone.
        self.compartment = {_key(patient_a)} | {
            _key(r) for r in self.loaded if r["resourceType"] != "Patient" and _refers_to(r, ref_a)
        }
        self.compartment.add(_key(group))
        self.referenced = {
            ("Organization", "ev-org"),
            ("Practitioner", "ev-doc"),
            ("Location", "ev-room"),
            ("Device", "ev-pump"),
        }
        self.about_a = {k for k in self.compartment if k not in {_key(performed), _key(group)}}


@pytest.fixture(scope="module")
def world(live: LiveServer) -> World:
    w = World()
    with live.client(live.clinician) as client:
        for r in w.loaded:
            response = put_json(client, f"/fhir/{r['resourceType']}/{r['id']}", r)
            assert response.status_code in (200, 201), response.text
    return w


def _pages(
    client: httpx.Client, live: LiveServer, first: str, **params: str
) -> list[dict[str, Any]]:
    bundles = []
    response = client.get(first, params=params)
    while True:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(FHIR_JSON)
        bundle = response.json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
        bundles.append(bundle)
        nexts = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nexts:
            return bundles
        assert nexts[0].startswith(f"{live.url}/fhir/Patient/"), nexts[0]  # absolute
        assert len(bundles) < 50
        response = client.get(nexts[0])


def _entries(bundles: list[dict[str, Any]], mode: str) -> list[Key]:
    return [
        _key(e["resource"])
        for b in bundles
        for e in b.get("entry", [])
        if e["search"]["mode"] == mode
    ]


def test_everything_is_the_compartment_and_what_it_refers_to(
    live: LiveServer, world: World
) -> None:
    first = f"/fhir/Patient/{world.a.patient_id}/$everything"
    before = len(live.access_entries())
    with live.client(live.clinician) as client:
        bundles = _pages(client, live, first, _count="7")
    matched = _entries(bundles, "match")
    assert len(matched) == len(set(matched)), "a resource on two pages"
    assert set(matched) == world.compartment
    assert matched[0] == ("Patient", world.a.patient_id)
    assert all(b["total"] == len(world.compartment) for b in bundles)
    assert len(bundles) == -(-len(world.compartment) // 7)
    included = set(_entries(bundles, "include"))
    # Referenced and about no patient: shown. B, and the unreferenced Practitioner: not.
    assert included == world.referenced
    b_own = {_key(r) for r in world.b.all_resources()}
    assert not (set(matched) | included) & b_own
    assert ("Practitioner", "ev-lone") not in included
    for b in bundles:
        for e in b["entry"]:
            assert (
                e["fullUrl"]
                == f"{live.url}/fhir/{e['resource']['resourceType']}/{e['resource']['id']}"
            )
    # Every resource shown is an allowed access entry by this clinician, in the trail.
    entries = live.access_entries()[before:]
    refs = {live.node.records.record_ref(*k) for k in world.compartment | world.referenced}
    shown = {e["resource"].split(":", 1)[1] for e in entries if e["outcome"] == "allowed"}
    assert refs <= shown
    assert all(e["actor"].startswith("clinician:") for e in entries)


def _second() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def test_type_since_and_post_parameters(live: LiveServer, world: World) -> None:
    pid = world.a.patient_id
    with live.client(live.clinician) as client:
        only = _pages(client, live, f"/fhir/Patient/{pid}/$everything", _type="Observation,Device")
        keys = set(_entries(only, "match")) | set(_entries(only, "include"))
        assert keys == {k for k in world.compartment if k[0] == "Observation"} | {
            ("Device", "ev-pump")
        }
        # Wait for the next second: everything written so far is before ``mark``.
        started, deadline = _second(), time.monotonic() + 5
        while _second() == started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        mark = _second() + ".000+00:00"
        changed = next(r for r in world.a.resources if r["resourceType"] == "Condition")
        assert put_json(client, f"/fhir/Condition/{changed['id']}", changed).status_code == 200
        later = _pages(client, live, f"/fhir/Patient/{pid}/$everything", _since=mark, _count="2")
        assert set(_entries(later, "match")) == {_key(changed)}
        # The '+' of the offset survives the next link (percent-encoded).
        link = later[0]["link"][0]["url"]
        assert parse_qs(urlsplit(link).query)["_since"] == [mark]
        params = {
            "resourceType": "Parameters",
            "parameter": [{"name": "_type", "valueCode": "Condition"}],
        }
        posted = post_json(client, f"/fhir/Patient/{pid}/$everything", params)
        assert posted.status_code == 200, posted.text
        conditions = {k for k in world.compartment if k[0] == "Condition"}
        assert {_key(e["resource"]) for e in posted.json()["entry"]} == conditions
        assert_outcome(
            client.get(f"/fhir/Patient/{pid}/$everything", params={"start": "2020"}), 400
        )
        assert_outcome(
            client.get(f"/fhir/Patient/{pid}/$everything", params={"_type": "Nope"}), 400
        )
        assert_outcome(client.get("/fhir/Patient/no-such/$everything"), 404)


def test_patient_tokens_get_their_own_records_only(live: LiveServer, world: World) -> None:
    pid = world.a.patient_id
    token = live.token("patient", patient=pid)
    with live.client(token) as client:
        bundles = _pages(client, live, f"/fhir/Patient/{pid}/$everything", _count="50")
        assert set(_entries(bundles, "match")) == world.about_a
        assert _entries(bundles, "include") == []
        before = len(live.access_entries())
        other = client.get(f"/fhir/Patient/{world.b.patient_id}/$everything")
        assert_outcome(other, 404)
    refused = [e for e in live.access_entries()[before:] if e["outcome"] == "refused"]
    assert [e["patient"] for e in refused] == [
        live.node.records.patient_pseudonym(world.b.patient_id)
    ]
    with live.client(live.auditor) as client:
        assert_outcome(client.get(f"/fhir/Patient/{pid}/$everything"), 403)


def test_capability_statement_declares_everything_and_export(live: LiveServer) -> None:
    with live.client() as anonymous:
        statement = anonymous.get("/fhir/metadata").json()
    (rest,) = statement["rest"]
    patient = next(r for r in rest["resource"] if r["type"] == "Patient")
    assert {
        "name": "everything",
        "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
    } in patient["operation"]
    bulk = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition"
    assert {"name": "export", "definition": f"{bulk}/patient-export"} in patient["operation"]
    group = next(r for r in rest["resource"] if r["type"] == "Group")
    assert {"name": "export", "definition": f"{bulk}/group-export"} in group["operation"]
    assert rest["operation"] == [{"name": "export", "definition": f"{bulk}/export"}]
    observation = next(r for r in rest["resource"] if r["type"] == "Observation")
    assert [o["name"] for o in observation["operation"]] == ["validate"]
