"""Sections 5 to 7 of the demo: what the running network lives through after the records are in.

A patient is erased from an append-only chain, Hospital 1 rotates its keys
without stopping, and a Byzantine member is caught signing two blocks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from medledger.config import NodePaths
from medledger.core.encoding import canonical_bytes
from medledger.core.models import BlockHeader
from medledger.demo.scene import DEMO_PASSPHRASE, Scene, now_ms, wait_until
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.storage.keystore import FileKeyStore

__all__ = ["catch_equivocation", "erase_a_patient", "rotate_keys"]


def erase_a_patient(scene: Scene) -> None:
    """Section 5: the admin erases every resource of patient #2; GET and history answer 410."""
    scene.section(5, "Erasure: the right to be forgotten, on an append-only chain")
    a = scene.nodes["hospital-1"]
    victim = scene.bundles[1]
    resources = list(reversed(victim.all_resources()))  # the Patient last
    # A FHIR DELETE keeps older versions readable; erasure is the admin's own request.
    for r in resources:
        a.call("POST", f"/admin/records/{r['resourceType']}/{r['id']}/erase", role="admin")
    gone = a.call("GET", f"/fhir/Patient/{victim.patient_id}", expect=410)
    obs = next(r for r in victim.resources if r["resourceType"] == "Observation")
    history = a.get(f"/fhir/Observation/{obs['id']}/_history")
    statuses = ", ".join(e["response"]["status"] for e in history["entry"])
    scene.step(
        f"POST /admin/records/…/erase for all {len(resources)} resources of patient #2: "
        f"their data keys and ciphertexts are destroyed (crypto-shredding) and a "
        f"record.erase tombstone is appended. GET Patient now answers {gone.status} "
        f"({gone.reason}); the Observation's _history shows only what is gone: {statuses}."
    )
    scene.why(
        "the chain still holds every hash — it keeps verifying — but nothing that could "
        "ever be decrypted into the patient's data remains anywhere."
    )


def rotate_keys(scene: Scene) -> None:
    """Section 6: a clinician may not rotate keys (403); the admin rotates them (200)."""
    scene.section(6, "Key rotation on a running node")
    a = scene.nodes["hospital-1"]
    refused = a.call("POST", "/admin/keys/rotate", expect=403)
    t0 = time.perf_counter()
    summary = a.call("POST", "/admin/keys/rotate", role="admin").body
    elapsed = time.perf_counter() - t0
    obs = scene.facts["observation"]
    again = a.call("GET", f"/fhir/Observation/{obs['id']}")
    scene.step(
        f"POST /admin/keys/rotate with a clinician token: {refused.status} "
        f"({refused.reason}). With the admin token: a new key-encryption key, "
        f"[bold]{summary['rewrapped']} data keys re-wrapped[/] in {elapsed:.1f} s, the old "
        f"key destroyed, a key.rotate entry on the chain. Reading the Observation again: "
        f"{again.status}."
    )
    scene.why(
        "a leaked or aging key is replaced without re-encrypting a single record and "
        "without stopping the node."
    )


def catch_equivocation(scene: Scene) -> None:
    """Section 7: Hospital 3's key votes for a forged block; wait (15 s) for the evidence."""
    scene.section(7, "A Byzantine member signs two different blocks")
    a = scene.nodes["hospital-1"]
    height = a.get("/chain/consortium/status")["final_height"]
    real = BlockHeader.from_json(a.get(f"/chain/consortium/blocks/{height}")["header"])
    forged = replace(real, time_ms=real.time_ms + 1)
    paths = NodePaths(root=scene.base / "hospital-3")
    key = FileKeyStore.open(paths.keystore, DEMO_PASSPHRASE.encode()).signing_key()
    vote = canonical_bytes(
        {
            "kind": "vote",
            "header": forged.to_json(),
            "signature": key.sign(forged.hash()).to_json(),
        }
    )
    asyncio.run(_publish(scene.base / "order.db", vote))
    status = wait_until(
        lambda: a.get("/chain/consortium/status"),
        lambda s: bool(s["evidence"]),
        "equivocation evidence",
        timeout=15,
    )
    evidence = status["evidence"][0]
    scene.step(
        f"Hospital 3's key signs a second, conflicting block at height {height} and sends "
        f"the vote to the consortium. Every honest member records the two signed headers "
        f"as evidence: [bold]equivocation by {evidence['member']}[/] at height "
        f"{evidence['height']} (GET /chain/consortium/status)."
    )
    scene.why(
        "a member that signs two histories is caught with proof anyone can check, and its "
        "signatures no longer count toward finality."
    )


async def _publish(order_file: Path, payload: bytes) -> None:
    """Put ``payload`` on the solo orderer's log, as a member's consortium node would."""
    orderer = SoloOrderer(order_file)
    try:
        await orderer.publish(f"demo-equivocation-{now_ms()}", payload)
    finally:
        await orderer.close()
