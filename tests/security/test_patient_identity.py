"""The patient-identity attacks of the security review (issue #14, items 1, 2 and 5).

Real ``medledger`` node processes on loopback (``network up``, solo ordering,
two institutions), attacked over HTTP with the tokens an insider holds, and
the real CLI for what patients and administrators do (``patient enroll |
rotate | rebind``, ``audit``; other steps talk HTTP or read the chains as
``audit`` does, to keep the test short):

1. a clinician writes patient A's key fingerprint onto patient B (PUT, POST,
   transaction Bundle) — refused, and another institution holding A's real
   consent still sees and gets only A's records; B's trail shows the attempt;
2. a clinician re-enrolls A to a key the clinician holds, or enrolls A's key
   onto B — refused; A's own consents keep working;
5. B's patient token reaching for A's record is refused, and A's trail says so;
   B's token reads only B's trail and consents.

Then the legitimate ways a binding changes: the patient rotates with the old
key's signature, an admin breaks glass — both named in the trails, the
break-glass on both chains, and ``verify`` still passes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.core.consent import PATIENT_KEY_SYSTEM
from medledger.node import open_chain, open_consortium_chain
from medledger.services.consent_fhir import consent_for_grant
from medledger.services.patients import PatientWallet
from medledger.services.trail import patient_trail
from medledger.storage.sqlite.tokens import SqliteTokenStore
from medledger.synthetic import generate_patients
from network_support import FHIR_JSON, run_cli, tls

pytestmark = pytest.mark.timeout(600)
WALLET_PW = "a patient's passphrase"
WALLET_ENV = {"MEDLEDGER_WALLET_PASSPHRASE": WALLET_PW}
HOUR_MS = 3_600_000


def _api(node: dict[str, Any], token: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    return httpx.Client(base_url=node["url"], headers=headers, timeout=60, verify=tls(node))


def _refused(response: httpx.Response, status: int, text: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert text in body["issue"][0]["diagnostics"], body


def _trail(base: Path, inst: str, fingerprint: str) -> list[dict[str, Any]]:
    """What ``medledger audit`` reports (it runs the same code over the same chains)."""
    _, private = open_chain(base / inst)
    _, consortium = open_consortium_chain(base / inst)
    try:
        return patient_trail([private, consortium], fingerprint)
    finally:
        private.close()
        consortium.close()


def test_patient_identity_attacks_against_real_nodes(network_dir: Path) -> None:
    base = network_dir
    up = run_cli(
        "network", "up", "--dir", base, "--institutions", "2", "--ordering", "solo", "--json"
    )
    nodes = {n["institution"]: n for n in up.json()["nodes"]}
    h1, h2 = nodes["hospital-1"], nodes["hospital-2"]
    clinician = _api(h1, h1["tokens"]["clinician"])
    reader = _api(h2, h2["tokens"]["clinician"])

    # Two patients' records at hospital-1; each patient enrolls a wallet by the CLI.
    alice, bob = generate_patients(2, seed=5, resources_per_patient=5)
    for person in (alice, bob):
        for resource in person.all_resources():
            r = clinician.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
            assert r.status_code == 201, r.text
    wallets: dict[str, Path] = {}
    fingerprints: dict[str, str] = {}
    for name in ("alice", "bob", "clinician", "alice-new", "alice-rescue"):
        wallets[name] = base / f"{name}.wallet"
        made = PatientWallet.create(wallets[name], WALLET_PW.encode())
        fingerprints[name] = made.fingerprint
    as_h1 = ["--node", h1["url"], "--node-cert", h1["tls_cert"]]
    as_h1 += ["--token", h1["tokens"]["clinician"]]
    enrolled = run_cli(
        "patient",
        "enroll",
        "--wallet",
        wallets["alice"],
        *as_h1,
        "--patient-id",
        alice.patient_id,
        env=WALLET_ENV,
    ).json()
    assert enrolled["fingerprint"] == fingerprints["alice"]

    def enroll(name: str, patient_id: str) -> httpx.Response:
        """What ``patient enroll`` sends, from here (the CLI path is taken once above)."""
        wallet = PatientWallet.open(wallets[name], WALLET_PW.encode())
        where = clinician.get(f"/fhir/Patient/{patient_id}/$enrollment").json()
        signature = wallet.enrollment_signature(where["institution"], where["pseudonym"])
        body = {"patient_key": wallet.public.der().hex(), "signature": signature.to_json()}
        return clinician.post(f"/fhir/Patient/{patient_id}/$enroll", json=body)

    assert enroll("bob", bob.patient_id).json()["fingerprint"] == fingerprints["bob"]
    a_fp, b_fp = fingerprints["alice"], fingerprints["bob"]

    # -- finding 1: A's fingerprint written onto B, every way FHIR allows -----------------
    bob_patient = clinician.get(f"/fhir/Patient/{bob.patient_id}").json()
    forged = {**bob_patient, "identifier": [{"system": PATIENT_KEY_SYSTEM, "value": a_fp}]}
    _refused(clinician.put(f"/fhir/Patient/{bob.patient_id}", json=forged), 400, "reserved")
    fresh = {k: v for k, v in forged.items() if k not in ("id", "meta")}
    _refused(clinician.post("/fhir/Patient", json=fresh), 400, "reserved")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "PUT", "url": f"Patient/{bob.patient_id}"}, "resource": forged}
        ],
    }
    _refused(clinician.post("/fhir", json=bundle), 400, "reserved")
    assert clinician.get(f"/fhir/Patient/{bob.patient_id}").json() == bob_patient
    # ... and A's key cannot be enrolled onto B either (duplicate fingerprint).
    _refused(enroll("alice", bob.patient_id), 409, "another patient")

    # -- finding 2: the clinician re-enrolls A to the clinician's own key -----------------
    _refused(enroll("clinician", alice.patient_id), 409, "already enrolled")
    where = clinician.get(f"/fhir/Patient/{alice.patient_id}/$enrollment").json()
    assert where["fingerprint"] == a_fp
    clinician_wallet = PatientWallet.open(wallets["clinician"], WALLET_PW.encode())
    ready = httpx.get(h1["url"] + "/readyz", timeout=10, verify=tls(h1)).json()
    consortium = str(ready["consortium"])

    def grant(wallet: PatientWallet, grantee: str = "hospital-2") -> dict[str, Any]:
        now = _now_ms()
        tx = wallet.grant(
            chain=consortium,
            grantee=grantee,
            scope=["*"],
            purpose="TREAT",
            expires_ms=now + HOUR_MS,
            time_ms=now,
        )
        return consent_for_grant(tx)

    # A consent signed by the clinician's key is final (anyone may sign one) but names
    # no patient of hospital-1: it authorizes nothing there.
    fake = clinician.post("/fhir/Consent", json=grant(clinician_wallet))
    assert fake.status_code == 201, fake.text
    alice_obs = next(r for r in alice.resources if r["resourceType"] == "Observation")
    bob_obs = next(r for r in bob.resources if r["resourceType"] == "Observation")
    got = reader.get(
        f"/share/hospital-1/Observation/{alice_obs['id']}", params={"consent": fake.json()["id"]}
    )
    _refused(got, 403, "not enrolled")

    # A's own consent, submitted with A's patient token, still works: for A's records only.
    alice_token = _patient_token(base, alice.patient_id)
    with _api(h1, alice_token) as alice_api:
        real = alice_api.post(
            "/fhir/Consent", json=grant(PatientWallet.open(wallets["alice"], WALLET_PW.encode()))
        )
    assert real.status_code == 201, real.text
    consent = real.json()["id"]
    listed = reader.get("/share/hospital-1", params={"consent": consent})
    assert listed.status_code == 200, listed.text
    assert f"Observation/{alice_obs['id']}" in listed.json()["entries"]
    assert not any(bob_id in json.dumps(listed.json()) for bob_id in _ids(bob))
    ok = reader.get(f"/share/hospital-1/Observation/{alice_obs['id']}", params={"consent": consent})
    assert ok.status_code == 200, ok.text
    stolen = reader.get(
        f"/share/hospital-1/Observation/{bob_obs['id']}", params={"consent": consent}
    )
    _refused(stolen, 403, "not the subject")

    # -- finding 5: B's patient token reaches for A's record --------------------------------
    bob_token = _patient_token(base, bob.patient_id)
    with _api(h1, bob_token) as bob_api:
        _refused(bob_api.get(f"/fhir/Observation/{alice_obs['id']}"), 404)
        # B's token resolves to B's key only: B's trail and consents, never A's.
        mine = bob_api.get("/fhir/AuditEvent", params={"patient": a_fp}).json()
        assert mine["total"] >= 1
        assert all(a_fp not in json.dumps(e) for e in mine["entry"])
        assert bob_api.get("/fhir/Consent", params={"patient": a_fp}).json()["total"] == 0
        assert bob_api.get(f"/fhir/Consent/{consent}").status_code == 404

    alice_trail = _trail(base, "hospital-1", a_fp)
    refused_for_alice = [
        t for t in alice_trail if t["type"] == "access" and t.get("outcome") == "refused"
    ]
    assert any(t.get("actor", "").startswith("patient:") for t in refused_for_alice), alice_trail
    bob_trail = _trail(base, "hospital-1", b_fp)
    assert any(
        t["type"] == "access" and t.get("reader") == "hospital-2" and t["outcome"] == "refused"
        for t in bob_trail
    ), bob_trail
    assert [t["event"] for t in bob_trail if "event" in t] == ["enrollment"]

    # -- legitimate re-binding 1: A rotates with the old key's signature ------------------
    rotated = run_cli(
        "patient",
        "rotate",
        "--wallet",
        wallets["alice"],
        "--new-wallet",
        wallets["alice-new"],
        *as_h1,
        "--patient-id",
        alice.patient_id,
        env=WALLET_ENV | {"MEDLEDGER_NEW_WALLET_PASSPHRASE": WALLET_PW},
    ).json()
    assert rotated["fingerprint"] == fingerprints["alice-new"]
    # Consents signed by the retired key no longer reach A's records.
    gone = reader.get(
        f"/share/hospital-1/Observation/{alice_obs['id']}", params={"consent": consent}
    )
    _refused(gone, 403, "not enrolled")

    # -- legitimate re-binding 2: break-glass, admin token only ----------------------------
    rescue = ["patient", "rebind", "--wallet", wallets["alice-rescue"], "--node", h1["url"]]
    rescue += ["--node-cert", h1["tls_cert"]]
    rescue += ["--patient-id", alice.patient_id]
    rescue_key = PatientWallet.open(wallets["alice-rescue"], WALLET_PW.encode())
    statement = {
        "patient_key": rescue_key.public.der().hex(),
        "signature": rescue_key.enrollment_signature("hospital-1", where["pseudonym"]).to_json(),
    }
    denied = clinician.post(f"/admin/patients/{alice.patient_id}/rebind", json=statement)
    _refused(denied, 403, "role")
    rebound = run_cli(*rescue, "--token", h1["tokens"]["admin"], env=WALLET_ENV).json()
    assert rebound["patient"] == fingerprints["alice-rescue"]
    assert rebound["previous"] == fingerprints["alice-new"]

    audited = run_cli(
        "audit", "--dir", base / "hospital-1", "--patient", fingerprints["alice-new"]
    ).json()
    new_trail = audited["trail"]
    assert new_trail == _trail(base, "hospital-1", fingerprints["alice-new"])
    events = [(t["event"], t["chain"].split(":")[0]) for t in new_trail if "event" in t]
    assert events[0] == ("key rotation", "private")
    assert ("break-glass re-binding", "private") in events
    assert ("break-glass re-binding", "consortium") in events
    glass = next(t for t in new_trail if t.get("event") == "break-glass re-binding")
    assert glass["actor"].startswith("admin:") and glass["patient"] == fingerprints["alice-rescue"]
    # The rescued key sees A's whole history, reads and re-bindings included.
    rescued = _trail(base, "hospital-1", fingerprints["alice-rescue"])
    assert any(t["type"] == "access" for t in rescued)
    assert ("break-glass re-binding", "consortium") in [
        (t["event"], t["chain"].split(":")[0]) for t in rescued if "event" in t
    ]
    # The other member saw the announcement on its own copy of the consortium chain.
    deadline = time.monotonic() + 30
    while True:
        at_h2 = _trail(base, "hospital-2", fingerprints["alice-rescue"])
        announced = [t.get("event") for t in at_h2 if t["chain"].startswith("consortium")]
        if announced or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert announced == ["break-glass re-binding"]
    for trail in (alice_trail, bob_trail, new_trail, rescued):
        assert alice.patient_id not in json.dumps(trail) and bob.patient_id not in json.dumps(trail)
    # A's patient token now speaks for the rescued key, and its FHIR trail names the break-glass.
    with _api(h1, alice_token) as alice_api:
        events = alice_api.get("/fhir/AuditEvent").json()
    glass_events = [
        e["resource"]
        for e in events["entry"]
        if e["resource"]["subtype"][0]["code"] == "break-glass re-binding"
    ]
    assert len(glass_events) == 2  # the consortium's announcement and the private tx
    assert all(e["purposeOfEvent"][0]["coding"][0]["code"] == "BTG" for e in glass_events)

    clinician.close()
    reader.close()
    assert run_cli("network", "down", "--dir", base).code == 0
    # Every chain still verifies, the break-glass report under the consortium's rules too.
    check = run_cli("verify", "--dir", base / "hospital-1", "--consortium")
    assert check.code == 0, check


def _patient_token(base: Path, patient_id: str) -> str:
    """A patient token issued by hospital-1 (its token store, as ``token create`` uses it)."""
    store = SqliteTokenStore(base / "hospital-1" / "tokens.db")
    try:
        text, _ = store.create(role="patient", patient=patient_id, now_ms=_now_ms())
    finally:
        store.close()
    return text


def _ids(person: Any) -> list[str]:
    return [str(r["id"]) for r in person.all_resources()]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
