"""Sections 1 to 3 of the demo: the network starts, Hospital 1 writes and searches records, anchoring.

Afterwards the scene has a client per node, the synthetic patients, and the
facts ``patient``, ``family`` and ``observation`` that the consent section uses.
"""

from __future__ import annotations

import asyncio
import time

from rich.table import Column

from medledger.core.consortium import quorum
from medledger.core.encoding import canonical_bytes
from medledger.demo.client import NodeApi
from medledger.demo.scene import (
    DEMO_CONSORTIUM,
    DEMO_PASSPHRASE,
    Scene,
    short,
    titled_table,
    wait_until,
)
from medledger.localnet import netproc
from medledger.synthetic import generate_patients

__all__ = ["start_network", "wait_anchored", "write_records"]

_PATIENTS_AT_A = 20
_RESOURCES_PER_PATIENT = 20
_WRITERS = 16


def start_network(scene: Scene) -> None:
    """Section 1: ``network up`` with three hospitals; fills ``scene.nodes``."""
    scene.section(1, "Three hospitals start their nodes and form a consortium")
    t0 = time.perf_counter()
    spec = netproc.up(
        scene.base,
        passphrase=DEMO_PASSPHRASE.encode(),
        institutions=3,
        ordering="solo",
        store="sqlite",
        consortium=DEMO_CONSORTIUM,
        kdf=scene.kdf,
    )
    for node in spec.nodes:
        scene.nodes[node.institution] = NodeApi(node)
    table = titled_table(
        f"network up ({time.perf_counter() - t0:.1f} s)", "institution", "process", "API", "ready"
    )
    report = netproc.status(scene.base)
    for process in report.nodes:
        table.add_row(
            process.institution,
            f"pid {process.pid}",
            process.url,
            "yes" if process.ready else "no",
        )
    scene.say(table)
    members = len(spec.nodes)
    scene.step(
        "Each node has its own passphrase-protected keystore (ECDSA P-256 signing key, "
        "key-encryption key, search key), its own private chain, and a copy of the "
        f"consortium chain, whose genesis lists the {members} members. A consortium block "
        f"is final with {quorum(members)} of {members} member signatures."
    )
    scene.why(
        "no institution hands its data or its keys to anyone; the consortium only sees "
        "hashes and signatures."
    )


def write_records(scene: Scene) -> None:
    """Section 2: concurrent FHIR writes at Hospital 1, a read, and blind-index search."""
    scene.section(2, "Hospital 1's clinical systems write FHIR records, many at once")
    a = scene.nodes["hospital-1"]
    scene.bundles = generate_patients(
        _PATIENTS_AT_A, seed=2026, resources_per_patient=_RESOURCES_PER_PATIENT
    )
    resources = [r for b in scene.bundles for r in b.all_resources()]
    before = a.get("/chain/private/head")["height"]
    t0 = time.perf_counter()
    written = asyncio.run(a.put_all(resources, writers=_WRITERS))
    elapsed = time.perf_counter() - t0
    head = a.get("/chain/private/head")
    blocks = head["height"] - before
    scene.step(
        f"{written} FHIR resources of {len(scene.bundles)} synthetic patients PUT by "
        f"{_WRITERS} concurrent clients in {elapsed:.1f} s ({written / elapsed:,.0f}/s): "
        f"each validated, encrypted under its own AES-256-GCM key, and committed on "
        f"Hospital 1's private chain in [bold]{blocks} blocks[/] (one fsync each)."
    )
    scene.why(
        "the private chain group-commits: whatever is queued becomes one signed block, and "
        "a write is acknowledged only once its block is on disk — no consortium round trip "
        "on the write path."
    )
    patient = scene.bundles[0]
    family = patient.patient["name"][0]["family"]
    obs = next(r for r in patient.resources if r["resourceType"] == "Observation")
    scene.facts.update(patient=patient, family=family, observation=obs)
    stored = a.get(f"/fhir/Observation/{obs['id']}")
    coding = stored["code"]["coding"][0]
    block = a.get(f"/chain/private/blocks/{head['height']}")
    record_tx = next(t for t in block["txs"] if t["type"] == "record.put")
    scene.step(
        f"GET /fhir/Observation/{short(obs['id'], 8)} decrypts it: "
        f"{coding.get('display', coding['code'])} of patient {family}. What the chain "
        f"holds for a record (the last block's {record_tx['body']['resource_type']}) — "
        "no name, no code, no value:"
    )
    scene.say(f"     [dim]{canonical_bytes(record_tx['body']).decode()}[/]")
    by_name = a.get("/fhir/Patient", family=family[:3])
    by_patient = a.get("/fhir/Observation", patient=patient.patient_id)
    table = titled_table(
        "search without a plaintext index", "query", Column("matches", justify="right")
    )
    table.add_row(f"GET /fhir/Patient?family={family[:3]}", str(by_name["total"]))
    table.add_row(
        f"GET /fhir/Observation?patient={short(patient.patient_id, 8)}",
        str(by_patient["total"]),
    )
    scene.say(table)
    scene.why(
        "search runs on blind-index tokens (HMAC under the node's search key), so even "
        "the index on disk reveals no names, codes or dates."
    )


def wait_anchored(scene: Scene) -> None:
    """Section 3: wait until Hospital 1's head is final on the consortium; show the anchors."""
    scene.section(3, "Anchoring: every private chain becomes globally tamper-evident")
    a = scene.nodes["hospital-1"]
    size = a.get("/chain/private/head")["log_size"]
    t0 = time.perf_counter()
    status = wait_until(
        lambda: a.get("/chain/consortium/status"),
        lambda s: s["anchors"].get("hospital-1", {}).get("log_size", 0) >= size,
        "hospital-1's head to be anchored",
    )
    waited = time.perf_counter() - t0
    table = titled_table(
        "final anchors on the consortium chain",
        "institution",
        "private height",
        "log size",
        "log root",
    )
    for inst, anchor in sorted(status["anchors"].items()):
        table.add_row(
            inst,
            str(anchor.get("height", "")),
            str(anchor.get("log_size", "")),
            short(str(anchor.get("log_root", "")), 16),
        )
    scene.say(table)
    scene.step(
        f"Hospital 1's head (log size {size}) was final on the consortium chain "
        f"{waited * 1000:.0f} ms after the last write returned; consortium height "
        f"{status['final_height']}."
    )
    scene.why(
        "each anchor carries an RFC 6962 consistency proof from the previous one, checked "
        "by every member and signed by a quorum: from now on not even Hospital 1 can "
        "present a different history of what it wrote."
    )
