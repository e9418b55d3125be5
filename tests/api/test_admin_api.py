"""``POST /admin/keys/rotate``: only an admin rotates the KEK of a serving node, and every
record still reads afterwards; the rotation is on the private chain, which still verifies."""

from __future__ import annotations

import httpx
import pytest
from api_helpers import LiveServer, assert_outcome, seed_patients

from medledger.core.models import Transaction
from medledger.node import open_chain
from medledger.synthetic import PatientBundle

ROTATE = "/admin/keys/rotate"


@pytest.fixture(scope="module")
def people(live: LiveServer) -> list[PatientBundle]:
    return seed_patients(live, 2, per_patient=8)


def _rotations(live: LiveServer) -> list[dict[str, object]]:
    _, store = open_chain(live.root)
    try:
        txs = [Transaction.decode(d) for b in store.iter_blocks(1) for d in b.tx_data]
    finally:
        store.close()
    return [dict(t.body) for t in txs if t.type == "key.rotate"]


def _read_all(client: httpx.Client, people: list[PatientBundle]) -> dict[str, object]:
    out = {}
    for p in people:
        for resource in p.all_resources():
            path = f"/fhir/{resource['resourceType']}/{resource['id']}"
            r = client.get(path)
            assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:200]}"
            out[path] = r.json()
    return out


def test_only_an_admin_may_rotate(live: LiveServer, people: list[PatientBundle]) -> None:
    before = live.log_size()
    with live.client() as anonymous:
        assert_outcome(anonymous.post(ROTATE), 401, code="login")
    patient = live.token("patient", patient=people[0].patient_id)
    for token in (live.clinician, live.auditor, patient):
        with live.client(token) as client:
            assert_outcome(client.post(ROTATE), 403, code="forbidden")
    with live.client(live.admin) as admin:
        assert admin.get(ROTATE).status_code == 405
    assert live.log_size() == before
    assert _rotations(live) == []


def test_admin_rotates_and_everything_still_reads(
    live: LiveServer, people: list[PatientBundle]
) -> None:
    with live.client(live.clinician) as clinician:
        before = _read_all(clinician, people)
    versions = sum(len(p.all_resources()) for p in people)
    with live.client(live.admin) as admin:
        first = admin.post(ROTATE)
        assert first.status_code == 200, first.text
        summary = first.json()
        assert summary["old"] != summary["new"]
        assert summary["rewrapped"] >= versions
        second = admin.post(ROTATE).json()
    assert second["old"] == summary["new"] and second["rewrapped"] == summary["rewrapped"]
    assert _rotations(live) == [
        {"purpose": "kek", **summary},
        {"purpose": "kek", **second},
    ]
    with live.client(live.clinician) as clinician:
        assert _read_all(clinician, people) == before
    report = live.verify()
    assert report.log_size == live.log_size()
