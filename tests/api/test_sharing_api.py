"""Consent, sharing and the access trail through the HTTP API, with its roles.

An in-process consortium of three nodes, each served by uvicorn on loopback
(tests/sharing_support.py); every call here is real HTTP with bearer tokens.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.core.encoding import canonical_bytes
from medledger.core.hashing import sha256
from medledger.core.keys import SigningKey
from medledger.services.consent_fhir import consent_for_grant, revocation_for
from medledger.services.patients import PatientWallet
from sharing_support import SharingNet, now_ms, sharing_network

pytestmark = pytest.mark.timeout(240)
FHIR_JSON = "application/fhir+json"


def run(base: Path, story: Callable[[SharingNet], Awaitable[None]]) -> None:
    async def main() -> None:
        async with sharing_network(base, ["Alpha", "Beta", "Gamma"]) as sn:
            await story(sn)

    asyncio.run(main())


def client(sn: SharingNet, inst: str, token: str) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    return httpx.AsyncClient(
        base_url=sn.urls[inst], headers=headers, timeout=30, verify=sn.tls(inst)
    )


def outcome(r: httpx.Response, status: int, text: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert text in body["issue"][0]["diagnostics"], body


def grant_resource(sn: SharingNet, wallet: PatientWallet, grantee: str = "beta") -> dict[str, Any]:
    tx = wallet.grant(
        chain=sn.chain_id,
        grantee=grantee,
        scope=["*"],
        purpose="TREAT",
        expires_ms=now_ms() + 3_600_000,
        time_ms=now_ms(),
    )
    return consent_for_grant(tx)


def test_enrollment_needs_the_patients_signature(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        wallet = PatientWallet.create(sn.net.base / "w2", b"another patient passphrase")
        body = {
            "patient_key": wallet.public.der().hex(),
            "signature": SigningKey.generate().sign(b"not the statement").to_json(),
        }
        async with client(sn, "alpha", sn.token("alpha", "clinician")) as api:
            created = await api.post(
                "/fhir/Patient", json={"resourceType": "Patient", "gender": "unknown"}
            )
            pid = created.json()["id"]
            where = (await api.get(f"/fhir/Patient/{pid}/$enrollment")).json()
            assert where["institution"] == "alpha" and where["fingerprint"] is None
            outcome(await api.post(f"/fhir/Patient/{pid}/$enroll", json=body), 403)
            outcome(
                await api.post(f"/fhir/Patient/{pid}/$enroll", json={"patient_key": "zz"}),
                400,
            )
            # A statement signed for another institution does not enroll here.
            body["signature"] = wallet.enrollment_signature("beta", where["pseudonym"]).to_json()
            outcome(await api.post(f"/fhir/Patient/{pid}/$enroll", json=body), 403)
            body["signature"] = wallet.enrollment_signature("alpha", where["pseudonym"]).to_json()
            ok = await api.post(f"/fhir/Patient/{pid}/$enroll", json=body)
            assert ok.status_code == 200 and ok.json()["fingerprint"] == wallet.fingerprint
            again = await api.post(f"/fhir/Patient/{pid}/$enroll", json=body)
            assert again.status_code == 200 and again.json()["fingerprint"] == wallet.fingerprint
            after = (await api.get(f"/fhir/Patient/{pid}/$enrollment")).json()
            assert after["fingerprint"] == wallet.fingerprint
            assert after["bound_by"] == "patient.enroll"
            fresh = await api.post(
                "/fhir/Patient", json={"resourceType": "Patient", "gender": "unknown"}
            )
            fresh_id = fresh.json()["id"]
            fresh_where = (await api.get(f"/fhir/Patient/{fresh_id}/$enrollment")).json()
        # A patient token (the portal) may enroll its own Patient's first key, signed by
        # that key; a bound key is not moved by it, and another Patient is out of reach.
        browser = PatientWallet.create(sn.net.base / "w3", b"a browser key passphrase")
        own_first = {
            "patient_key": browser.public.der().hex(),
            "signature": browser.enrollment_signature("alpha", fresh_where["pseudonym"]).to_json(),
        }
        moved = {
            "patient_key": browser.public.der().hex(),
            "signature": browser.enrollment_signature("alpha", where["pseudonym"]).to_json(),
        }
        async with client(sn, "alpha", sn.token("alpha", "patient", pid)) as api:
            outcome(await api.post(f"/fhir/Patient/{pid}/$enroll", json=moved), 409)
            outcome(await api.post(f"/fhir/Patient/{fresh_id}/$enroll", json=own_first), 404)
            assert (await api.get(f"/fhir/Patient/{pid}/$enrollment")).json()[
                "fingerprint"
            ] == wallet.fingerprint
        async with client(sn, "alpha", sn.token("alpha", "patient", fresh_id)) as api:
            ok = await api.post(f"/fhir/Patient/{fresh_id}/$enroll", json=own_first)
            assert ok.status_code == 200, ok.text
            assert ok.json()["fingerprint"] == browser.fingerprint

    run(tmp_path, story)


def test_patient_grants_and_revokes_through_the_api(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        patient_token = sn.token("alpha", "patient", sn.patient_id)
        stranger = PatientWallet.create(sn.net.base / "stranger", b"another patient passphrase")
        async with client(sn, "alpha", patient_token) as api:
            # Someone else's signed consent is not this patient's to submit.
            outcome(await api.post("/fhir/Consent", json=grant_resource(sn, stranger)), 403)
            resource = grant_resource(sn, sn.wallet)
            tampered = {**resource, "status": "draft"}
            outcome(await api.post("/fhir/Consent", json=tampered), 400, "does not say")
            created = await api.post("/fhir/Consent", json=resource)
            assert created.status_code == 201, created.text
            consent_id = created.json()["id"]
            assert created.headers["location"] == f"/fhir/Consent/{consent_id}"
            mine = (await api.get("/fhir/Consent")).json()
            assert [e["resource"]["id"] for e in mine["entry"]] == [consent_id]
        async with client(sn, "alpha", sn.token("alpha", "auditor")) as auditor:
            outcome(await auditor.post("/fhir/Consent", json=resource), 403, "role")
            assert (await auditor.get(f"/fhir/Consent/{consent_id}")).json()["status"] == "active"
        async with client(sn, "beta", sn.token("beta", "clinician")) as beta:
            target = next(r for r in sn.records if r.startswith("Observation/"))
            fetched = await beta.get(f"/share/alpha/{target}", params={"consent": consent_id})
            assert fetched.status_code == 200, fetched.text
            assert fetched.json()["resource"]["id"] == target.split("/")[1]
            revoke = sn.wallet.revoke(
                chain=sn.chain_id, grant=bytes.fromhex(consent_id), time_ms=now_ms()
            )
            async with client(sn, "alpha", patient_token) as api:
                wrong_id = await api.put(f"/fhir/Consent/{'00' * 32}", json=revocation_for(revoke))
                outcome(wrong_id, 400)
                done = await api.put(f"/fhir/Consent/{consent_id}", json=revocation_for(revoke))
                assert done.status_code == 200 and done.json()["status"] == "inactive"
            await sn.settle()
            refused = await beta.get(f"/share/alpha/{target}", params={"consent": consent_id})
            outcome(refused, 403, "revoked")

    run(tmp_path, story)


def test_the_trail_is_for_auditors_and_the_patient_only(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        fingerprint = sn.wallet.fingerprint
        async with client(sn, "alpha", sn.token("alpha", "clinician")) as clinician:
            assert (await clinician.get(f"/fhir/{sn.records[1]}")).status_code == 200
            outcome(await clinician.get("/fhir/AuditEvent", params={"patient": fingerprint}), 403)
        async with client(sn, "alpha", sn.token("alpha", "auditor")) as auditor:
            events = (await auditor.get("/fhir/AuditEvent", params={"patient": fingerprint})).json()
            outcome(await auditor.get("/fhir/AuditEvent"), 400, "by patient")
            outcome(await auditor.get(f"/fhir/{sn.records[1]}"), 403)
        reads = [e["resource"] for e in events["entry"] if e["resource"]["type"]["code"] == "rest"]
        assert reads and all(r["outcome"] == "0" for r in reads)
        # Besides the reads: the enrollment that bound the patient's key.
        others = [e["resource"] for e in events["entry"] if e["resource"] not in reads]
        assert [e["subtype"][0]["code"] for e in others] == ["enrollment"]
        assert {r["agent"][0]["who"]["identifier"]["value"] for r in reads} == {"alpha"}
        assert all(r["agent"][0]["altId"].startswith("clinician:") for r in reads)
        async with client(sn, "alpha", sn.token("alpha", "patient", sn.patient_id)) as me:
            own = (await me.get("/fhir/AuditEvent")).json()
            assert {e["resource"]["id"] for e in own["entry"]} >= {r["id"] for r in reads}
        async with client(sn, "alpha", sn.token("alpha", "clinician")) as clinician:
            assert (await clinician.get(f"/fhir/{sn.records[2]}")).status_code == 200
        async with client(sn, "alpha", sn.token("alpha", "auditor")) as auditor:
            later = (await auditor.get("/fhir/AuditEvent", params={"patient": fingerprint})).json()
        # The node's trail index caught up with the read made after its first query.
        assert len(later["entry"]) == len(events["entry"]) + 1
        async with client(sn, "beta", sn.token("beta", "auditor")) as other:
            outcome(await other.get(f"/share/alpha/{sn.records[1]}", params={"consent": "0"}), 403)

    run(tmp_path, story)


def test_the_capability_statement_lists_consent_and_audit_event(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        from fhir.resources.R4B.capabilitystatement import CapabilityStatement

        async with httpx.AsyncClient(
            base_url=sn.urls["alpha"], timeout=30, verify=sn.tls("alpha")
        ) as anonymous:
            statement = (await anonymous.get("/fhir/metadata")).json()
        CapabilityStatement.model_validate(statement)
        described = {r["type"]: r for r in statement["rest"][0]["resource"]}
        assert {i["code"] for i in described["Consent"]["interaction"]} == {
            "read",
            "create",
            "update",
            "search-type",
        }
        assert [p["name"] for p in described["AuditEvent"]["searchParam"]] == ["patient"]
        # What it advertises works: both searches answer searchset Bundles.
        token = sn.token("alpha", "auditor")
        async with client(sn, "alpha", token) as auditor:
            for rtype in ("Consent", "AuditEvent"):
                found = await auditor.get(
                    f"/fhir/{rtype}", params={"patient": sn.wallet.fingerprint}
                )
                assert found.status_code == 200 and found.json()["type"] == "searchset"

    run(tmp_path, story)


def test_a_clinician_sees_a_records_provenance_verified(tmp_path: Path) -> None:
    """``$provenance``: the record's block, the anchor covering it and its certificate."""

    async def story(sn: SharingNet) -> None:
        target = next(r for r in sn.records if r.startswith("Observation/"))
        async with client(sn, "alpha", sn.token("alpha", "clinician")) as api:
            r = await api.get(f"/fhir/{target}/$provenance")
            assert r.status_code == 200, r.text
            p = r.json()
            assert p["resource"] == target and p["chain"] == "private:alpha"
            assert p["anchored"] is True and p["verified"] is True, p
            assert len(p["certified_by"]) >= p["quorum"] >= 2
            # The block named holds the record's transaction ...
            block = (await api.get(f"/chain/private/blocks/{p['block']}")).json()
            hashes = [sha256(canonical_bytes(tx)).hex() for tx in block["txs"]]
            assert p["record_tx"] in hashes
            # ... and the consortium block named is final and holds alpha's anchor of it.
            final = (await api.get(f"/chain/consortium/blocks/{p['consortium_height']}")).json()
            assert final["hash"] == p["consortium_block"]
            anchors = [t for t in final["txs"] if t["type"] == "anchor"]
            assert any(
                a["body"]["institution"] == "alpha" and a["body"]["log_size"] > p["leaf_index"]
                for a in anchors
            )
            assert p["anchored_ms"] == final["header"]["time_ms"]
            outcome(await api.get("/fhir/Observation/nothing-here/$provenance"), 404)
        async with client(sn, "alpha", sn.token("alpha", "patient", sn.patient_id)) as api:
            outcome(await api.get(f"/fhir/{target}/$provenance"), 403)

    run(tmp_path, story)


def test_provenance_says_what_fails_when_the_anchor_block_is_not_final(tmp_path: Path) -> None:
    """The badge is checked, not asserted: a stored anchor block stripped of its finality
    certificate is reported as not verified, with the reason."""

    async def story(sn: SharingNet) -> None:
        target = next(r for r in sn.records if r.startswith("Condition/"))
        node = sn.node("alpha")
        assert node.consortium is not None and node.consortium_store is not None
        anchor = node.consortium.state.anchors["alpha"]
        height, _ = node.consortium_store.tx_location(anchor.tx_hash)
        with sqlite3.connect(node.paths.consortium_db) as conn:
            conn.execute("UPDATE blocks SET signatures = '[]' WHERE height = ?", (height,))
        async with client(sn, "alpha", sn.token("alpha", "clinician")) as api:
            p = (await api.get(f"/fhir/{target}/$provenance")).json()
        assert p["anchored"] is True and p["consortium_height"] == height
        assert p["verified"] is False and "not final" in p["problem"], p
        assert "certified_by" not in p

    run(tmp_path, story)
