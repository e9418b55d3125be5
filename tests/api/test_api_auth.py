"""Authentication and authorization of every HTTP endpoint.

Every route but the public ones refuses missing, malformed, unknown, expired and
revoked tokens with 401 + ``WWW-Authenticate: Bearer``; roles limit what a valid
token may do (403): auditors see chains but no clinical data, patients see only
their own records and write nothing, clinicians and admins do clinical work.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from api_helpers import (
    FHIR_JSON,
    LiveServer,
    assert_outcome,
    fhir_bytes,
    now_ms,
    seed_patients,
    start_server,
    stop_server,
)

from medledger.api.deps import install_services, services_of
from medledger.core.errors import InvalidInput
from medledger.core.models import Transaction
from medledger.node import open_chain
from medledger.services.ratelimit import RateLimit
from medledger.synthetic import PatientBundle

PUBLIC = {
    "/fhir/metadata",
    "/healthz",
    "/readyz",
    "/docs",
    "/openapi.json",
    "/metrics",
    "/.well-known/smart-configuration",
}
#: Member-to-member endpoints: no bearer token, every request is signed by a member key
#: (tests/services/test_sharing.py covers their refusals).
SIGNED = {"/peer/v1/{op}"}


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str
    path: str
    body: bytes | None

    def send(self, client: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
        all_headers = {"Content-Type": FHIR_JSON, **(headers or {})}
        return client.request(self.method, self.path, content=self.body, headers=all_headers)

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """This module sends every bad token to every endpoint from one address: hundreds
    of failures that must each get their 401, so the failure budget is out of the way
    here (tests/api/test_throttling.py covers it)."""
    generous = RateLimit(burst=100_000, interval_ms=1)
    server = start_server(tmp_path_factory.mktemp("api") / "node", auth_failures=generous)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def people(live: LiveServer) -> list[PatientBundle]:
    return seed_patients(live, 2, per_patient=20)


@pytest.fixture(scope="module")
def endpoints(live: LiveServer, people: list[PatientBundle]) -> list[Endpoint]:
    """Every API route of the app, with concrete values for its path parameters."""
    a = people[0]
    values = {
        "resource_type": "Patient",
        "rid": a.patient_id,
        "vid": "1",
        "which": "private",
        "height": "0",
        "cid": "00" * 32,
        "holder": "elsewhere",
        "gid": "no-such-group",
        "job_id": "0" * 32,
        "name": "Patient.ndjson",
    }
    query = {
        "/chain/{which}/proof/consistency": "?old=1",
        "/chain/{which}/proof/inclusion": "?index=0",
    }
    with live.client() as client:
        document = client.get("/openapi.json").json()
    out = []
    for template, operations in document["paths"].items():
        if template in PUBLIC | SIGNED:
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)
        path += query.get(template, "")
        for method in sorted(m.upper() for m in operations):
            body = None
            if method in ("POST", "PUT") and template != "/chain/verify":  # takes no body
                body = fhir_bytes(a.patient if template != "/fhir" else {"resourceType": "Bundle"})
            out.append(Endpoint(method, template, path, body))
    return out


def test_the_route_table_is_what_we_expect(endpoints: list[Endpoint]) -> None:
    names = {str(e) for e in endpoints}
    assert {
        "POST /fhir",
        "POST /fhir/{resource_type}",
        "GET /fhir/{resource_type}",
        "GET /fhir/{resource_type}/_history",
        "GET /fhir/{resource_type}/{rid}",
        "PUT /fhir/{resource_type}/{rid}",
        "DELETE /fhir/{resource_type}/{rid}",
        "GET /fhir/{resource_type}/{rid}/_history",
        "GET /fhir/{resource_type}/{rid}/_history/{vid}",
        "GET /chain/{which}/head",
        "GET /chain/{which}/blocks/{height}",
        "GET /chain/{which}/proof/inclusion",
        "GET /chain/{which}/proof/consistency",
        "GET /chain/consortium/status",
        "POST /fhir/Consent",
        "GET /fhir/Consent",
        "GET /fhir/Consent/{cid}",
        "PUT /fhir/Consent/{cid}",
        "GET /fhir/AuditEvent",
        "POST /fhir/Patient/{rid}/$enroll",
        "GET /fhir/Patient/{rid}/$enrollment",
        "POST /fhir/Patient/{rid}/$rotate-key",
        "POST /admin/patients/{rid}/rebind",
        "GET /share/{holder}",
        "GET /share/{holder}/{resource_type}/{rid}",
    } <= names


@pytest.fixture(scope="module")
def bad_tokens(live: LiveServer) -> dict[str, dict[str, str]]:
    """Authorization headers that must all be refused with 401."""
    expired, _ = live.tokens.create(
        role="clinician", now_ms=now_ms() - 7_200_000, ttl_ms=3_600_000, label="expired"
    )
    revoked, info = live.tokens.create(role="clinician", now_ms=now_ms(), label="revoked")
    live.tokens.revoke(info.id)
    real_id = live.clinician.split("_")[1]
    return {
        "missing": {},
        "basic-scheme": {"Authorization": "Basic Y2xpbmljaWFuOnB3"},
        "empty-parts": {"Authorization": "Bearer mlt__"},
        "bearer-only": {"Authorization": "Bearer"},
        "token-without-scheme": {"Authorization": live.clinician},
        "malformed": {"Authorization": "Bearer not-a-medledger-token"},
        "unknown": {"Authorization": f"Bearer mlt_000000000000_{secrets.token_urlsafe(32)}"},
        "wrong-secret": {"Authorization": f"Bearer mlt_{real_id}_{secrets.token_urlsafe(32)}"},
        "expired": {"Authorization": f"Bearer {expired}"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
    }


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "basic-scheme",
        "empty-parts",
        "bearer-only",
        "token-without-scheme",
        "malformed",
        "unknown",
        "wrong-secret",
        "expired",
        "revoked",
    ],
)
def test_every_endpoint_refuses_bad_tokens(
    live: LiveServer, endpoints: list[Endpoint], bad_tokens: dict[str, dict[str, str]], kind: str
) -> None:
    before = live.log_size()
    with live.client() as client:
        for endpoint in endpoints:
            r = endpoint.send(client, bad_tokens[kind])
            assert r.status_code == 401, f"{endpoint} with {kind} token: {r.status_code} {r.text}"
            assert_outcome(r, 401, code="login")
            assert r.headers.get("www-authenticate", "").startswith("Bearer"), endpoint
    assert live.log_size() == before


def test_public_endpoints_need_no_token(live: LiveServer) -> None:
    with live.client() as client:
        for path in sorted(PUBLIC):
            r = client.get(path)
            assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:200]}"


class _HandClock:
    """A clock the test moves: the server's token checks read it."""

    def __init__(self, now: int) -> None:
        self.now = now

    def now_ms(self) -> int:
        return self.now


def test_a_token_stops_working_when_its_ttl_passes(live: LiveServer) -> None:
    # The server's clock is moved by hand, not waited for: with real time, a
    # loaded machine could let the TTL pass before the first request was served.
    clock = _HandClock(now_ms())
    served = services_of(live.app)
    install_services(live.app, dataclasses.replace(served, clock=clock))
    try:
        token, _ = live.tokens.create(role="clinician", now_ms=clock.now, ttl_ms=700, label="ttl")
        with live.client(token) as client:
            clock.now += 699  # the last millisecond of its life
            assert client.get("/fhir/Patient", params={"_count": 1}).status_code == 200
            clock.now += 1
            r = client.get("/fhir/Patient", params={"_count": 1})
            assert_outcome(r, 401)
            assert "expired" in r.text
            assert r.headers["www-authenticate"].startswith("Bearer")
    finally:
        install_services(live.app, served)


def test_a_revoked_token_stops_working_at_once(live: LiveServer) -> None:
    text, info = live.tokens.create(role="clinician", now_ms=now_ms(), label="to revoke")
    with live.client(text) as client:
        assert client.get("/chain/private/head").status_code == 200
        live.tokens.revoke(info.id)
        assert_outcome(client.get("/chain/private/head"), 401)
        assert_outcome(client.get("/fhir/Patient"), 401)


# -- roles -------------------------------------------------------------------------------


def test_auditor_gets_no_clinical_data_and_cannot_write(
    live: LiveServer, endpoints: list[Endpoint]
) -> None:
    before = live.log_size()
    with live.client(live.auditor) as auditor:
        for endpoint in endpoints:
            if endpoint.method == "GET" and endpoint.template.startswith(
                ("/fhir/Consent", "/fhir/AuditEvent")
            ):
                # Auditors read consents and trails, which live on the consortium
                # chain; this node has joined none.
                r = endpoint.send(auditor)
                assert r.status_code in (400, 404), f"auditor {endpoint}: {r.status_code}"
            elif endpoint.template.startswith(("/fhir", "/share")):
                r = endpoint.send(auditor)
                assert r.status_code == 403, f"auditor {endpoint}: {r.status_code} {r.text[:200]}"
                assert_outcome(r, 403, code="forbidden")
    assert live.log_size() == before


def test_auditor_and_clinician_can_use_the_chain_endpoints(
    live: LiveServer, endpoints: list[Endpoint]
) -> None:
    for token in (live.auditor, live.clinician, live.admin):
        with live.client(token) as client:
            for endpoint in endpoints:
                if endpoint.template == "/chain/consortium/status":
                    # This node has joined no consortium.
                    assert_outcome(endpoint.send(client), 404)
                elif endpoint.template.startswith("/chain"):
                    r = endpoint.send(client)
                    assert r.status_code == 200, f"{endpoint}: {r.status_code} {r.text[:200]}"
                    if r.headers["content-type"].startswith("application/x-ndjson"):
                        # The export answers one block per line.
                        lines = r.text.splitlines()
                        assert lines and all(json.loads(line) for line in lines)
                    else:
                        assert r.json()


def test_clinician_and_admin_do_clinical_work(
    live: LiveServer, people: list[PatientBundle]
) -> None:
    p = people[1]
    obs = next(r for r in p.resources if r["resourceType"] == "Observation")
    for token in (live.clinician, live.admin):
        with live.client(token) as client:
            assert client.get(f"/fhir/Patient/{p.patient_id}").status_code == 200
            assert client.get(f"/fhir/Observation/{obs['id']}").status_code == 200
            search = client.get("/fhir/Observation", params={"patient": p.patient_id})
            assert search.status_code == 200
            assert search.json()["total"] > 0
            r = client.post(
                "/fhir/Observation",
                content=fhir_bytes({k: v for k, v in obs.items() if k != "id"}),
                headers={"Content-Type": FHIR_JSON},
            )
            assert r.status_code == 201, r.text


def _about(resource: dict[str, Any]) -> str | None:
    if resource["resourceType"] == "Patient":
        return f"Patient/{resource['id']}"
    ref = resource.get("subject") or resource.get("patient") or {}
    value = ref.get("reference")
    return value if isinstance(value, str) else None


def test_patient_token_reads_only_its_own_records(
    live: LiveServer, people: list[PatientBundle]
) -> None:
    me, other = people
    token = live.token("patient", patient=me.patient_id, label="patient A")
    mine = next(r for r in me.resources if r["resourceType"] == "Observation")
    theirs = next(r for r in other.resources if r["resourceType"] == "Observation")
    with live.client(token) as client:
        assert client.get(f"/fhir/Patient/{me.patient_id}").status_code == 200
        assert client.get(f"/fhir/Observation/{mine['id']}").status_code == 200
        assert client.get(f"/fhir/Observation/{mine['id']}/_history/1").status_code == 200
        assert client.get(f"/fhir/Observation/{mine['id']}/_history").status_code == 200

        for path in (
            f"/fhir/Patient/{other.patient_id}",
            f"/fhir/Patient/{other.patient_id}/_history/1",
            f"/fhir/Patient/{other.patient_id}/_history",
            f"/fhir/Observation/{theirs['id']}",
            f"/fhir/Observation/{theirs['id']}/_history/1",
            f"/fhir/Observation/{theirs['id']}/_history",
        ):
            r = client.get(path)
            assert_outcome(r, (403, 404))
            assert other.patient_id not in r.text
            assert theirs["id"] not in r.text or r.status_code == 404


@pytest.mark.parametrize("rtype", ["Observation", "Condition", "MedicationRequest", "Encounter"])
def test_patient_token_search_returns_only_its_own_records(
    live: LiveServer, people: list[PatientBundle], rtype: str
) -> None:
    me, other = people
    token = live.token("patient", patient=me.patient_id)
    expected = {r["id"] for r in me.resources if r["resourceType"] == rtype}
    theirs = {r["id"] for r in other.resources if r["resourceType"] == rtype}
    with live.client(token) as client:
        for params in (
            {"_count": "500"},
            {"patient": f"Patient/{other.patient_id}", "_count": "500"},
            {"patient": f"Patient/{other.patient_id},Patient/{me.patient_id}", "_count": "500"},
        ):
            r = client.get(f"/fhir/{rtype}", params=params)
            if r.status_code != 200:
                assert_outcome(r, (400, 403))
                continue
            found = [e["resource"] for e in r.json().get("entry", [])]
            assert all(_about(f) == f"Patient/{me.patient_id}" for f in found), params
            assert not {f["id"] for f in found} & theirs, params
            assert {f["id"] for f in found} <= expected
        everything = client.get(f"/fhir/{rtype}", params={"_count": "500"}).json()
        assert {e["resource"]["id"] for e in everything.get("entry", [])} == expected
        assert everything["total"] == len(expected)


def test_patient_token_search_for_patients_finds_only_itself(
    live: LiveServer, people: list[PatientBundle]
) -> None:
    me, other = people
    token = live.token("patient", patient=me.patient_id)
    with live.client(token) as client:
        r = client.get("/fhir/Patient")
        assert r.status_code == 200, r.text
        assert [e["resource"]["id"] for e in r.json()["entry"]] == [me.patient_id]
        family = other.patient["name"][0]["family"]
        r = client.get("/fhir/Patient", params={"family": family})
        if r.status_code == 200:
            assert other.patient_id not in r.text
        else:
            assert_outcome(r, (400, 403))


def test_patient_token_cannot_write_or_see_chains(
    live: LiveServer, people: list[PatientBundle], endpoints: list[Endpoint]
) -> None:
    me = people[0]
    token = live.token("patient", patient=me.patient_id)
    before = live.log_size()
    with live.client(token) as client:
        for endpoint in endpoints:
            if (
                endpoint.template.startswith("/fhir/Consent")
                or endpoint.template.endswith("$rotate-key")
                or endpoint.template.endswith(("/_search", "/$everything"))
                or endpoint.template in ("/fhir/Patient/$export", "/fhir/$export-status/{job_id}")
                or endpoint.template.endswith("$enroll")
            ):
                # A patient submits its own signed consent (test_sharing_api.py), enrolls
                # its own first key (test_sharing_api.py) and
                # rotates its own key with that key's signature (test_patient_identity.py);
                # POST _search is a search, narrowed to the patient (test_fhir_search_api.py),
                # and POST $everything a read of its own records (test_fhir_everything.py), as
                # POST Patient/$export is an export of them and DELETE of its status URL the
                # cancelling of its own export (test_bulk_export.py).
                continue
            if endpoint.method in ("POST", "PUT", "DELETE") or endpoint.template.startswith(
                ("/chain", "/fhir/{resource_type}/_history", "/share")
            ):
                r = endpoint.send(client)
                assert r.status_code == 403, f"patient {endpoint}: {r.status_code} {r.text[:200]}"
                assert_outcome(r, 403, code="forbidden")
        # Even writing about itself is refused.
        own = {**me.patient, "gender": "unknown"}
        r = client.put(
            f"/fhir/Patient/{me.patient_id}",
            content=fhir_bytes(own),
            headers={"Content-Type": FHIR_JSON},
        )
        assert_outcome(r, 403)
    assert live.log_size() == before
    with live.client(live.clinician) as clinician:
        assert (
            clinician.get(f"/fhir/Patient/{me.patient_id}").json()["gender"] == me.patient["gender"]
        )


def test_patient_token_cannot_tell_others_records_from_absent_ones(
    live: LiveServer, people: list[PatientBundle]
) -> None:
    """A patient learns nothing about other patients' records, not even that they exist
    (or were erased): the answer is the one for an id that was never used."""
    me, other = people
    theirs = [r for r in other.resources if r["resourceType"] == "Condition"]
    erased = theirs[0]
    with live.client(live.clinician) as clinician:
        assert clinician.delete(f"/fhir/Condition/{erased['id']}").status_code == 204
    token = live.token("patient", patient=me.patient_id)
    never = "00000000-0000-4000-8000-000000000000"
    with live.client(token) as client:
        for suffix in ("", "/_history", "/_history/1"):
            absent = client.get(f"/fhir/Condition/{never}{suffix}")
            assert_outcome(absent, 404)
            for rid in (theirs[1]["id"], erased["id"]):
                r = client.get(f"/fhir/Condition/{rid}{suffix}")
                assert (r.status_code, r.json()["resourceType"]) == (404, "OperationOutcome"), (
                    f"patient token on another patient's Condition{suffix}: "
                    f"{r.status_code} {r.text[:300]}"
                )
                assert rid not in r.text


def test_a_patient_tokens_url_text_never_reaches_the_chain(
    live: LiveServer, people: list[PatientBundle]
) -> None:
    """A refused read is audited with the URL's resource type: only a real FHIR type may be
    written; a word shaped like one ("JaneRoeHasCarcinoma") is refused and writes nothing."""
    me = people[0]
    token = live.token("patient", patient=me.patient_id)
    never = "00000000-0000-4000-8000-0000000000ee"
    with live.client(token) as client:
        before = live.log_size()
        assert_outcome(client.get(f"/fhir/Observation/{never}"), 404)
        assert live.log_size() == before + 1  # a refused access entry, as before
        for suffix in ("", "/_history", "/_history/1"):
            before = live.log_size()
            assert_outcome(client.get(f"/fhir/JaneRoeHasCarcinoma/{never}{suffix}"), (400, 404))
            assert live.log_size() == before, suffix
    _, store = open_chain(live.root)
    try:
        txs = [Transaction.decode(d).to_json() for b in store.iter_blocks(1) for d in b.tx_data]
    finally:
        store.close()
    assert "JaneRoe" not in json.dumps(txs)


def test_another_patients_record_and_a_missing_id_take_the_same_path(
    live: LiveServer, people: list[PatientBundle]
) -> None:
    """Issue #14 item 12: the answer's time told a patient whether someone else's record
    existed (it was decrypted, compared and audited; a missing id was not). Both now take
    the same steps: nothing decrypted, one refused ``access`` entry, the same 404 bytes."""
    me, other = people
    theirs = next(r for r in other.resources if r["resourceType"] == "Observation")
    never = "00000000-0000-4000-8000-0000000000ff"
    token = live.token("patient", patient=me.patient_id)
    reader, access = live.node.records.reader, live.node.access
    open_row, record, record_many = reader.open, access.record, access.record_many
    steps: list[tuple[str, str]] = []

    def spying_open(row: Any, **kwargs: Any) -> Any:
        steps.append(("decrypt", row.id))
        return open_row(row, **kwargs)

    async def spying_record(entry: Any, **kwargs: Any) -> None:
        steps.append(("audit", entry.outcome))
        await record(entry, **kwargs)

    async def spying_record_many(entries: Any, **kwargs: Any) -> Any:
        steps.extend(("audit", entry.outcome) for entry in entries)
        return await record_many(entries, **kwargs)

    reader.open = spying_open  # type: ignore[method-assign]
    access.record = spying_record  # type: ignore[method-assign]
    access.record_many = spying_record_many  # type: ignore[method-assign]
    try:
        seen: dict[tuple[str, str], tuple[int, bytes, list[tuple[str, str]]]] = {}
        with live.client(token) as client:
            for label, rid in (("theirs", theirs["id"]), ("never", never)):
                for suffix in ("", "/_history", "/_history/1"):
                    steps.clear()
                    r = client.get(f"/fhir/Observation/{rid}{suffix}")
                    seen[label, suffix] = (r.status_code, r.content, list(steps))
            steps.clear()
            mine = next(r for r in me.resources if r["resourceType"] == "Observation")
            assert client.get(f"/fhir/Observation/{mine['id']}").status_code == 200
            assert steps == [("decrypt", mine["id"]), ("audit", "allowed")]
    finally:
        del reader.open, access.record, access.record_many
    for suffix in ("", "/_history", "/_history/1"):
        status, body, taken = seen["theirs", suffix]
        assert (status, taken) == (404, [("audit", "refused")]), suffix
        assert seen["never", suffix] == (status, body, taken), suffix


def test_patient_token_bound_to_a_list_of_ids_sees_no_one_else(
    live: LiveServer, people: list[PatientBundle]
) -> None:
    """A token's patient is one id: ``a,b`` (FHIR search OR) must not widen what it sees.
    Either such a token cannot be issued, or it matches no one."""
    me, other = people
    try:
        token, _ = live.tokens.create(
            role="patient", patient=f"{me.patient_id},{other.patient_id}", now_ms=now_ms()
        )
    except InvalidInput:
        return
    with live.client(token) as client:
        r = client.get("/fhir/Observation", params={"_count": "500"})
        if r.status_code == 200:
            seen = {_about(e["resource"]) for e in r.json().get("entry", [])}
            assert f"Patient/{other.patient_id}" not in seen, (
                f"a token bound to 'A,B' reads patient B's records ({r.json()['total']} results)"
            )
        else:
            assert_outcome(r, (400, 403))
