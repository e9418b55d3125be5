"""Section 4 of the demo: a patient's consent, used across institutions and revoked.

The patient (``facts["patient"]`` from the records section) enrolls a wallet at
Hospital 1 and grants Hospital 2 access; Hospitals 2 and 3 try to read with and
without it, and the patient's audit trail shows every attempt. Leaves the facts
``fingerprint``, ``wallet``, ``consent`` and ``audit_events`` for the ending.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from medledger.core.hashing import hash_from_hex
from medledger.core.merkle import verify_inclusion
from medledger.demo.client import Answer, DemoFailed, NodeApi
from medledger.demo.scene import WALLET_PASSPHRASE, Scene, now_ms, short, titled_table
from medledger.demo.trail import audit_trail
from medledger.services.consent_fhir import consent_for_grant, revocation_for
from medledger.services.patients import PatientWallet
from medledger.synthetic import PatientBundle

__all__ = ["share_with_consent"]

_DAY_MS = 86_400_000
#: The sharing service prefixes what the holder answered; the table says it already.
_HOLDER_SAID = re.compile(r"^holder refused \(\d+\): ")


def share_with_consent(scene: Scene) -> None:
    """Section 4: enroll, refuse, grant, share and verify, revoke, refuse; then the trail."""
    scene.section(4, "Consent: a patient decides which hospital may read their records")
    a, b, c = (scene.nodes[f"hospital-{i}"] for i in (1, 2, 3))
    patient: PatientBundle = scene.facts["patient"]
    obs = scene.facts["observation"]
    target = f"Observation/{obs['id']}"
    wallet_path = scene.base / "patient.wallet"
    wallet = PatientWallet.create(wallet_path, WALLET_PASSPHRASE.encode())
    fingerprint = wallet.fingerprint
    scene.facts.update(fingerprint=fingerprint, wallet=wallet_path)
    where = a.call("GET", f"/fhir/Patient/{patient.patient_id}/$enrollment").body
    enroll = a.call(
        "POST",
        f"/fhir/Patient/{patient.patient_id}/$enroll",
        body={
            "patient_key": wallet.public.der().hex(),
            "signature": wallet.enrollment_signature(
                where["institution"], where["pseudonym"]
            ).to_json(),
        },
    ).body
    scene.step(
        f"Patient {scene.facts['family']} creates a wallet (a key pair only they hold) and "
        f"enrolls it at Hospital 1: on every chain they are only the key fingerprint "
        f"{short(enroll['fingerprint'], 16)}."
    )
    rows: list[tuple[str, str, str]] = []

    def attempt(who: NodeApi, consent: str, what: str, label: str) -> Answer:
        answer = who.call("GET", f"/share/hospital-1/{what}", consent=consent, expect=(200, 403))
        outcome = (
            "[green]allowed, verified[/]"
            if answer.status == 200
            else f"[red]refused by hospital-1 ({answer.status})[/]: "
            + _HOLDER_SAID.sub("", answer.reason)
        )
        rows.append((label, f"{who.institution} reads {what.split('/')[0]}", outcome))
        return answer

    attempt(b, "00" * 32, target, "no consent yet")
    chain = a.get("/readyz", role=None)["consortium"]
    now = now_ms()
    grant = wallet.grant(
        chain=chain,
        grantee="hospital-2",
        scope=["Observation", "Condition"],
        purpose="TREAT",
        expires_ms=now + _DAY_MS,
        time_ms=now,
    )
    t0 = time.perf_counter()
    consent = a.call("POST", "/fhir/Consent", body=consent_for_grant(grant), expect=201).body
    final_ms = (time.perf_counter() - t0) * 1000
    consent_id = consent["id"]
    scene.facts["consent"] = consent_id
    rows.append(
        (
            "patient grants",
            "hospital-2 · Observation, Condition · TREAT · 1 day",
            f"[green]final on the consortium in {final_ms:.0f} ms[/]",
        )
    )
    listed = b.get("/share/hospital-1", consent=consent_id)
    shared = attempt(b, consent_id, target, "with consent").body
    original = a.get(f"/fhir/{target}")
    if shared["resource"] != original:
        raise DemoFailed("the shared record differs from the holder's")
    attempt(b, consent_id, f"Patient/{patient.patient_id}", "outside the scope")
    attempt(c, consent_id, target, "someone else's consent")
    revocation = wallet.revoke(
        chain=chain, grant=hash_from_hex(consent_id, "consent id"), time_ms=now_ms()
    )
    revoked = a.call("PUT", f"/fhir/Consent/{consent_id}", body=revocation_for(revocation))
    rows.append(("patient revokes", f"consent {short(consent_id)}", revoked.body["status"]))
    attempt(b, consent_id, target, "after revocation")

    table = titled_table("the consent story, as each hospital saw it", "step", "request", "answer")
    for row in rows:
        table.add_row(*row)
    scene.say(table)
    scene.step(
        f"With the consent, Hospital 2 could list {len(listed['entries'])} records it may "
        "fetch, and the Observation it fetched is byte-for-byte Hospital 1's record."
    )
    _show_provenance(scene, shared["provenance"])
    scene.why(
        "Hospital 1 releases a record only under a final, unrevoked, unexpired consent "
        "signed by the patient's own key, to the very member it names, for the resource "
        "types it names; Hospital 2 believes the record only after checking it against "
        "Hospital 1's anchored log."
    )
    audit_trail(scene, a, fingerprint)


def _show_provenance(scene: Scene, prov: Mapping[str, Any]) -> None:
    """Re-check the shared record's inclusion proof as an outsider would, then show its evidence.

    Raises :class:`~medledger.core.errors.RootMismatch` (or ``InvalidInput`` for a
    malformed proof) if Hospital 1's proof does not lead to the anchored root.
    """
    a = scene.nodes["hospital-1"]
    proof = a.get(
        "/chain/private/proof/inclusion",
        tx=prov["record_tx"],
        size=prov["anchored_log_size"],
    )
    verify_inclusion(
        bytes.fromhex(proof["leaf_hash"]),
        int(proof["index"]),
        int(proof["size"]),
        [bytes.fromhex(h) for h in proof["proof"]],
        bytes.fromhex(prov["anchored_log_root"]),
    )
    table = titled_table("what Hospital 2 checked before decrypting", "check", "evidence")
    table.add_row(
        "the record is Hospital 1's",
        f"record.put {short(prov['record_tx'])} at log entry {prov['leaf_index']}",
    )
    table.add_row(
        "it is in Hospital 1's anchored log",
        f"RFC 6962 inclusion proof against root {short(prov['anchored_log_root'], 16)} "
        f"(log size {prov['anchored_log_size']})",
    )
    table.add_row(
        "that root is final on the consortium",
        f"block {prov['consortium_height']} signed by {', '.join(prov['certified_by'])}",
    )
    table.add_row(
        "the data key reached only Hospital 2",
        f"HPKE, {prov['kem']} (post-quantum hybrid)",
    )
    table.add_row(
        "an outsider can re-check it",
        f"GET /chain/private/proof/inclusion → {len(proof['proof'])} hashes: "
        "[green]verified here too[/]",
    )
    scene.say(table)
