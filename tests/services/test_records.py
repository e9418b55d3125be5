"""The records service end to end on a real node: round trips, versions, transactions,
no PHI at rest, tamper detection, KEK rotation under load, and crypto-shredding erasure."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from node_files import blob_names, node_state

from medledger.core.errors import (
    Conflict,
    Gone,
    IntegrityError,
    KeyStoreError,
    MedledgerError,
    NotFound,
    PreconditionFailed,
    RecordDamaged,
)
from medledger.ledger.verify import verify_chain
from medledger.node import Node, init_node, open_chain, open_node
from medledger.services.fhir import FhirInvalid, load_json
from medledger.services.records.model import SealedVersion, StoredResource
from medledger.storage.keystore import FileKeyStore, KdfParams
from medledger.storage.ports import VersionRow
from medledger.synthetic import (
    RXNORM,
    SNOMED,
    PatientBundle,
    all_resource_types,
    generate_patient,
    generate_patients,
)

T = TypeVar("T")
PW = b"records test passphrase"
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
#: Patient 16 of seed 3 has every clinical resource type among its first 40 resources.
ALL_TYPES_PATIENT = generate_patient(16, seed=3, resources_per_patient=40)


# -- helpers -------------------------------------------------------------------------------


def new_node(root: Path, name: str = "Records Test") -> Path:
    init_node(root, name=name, passphrase=PW, kdf=KdfParams(n=2**12))
    return root


def run(root: Path, fn: Callable[[Node], Awaitable[T]]) -> T:
    async def go() -> T:
        node = open_node(root, PW)
        try:
            return await fn(node)
        finally:
            await node.close()

    return asyncio.run(go())


def plain(resource: dict[str, Any]) -> Any:
    """A resource as plain JSON values (floats stay floats), without ``meta``."""
    return {k: v for k, v in json.loads(json.dumps(resource)).items() if k != "meta"}


def content(data: bytes) -> Any:
    return {k: v for k, v in json.loads(data).items() if k != "meta"}


def blob_path(root: Path, blob_hash: bytes) -> Path:
    return root / "blobs" / blob_hash.hex()[:2] / blob_hash.hex()


def chain_txs(root: Path) -> list[dict[str, Any]]:
    _, store = open_chain(root)
    try:
        return [json.loads(d) for b in store.iter_blocks() for d in b.tx_data]
    finally:
        store.close()


def verify(root: Path) -> None:
    config, store = open_chain(root)
    try:
        report = verify_chain(store, expected_key=config.signing_key)
    finally:
        store.close()
    assert report.log_size == len(chain_txs(root))


async def write_bundles(node: Node, bundles: Iterable[PatientBundle]) -> None:
    for b in bundles:
        await node.records.update("Patient", b.patient_id, b.patient)
        await asyncio.gather(
            *(node.records.update(r["resourceType"], r["id"], r) for r in b.resources)
        )


def walk_strings(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk_strings(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from walk_strings(v, key)
    elif isinstance(value, str):
        yield key, value


def phi_needles(bundles: Iterable[PatientBundle]) -> set[str]:
    """Strings that must never be found in a node directory."""
    needles: set[str] = set()
    for b in bundles:
        p = b.patient
        for name in p["name"]:
            needles.add(name["family"])
            needles.update(name["given"])
        needles.update(i["value"] for i in p["identifier"])
        needles.update(t["value"] for t in p["telecom"])
        needles.add(p["birthDate"])
        for a in p["address"]:
            needles.update(a["line"])
            needles.add(a["city"])
        for r in b.resources:
            for c in _codings(r):
                if c.get("system") == "http://loinc.org" and "-" in c["code"]:
                    needles.add(c["code"])
                if c.get("system") in (SNOMED, RXNORM) and c.get("display"):
                    needles.add(c["display"])
            for key, value in walk_strings(r):
                if key == "text" or re.match(r"^\d{4}-\d{2}-\d{2}", value):
                    needles.add(value[:10] if key != "text" else value)
    return needles


def _codings(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if isinstance(value.get("coding"), list):
            yield from value["coding"]
        for v in value.values():
            yield from _codings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _codings(v)


def _forms(needle: str) -> list[tuple[bytes, bool]]:
    """(pattern, case-insensitive) to look for. Short needles are searched with their JSON
    quotes so that a chance match in random bytes (ciphertext, hashes) stays negligible."""
    raw = needle.encode()
    exact = raw if len(raw) >= 5 else b'"' + raw + b'"'
    lower = raw.lower() if len(raw) >= 6 else b'"' + raw.lower() + b'"'
    return [(exact, False), (lower, True)]


def scan_for_plaintext(root: Path, needles: Iterable[str]) -> list[str]:
    """Every (file, needle) where a needle's bytes occur in any file under ``root``."""
    found = []
    forms = [(n, f) for n in sorted(needles) for f in _forms(n)]
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    assert any(p.name == "chain.db" for p in files)
    assert any(p.name == "records.db" for p in files)
    assert any(p.name == "keystore.json" for p in files)
    for path in files:
        data = path.read_bytes()
        low = data.lower()
        for needle, (pattern, insensitive) in forms:
            if pattern in (low if insensitive else data):
                found.append(f"{path.relative_to(root)}: {needle!r} as {pattern!r}")
    return found


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_every_generated_type(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    bundle = ALL_TYPES_PATIENT
    resources = bundle.all_resources()
    assert {r["resourceType"] for r in resources} == set(all_resource_types())

    async def go(node: Node) -> None:
        await write_bundles(node, [bundle])
        for r in resources:
            stored = await node.records.read(r["resourceType"], r["id"])
            assert (stored.resource_type, stored.id, stored.version) == (
                r["resourceType"],
                r["id"],
                1,
            )
            data = json.loads(stored.data)
            assert data["id"] == r["id"]
            assert data["meta"]["versionId"] == "1"
            assert INSTANT.match(data["meta"]["lastUpdated"])
            assert data["meta"]["lastUpdated"] == stored.last_updated
            assert set(data["meta"]) == {"versionId", "lastUpdated"}
            assert content(stored.data) == plain(r)
            assert stored.resource() == load_json(stored.data)
            v1 = await node.records.vread(r["resourceType"], r["id"], 1)
            assert v1.data == stored.data

    run(root, go)


def test_decimals_keep_their_text(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    body = (
        '{"resourceType":"Observation","status":"final",'
        '"code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},'
        '"valueQuantity":{"value":1.50,"unit":"%"},'
        '"referenceRange":[{"low":{"value":4.0},"high":{"value":5.60}}]}'
    )

    async def go(node: Node) -> None:
        stored = await node.records.create(load_json(body))
        again = await node.records.read("Observation", stored.id)
        assert b'"value":1.50' in again.data
        assert b'"value":4.0}' in again.data
        assert b'"value":5.60}' in again.data
        assert str(again.resource()["valueQuantity"]["value"]) == "1.50"

    run(root, go)


def test_create_assigns_a_uuid(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        ids = set()
        for body in (
            {"resourceType": "Patient", "gender": "female"},
            {"resourceType": "Patient", "id": "client-chosen", "gender": "male"},
        ):
            stored = await node.records.create(body)
            assert str(uuid.UUID(stored.id)) == stored.id
            assert stored.id != "client-chosen"
            assert stored.version == 1
            read = await node.records.read("Patient", stored.id)
            assert read.data == stored.data
            assert json.loads(read.data)["id"] == stored.id
            ids.add(stored.id)
        assert len(ids) == 2
        with pytest.raises(NotFound):
            await node.records.read("Patient", "client-chosen")

    run(root, go)


def test_update_versions_history_vread(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        body = {"resourceType": "Patient", "gender": "female", "meta": {"versionId": "99"}}
        s1, created = await node.records.update("Patient", "p1", body)
        assert created and s1.version == 1
        assert json.loads(s1.data)["meta"]["versionId"] == "1"  # the client's is replaced
        s2, created = await node.records.update(
            "Patient",
            "p1",
            {
                "resourceType": "Patient",
                "id": "p1",
                "gender": "male",
                "meta": {"tag": [{"code": "t"}]},
            },
        )
        assert not created and s2.version == 2
        meta2 = json.loads(s2.data)["meta"]
        assert meta2["versionId"] == "2"
        assert meta2["tag"] == [{"code": "t"}]
        latest = await node.records.read("Patient", "p1")
        assert latest.version == 2 and latest.data == s2.data
        assert json.loads(latest.data)["gender"] == "male"
        history = await node.records.history("Patient", "p1")
        assert [v.version for v in history] == [2, 1]
        assert [v.stored.data if v.stored else None for v in history] == [s2.data, s1.data]
        assert history[0].last_updated >= history[1].last_updated
        v1 = await node.records.vread("Patient", "p1", 1)
        assert v1.data == s1.data and json.loads(v1.data)["gender"] == "female"
        assert (await node.records.vread("Patient", "p1", 2)).data == s2.data
        for missing in (0, 3):
            with pytest.raises(NotFound):
                await node.records.vread("Patient", "p1", missing)
        with pytest.raises(NotFound) as exc:
            await node.records.read("Patient", "nope")
        assert type(exc.value) is NotFound
        with pytest.raises(NotFound):
            await node.records.history("Patient", "nope")
        with pytest.raises(NotFound):
            await node.records.read("Observation", "p1")

    run(root, go)
    puts = [t for t in chain_txs(root) if t["type"] == "record.put"]
    assert [t["body"]["version"] for t in puts] == [1, 2]
    verify(root)


def test_if_match(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        with pytest.raises(PreconditionFailed):
            await node.records.update("Patient", "p1", {"resourceType": "Patient"}, if_match=1)
        await node.records.update("Patient", "p1", {"resourceType": "Patient"}, if_match=0)
        await node.records.update("Patient", "p1", {"resourceType": "Patient", "gender": "male"})
        before = node_state(root)
        for wrong in (1, 3, 0):
            with pytest.raises(PreconditionFailed) as exc:
                await node.records.update(
                    "Patient", "p1", {"resourceType": "Patient", "gender": "other"}, if_match=wrong
                )
            assert isinstance(exc.value, Conflict)
        assert node_state(root) == before
        stored, created = await node.records.update(
            "Patient", "p1", {"resourceType": "Patient", "gender": "other"}, if_match=2
        )
        assert stored.version == 3 and not created
        assert json.loads((await node.records.read("Patient", "p1")).data)["gender"] == "other"

    run(root, go)


def test_update_with_mismatched_body_id(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        await node.records.update("Patient", "p1", {"resourceType": "Patient"})
        before = node_state(root)
        with pytest.raises(FhirInvalid) as exc:
            await node.records.update("Patient", "p1", {"resourceType": "Patient", "id": "p2"})
        assert exc.value.issues[0].expression == ("Patient.id",)
        assert "p2" in exc.value.issues[0].diagnostics
        assert node_state(root) == before
        with pytest.raises(NotFound):
            await node.records.read("Patient", "p2")

    run(root, go)


def test_concurrent_updates_of_one_resource_get_distinct_versions(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        results = await asyncio.gather(
            *(
                node.records.update("Patient", "p1", {"resourceType": "Patient", "gender": g})
                for g in ["male", "female", "other", "unknown"] * 5
            )
        )
        assert sorted(s.version for s, _ in results) == list(range(1, 21))
        assert [v.version for v in await node.records.history("Patient", "p1")] == list(
            range(20, 0, -1)
        )

    run(root, go)
    verify(root)


# -- transactions --------------------------------------------------------------------------------

PAT_URL = "urn:uuid:11111111-1111-4111-8111-111111111111"
ENC_URL = "urn:uuid:22222222-2222-4222-8222-222222222222"
OBS_URL = "urn:uuid:33333333-3333-4333-8333-333333333333"


def transaction_bundle() -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": OBS_URL,
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": PAT_URL},
                    "encounter": {"reference": ENC_URL},
                    "valueQuantity": {"value": 72, "unit": "/min"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": PAT_URL,
                "resource": {
                    "resourceType": "Patient",
                    "name": [{"family": "Transaction", "given": ["Tess"]}],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": ENC_URL,
                "resource": {
                    "resourceType": "Encounter",
                    "status": "finished",
                    "class": {"code": "AMB"},
                    "subject": {"reference": PAT_URL},
                },
                "request": {"method": "POST", "url": "Encounter"},
            },
            {
                "resource": {
                    "resourceType": "DiagnosticReport",
                    "status": "final",
                    "code": {"text": "panel"},
                    "subject": {"reference": PAT_URL},
                    "result": [{"reference": OBS_URL}],
                },
                "request": {"method": "POST", "url": "DiagnosticReport"},
            },
            {
                "resource": {"resourceType": "Patient", "id": "existing", "gender": "female"},
                "request": {"method": "PUT", "url": "Patient/existing"},
            },
            {
                "resource": {"resourceType": "Patient", "id": "brand-new", "gender": "male"},
                "request": {"method": "PUT", "url": "Patient/brand-new"},
            },
        ],
    }


def test_transaction_stores_all_and_rewrites_references(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        await node.records.update("Patient", "existing", {"resourceType": "Patient"})
        height_before = node.chain.head.height
        response = await node.records.transaction(transaction_bundle())
        assert response["resourceType"] == "Bundle"
        assert response["type"] == "transaction-response"
        entries = [e["response"] for e in response["entry"]]
        assert len(entries) == 6
        assert [e["status"] for e in entries] == ["201 Created"] * 4 + ["200 OK", "201 Created"]
        locations = [e["location"].split("/") for e in entries]
        for loc, rtype in zip(
            locations,
            ["Observation", "Patient", "Encounter", "DiagnosticReport", "Patient", "Patient"],
            strict=True,
        ):
            assert loc[0] == rtype and loc[2] == "_history"
        assert [loc[3] for loc in locations] == ["1", "1", "1", "1", "2", "1"]
        assert [e["etag"] for e in entries] == ['W/"1"'] * 4 + ['W/"2"', 'W/"1"']
        assert locations[4][1] == "existing" and locations[5][1] == "brand-new"
        obs_id, pat_id, enc_id, rep_id = (loc[1] for loc in locations[:4])
        for rid in (obs_id, pat_id, enc_id, rep_id):
            assert str(uuid.UUID(rid)) == rid
        obs = json.loads((await node.records.read("Observation", obs_id)).data)
        assert obs["subject"] == {"reference": f"Patient/{pat_id}"}
        assert obs["encounter"] == {"reference": f"Encounter/{enc_id}"}
        enc = json.loads((await node.records.read("Encounter", enc_id)).data)
        assert enc["subject"] == {"reference": f"Patient/{pat_id}"}
        rep = json.loads((await node.records.read("DiagnosticReport", rep_id)).data)
        assert rep["result"] == [{"reference": f"Observation/{obs_id}"}]
        pat = json.loads((await node.records.read("Patient", pat_id)).data)
        assert pat["name"] == [{"family": "Transaction", "given": ["Tess"]}]
        existing = await node.records.read("Patient", "existing")
        assert existing.version == 2 and json.loads(existing.data)["gender"] == "female"
        assert (await node.records.read("Patient", "brand-new")).version == 1
        for e in entries:
            stored = await node.records.read(*e["location"].split("/")[:2])
            assert e["lastModified"] == stored.last_updated
        # Search sees the resolved reference.
        found = await node.records.search("Observation", {"patient": [pat_id]})
        assert [s.id for s in found] == [obs_id]
        # All six record.put transactions went into one block.
        assert node.chain.head.height == height_before + 1
        return None

    run(root, go)
    puts = [t for t in chain_txs(root) if t["type"] == "record.put"][1:]
    assert len(puts) == 6
    by_type = {t["body"]["resource_type"]: t for t in puts[:4]}
    # The Observation's patient pseudonym is its Patient's: resolved before sealing.
    assert by_type["Observation"]["body"]["patient"] == by_type["Patient"]["body"]["patient"]
    assert by_type["Observation"]["body"]["patient"] is not None
    text = json.dumps(puts)
    assert "Transaction" not in text and "urn:uuid" not in text
    verify(root)


def _bad_bundle(index: int, entry: dict[str, Any]) -> dict[str, Any]:
    bundle = transaction_bundle()
    bundle["entry"][index] = entry
    return bundle


BAD_TRANSACTIONS: dict[str, tuple[int, dict[str, Any]]] = {
    "invalid-resource": (
        2,
        {
            "fullUrl": ENC_URL,
            "resource": {"resourceType": "Encounter", "status": "finished"},  # no class
            "request": {"method": "POST", "url": "Encounter"},
        },
    ),
    "wrong-type-field": (
        3,
        {
            "resource": {"resourceType": "Patient", "birthDate": "yesterday"},
            "request": {"method": "POST", "url": "Patient"},
        },
    ),
    "patch-method": (4, {"request": {"method": "PATCH", "url": "Patient/existing"}}),
    "no-request": (1, {"resource": {"resourceType": "Patient"}}),
    "put-url-without-id": (
        5,
        {"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "Patient"}},
    ),
    "put-url-other-type": (
        5,
        {
            "resource": {"resourceType": "Patient"},
            "request": {"method": "PUT", "url": "Observation/x"},
        },
    ),
    "put-url-invalid-id": (
        4,
        {
            "resource": {"resourceType": "Patient"},
            "request": {"method": "PUT", "url": "Patient/bad id"},
        },
    ),
    "unknown-type": (
        0,
        {"resource": {"resourceType": "Foo"}, "request": {"method": "POST", "url": "Foo"}},
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRANSACTIONS))
def test_invalid_transaction_writes_nothing(tmp_path: Path, case: str) -> None:
    root = new_node(tmp_path / "n")
    index, entry = BAD_TRANSACTIONS[case]

    async def go(node: Node) -> None:
        await node.records.update("Patient", "existing", {"resourceType": "Patient"})
        before = node_state(root)
        with pytest.raises(FhirInvalid) as exc:
            await node.records.transaction(_bad_bundle(index, entry))
        first = exc.value.issues[0]
        assert first.expression, exc.value
        assert first.expression[0].startswith(f"Bundle.entry[{index}]"), first
        assert f"Bundle.entry[{index}]" in str(exc.value)
        assert node_state(root) == before
        assert (await node.records.read("Patient", "existing")).version == 1
        assert await node.records.search("Observation", {}) == []

    run(root, go)


def test_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    """A transaction that fails while writing (two entries PUT one id) is undone completely:
    index rows, search tokens, blobs and chain are as before."""
    root = new_node(tmp_path / "n")
    old = {"resourceType": "Patient", "name": [{"family": "Original"}]}

    async def go(node: Node) -> None:
        await node.records.update("Patient", "existing", old)
        await node.records.tokens_settled()  # they follow the acknowledgement
        before = node_state(root)
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": {"resourceType": "Patient", "name": [{"family": "Replaced"}]},
                    "request": {"method": "PUT", "url": "Patient/existing"},
                },
                {
                    "resource": {"resourceType": "Patient", "gender": "male"},
                    "request": {"method": "PUT", "url": "Patient/dup"},
                },
                {
                    "resource": {"resourceType": "Patient", "gender": "female"},
                    "request": {"method": "PUT", "url": "Patient/dup"},
                },
            ],
        }
        with pytest.raises(MedledgerError):
            await node.records.transaction(bundle)
        with pytest.raises(NotFound):
            await node.records.read("Patient", "dup")
        assert (await node.records.read("Patient", "existing")).version == 1
        # Search still answers from the surviving version.
        found = await node.records.search("Patient", {"family": ["orig"]})
        assert [s.id for s in found] == ["existing"]
        assert await node.records.search("Patient", {"family": ["repl"]}) == []
        after = node_state(root)
        assert after[0] == before[0], "chain changed"
        assert after[1][0] == before[1][0], "index rows changed"
        assert after[1][1] == before[1][1], "search tokens changed"
        assert after[2] == before[2], "blob files left behind"

    run(root, go)


# -- no PHI at rest -----------------------------------------------------------------------------


def test_no_phi_at_rest(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    bundles = generate_patients(20, seed=11, resources_per_patient=20)
    assert sum(len(b.resources) for b in bundles) >= 400

    async def go(node: Node) -> int:
        await write_bundles(node, bundles)
        # Make sure everything is committed and readable before closing.
        sample = bundles[-1].resources[-1]
        await node.records.read(sample["resourceType"], sample["id"])
        return len(await node.records.search("Patient", {}))

    assert run(root, go) == 20
    needles = phi_needles(bundles)
    # The scan is meaningful: the needles include names, MRNs, dates, codes and displays.
    assert any(n.startswith("MRN") for n in needles)
    assert any(re.fullmatch(r"\d+-\d", n) for n in needles)
    assert any(re.fullmatch(r"\d{4}-\d{2}-\d{2}", n) for n in needles)
    assert any(" MG " in n for n in needles)
    assert len(needles) > 200
    assert len(blob_names(root)) == 420
    assert scan_for_plaintext(root, needles) == []
    # The scanner does find plaintext when it is there.
    leak = root / "blobs" / "leak.txt"
    leak.write_text(json.dumps(bundles[3].patient))
    hits = scan_for_plaintext(root, needles)
    assert hits and all(h.startswith("blobs/leak.txt") for h in hits)
    assert any(bundles[3].patient["birthDate"] in h for h in hits)


# -- integrity -----------------------------------------------------------------------------------


def _two_versions(root: Path) -> tuple[bytes, bytes, bytes]:
    """Patient p1 at v1 and v2, Patient p2 at v1; returns the three blob hashes."""

    async def go(node: Node) -> tuple[bytes, bytes, bytes]:
        await node.records.update("Patient", "p1", {"resourceType": "Patient", "gender": "male"})
        await node.records.update("Patient", "p1", {"resourceType": "Patient", "gender": "female"})
        await node.records.update("Patient", "p2", {"resourceType": "Patient", "gender": "other"})
        rows = [
            node.index.get_version("Patient", "p1", 1),
            node.index.get_version("Patient", "p1", 2),
            node.index.get_version("Patient", "p2", 1),
        ]
        assert all(r is not None for r in rows)
        hashes = [r.blob_hash for r in rows if r is not None]
        return hashes[0], hashes[1], hashes[2]

    return run(root, go)


def _expect_integrity_error(root: Path, *refs: tuple[str, str, int | None]) -> None:
    async def go(node: Node) -> None:
        for rtype, rid, version in refs:
            with pytest.raises(IntegrityError) as exc:
                if version is None:
                    await node.records.read(rtype, rid)
                else:
                    await node.records.vread(rtype, rid, version)
            assert "female" not in str(exc.value)

    run(root, go)


def test_swapped_blobs(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    _, v2, other = _two_versions(root)
    a, b = blob_path(root, v2), blob_path(root, other)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    _expect_integrity_error(root, ("Patient", "p1", None), ("Patient", "p2", None))


def test_flipped_ciphertext_byte(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    _, v2, _ = _two_versions(root)
    path = blob_path(root, v2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _expect_integrity_error(root, ("Patient", "p1", None), ("Patient", "p1", 2))

    async def still_fine(node: Node) -> None:
        assert json.loads((await node.records.vread("Patient", "p1", 1)).data)["gender"] == "male"

    run(root, still_fine)


def test_replayed_old_version_blob(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    v1, v2, _ = _two_versions(root)
    blob_path(root, v2).write_bytes(blob_path(root, v1).read_bytes())
    _expect_integrity_error(root, ("Patient", "p1", None))


def test_index_row_pointing_to_old_blob(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    v1, _, _ = _two_versions(root)
    with sqlite3.connect(root / "records.db") as conn:
        n = conn.execute(
            "UPDATE versions SET blob_hash = ? WHERE rtype = 'Patient' AND rid = 'p1'"
            " AND version = 2",
            (v1,),
        ).rowcount
    conn.close()
    assert n == 1
    _expect_integrity_error(root, ("Patient", "p1", None))


def test_index_row_replayed_from_old_version(tmp_path: Path) -> None:
    """v1's whole row (blob, wrapped key, tx) copied into the v2 slot: the tx says version 1."""
    root = new_node(tmp_path / "n")
    _two_versions(root)
    conn = sqlite3.connect(root / "records.db")
    with conn:
        blob, dek, tx = conn.execute(
            "SELECT blob_hash, wrapped_dek, tx_hash FROM versions"
            " WHERE rtype = 'Patient' AND rid = 'p1' AND version = 1"
        ).fetchone()
        conn.execute(
            "UPDATE versions SET blob_hash = ?, wrapped_dek = ?, tx_hash = ?"
            " WHERE rtype = 'Patient' AND rid = 'p1' AND version = 2",
            (blob, dek, tx),
        )
    conn.close()
    _expect_integrity_error(root, ("Patient", "p1", None))


def _edit_index(root: Path, sql: str, args: tuple[Any, ...] = ()) -> None:
    conn = sqlite3.connect(root / "records.db")
    try:
        with conn:
            assert conn.execute(sql, args).rowcount == 1
    finally:
        conn.close()


def test_an_index_row_changed_while_the_node_runs_is_refused_on_the_next_read(
    tmp_path: Path,
) -> None:
    """The node remembers what a checked chain transaction says (``RecordReader``), so it
    reads every version once first; each row then changed under the running node still
    fails its next read, by the same check a fresh node makes."""
    root = new_node(tmp_path / "n")
    v1, v2, other = _two_versions(root)

    async def go(node: Node) -> None:
        for version in (1, 2):
            await node.records.vread("Patient", "p1", version)
        await node.records.read("Patient", "p2")
        # v2's row now names v1's blob (its own transaction says v2's).
        _edit_index(
            root,
            "UPDATE versions SET blob_hash = ? WHERE rid = 'p1' AND version = 2",
            (v1,),
        )
        with pytest.raises(RecordDamaged, match="does not match its chain transaction"):
            await node.records.read("Patient", "p1")
        # p2's row replayed whole from p1 v1 (blob, key and transaction): the transaction,
        # remembered from p1's read, names another record.
        _edit_index(
            root,
            "UPDATE versions SET (blob_hash, wrapped_dek, tx_hash) = (SELECT blob_hash,"
            " wrapped_dek, tx_hash FROM versions WHERE rid = 'p1' AND version = 1)"
            " WHERE rid = 'p2' AND version = 1",
        )
        with pytest.raises(RecordDamaged, match="does not match its chain transaction"):
            await node.records.read("Patient", "p2")
        # p1 v1's row claims another patient.
        _edit_index(
            root, "UPDATE versions SET patient = 'someone' WHERE rid = 'p1' AND version = 1"
        )
        with pytest.raises(RecordDamaged, match="does not match its chain transaction"):
            await node.records.vread("Patient", "p1", 1)
        # And the blob itself is re-hashed on every read, remembered transaction or not.
        _edit_index(
            root,
            "UPDATE versions SET blob_hash = ? WHERE rid = 'p1' AND version = 2",
            (v2,),
        )
        await node.records.read("Patient", "p1")
        blob_path(root, v2).write_bytes(blob_path(root, other).read_bytes())
        with pytest.raises(RecordDamaged, match="blob does not match its hash"):
            await node.records.read("Patient", "p1")

    run(root, go)


def test_swapped_wrapped_keys(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    _two_versions(root)
    conn = sqlite3.connect(root / "records.db")
    with conn:
        rows = conn.execute(
            "SELECT rid, version, wrapped_dek FROM versions WHERE version = 1 ORDER BY rid"
        ).fetchall()
        (r1, ver1, k1), (r2, ver2, k2) = rows
        conn.execute(
            "UPDATE versions SET wrapped_dek = ? WHERE rid = ? AND version = ?", (k2, r1, ver1)
        )
        conn.execute(
            "UPDATE versions SET wrapped_dek = ? WHERE rid = ? AND version = ?", (k1, r2, ver2)
        )
    conn.close()
    _expect_integrity_error(root, ("Patient", "p1", 1), ("Patient", "p2", None))


def test_wrong_kek(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    _two_versions(root)
    keystore = FileKeyStore.open(root / "keystore.json", PW)
    kek_id = keystore.secret("kek_current").decode()
    keystore.update({f"kek:{kek_id}": os.urandom(32)})
    _expect_integrity_error(
        root, ("Patient", "p1", None), ("Patient", "p1", 1), ("Patient", "p2", None)
    )


def test_wrong_passphrase(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for wrong in (b"PW", b"pw ", b"x"):
        with pytest.raises(KeyStoreError):
            open_node(root, wrong)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


# -- KEK rotation ----------------------------------------------------------------------------------


def test_rotation_under_concurrent_reads_and_writes(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    bundles = generate_patients(4, seed=21, resources_per_patient=20)
    stable = [r for b in bundles[:2] for r in b.all_resources()]  # read, never written again
    mutable = [r for b in bundles[2:] for r in b.resources]  # updated during rotation
    expected: dict[tuple[str, str], Any] = {}
    n_writers, writes_each = 4, 25

    async def go(node: Node) -> tuple[dict[str, Any], str]:
        await write_bundles(node, bundles)
        for r in (*stable, *mutable, *(b.patient for b in bundles[2:])):
            expected[(r["resourceType"], r["id"])] = plain(r)
        old = node.keystore.secret("kek_current").decode()
        done: list[int] = []
        rotating = asyncio.Event()
        stop = asyncio.Event()
        reads_during: list[int] = []
        progress: dict[str, int] = {}

        async def writer(w: int) -> None:
            for i in range(writes_each):
                if i % 2:
                    src = copy.deepcopy(mutable[(w * writes_each + i) % len(mutable)])
                    src["meta"] = {"tag": [{"code": f"w{w}-{i}"}]}
                    stored, _ = await node.records.update(src["resourceType"], src["id"], src)
                    assert stored.version >= 2
                else:
                    src = copy.deepcopy(mutable[i % len(mutable)])
                    src["id"] = f"new-{w}-{i}"
                    await node.records.update(src["resourceType"], src["id"], src)
                expected[(src["resourceType"], src["id"])] = plain(src)
                done.append(1)
                await asyncio.sleep(0)

        async def reader(k: int) -> None:
            i = k
            while not stop.is_set():
                r = stable[i % len(stable)]
                stored = await node.records.read(r["resourceType"], r["id"])
                assert content(stored.data) == plain(r)
                if rotating.is_set():
                    reads_during.append(1)
                i += 7
                await asyncio.sleep(0)

        async def rotator() -> dict[str, Any]:
            while len(done) < 10:
                await asyncio.sleep(0.001)
            progress["at_start"] = len(done)
            rotating.set()
            result = await node.records.rotate_kek()
            progress["at_end"] = len(done)
            rotating.clear()
            return result

        readers = [asyncio.create_task(reader(k)) for k in range(3)]
        rotation, *_ = await asyncio.gather(rotator(), *(writer(w) for w in range(n_writers)))
        stop.set()
        await asyncio.gather(*readers)

        total = n_writers * writes_each
        assert 0 < progress["at_start"] < total, progress
        assert reads_during, "no read overlapped the rotation"
        assert rotation["old"] == old and rotation["new"] != old
        assert node.keystore.secret("kek_current").decode() == rotation["new"]
        assert node.index.count_wrapped_by(old) == 0
        n_versions = len(node_state(root)[1][0])
        assert node.index.count_wrapped_by(rotation["new"]) == n_versions
        assert 0 < rotation["rewrapped"] <= n_versions
        for (rtype, rid), want in expected.items():
            assert content((await node.records.read(rtype, rid)).data) == want
        return rotation, old

    rotation, old = run(root, go)
    keystore = FileKeyStore.open(root / "keystore.json", PW)
    names = set(keystore.names())
    assert f"kek:{old}" not in names
    assert f"kek:{rotation['new']}" in names
    assert sorted(n for n in names if n.startswith("kek:")) == [f"kek:{rotation['new']}"]

    async def reread(node: Node) -> None:
        assert node.index.count_wrapped_by(old) == 0
        for (rtype, rid), want in expected.items():
            assert content((await node.records.read(rtype, rid)).data) == want
        # Every version (not only the latest) still opens.
        for b in bundles[2:]:
            for r in b.resources[:5]:
                for v in await node.records.history(r["resourceType"], r["id"]):
                    assert v.stored is not None

    run(root, reread)
    rotations = [t for t in chain_txs(root) if t["type"] == "key.rotate"]
    assert len(rotations) == 1
    body = rotations[0]["body"]
    assert (body["old"], body["new"], body["rewrapped"]) == (
        old,
        rotation["new"],
        rotation["rewrapped"],
    )
    verify(root)


def test_two_concurrent_rotations(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    bundles = generate_patients(2, seed=22, resources_per_patient=10)

    async def go(node: Node) -> list[dict[str, Any]]:
        await write_bundles(node, bundles)
        results = await asyncio.gather(node.records.rotate_kek(), node.records.rotate_kek())
        for b in bundles:
            for r in b.all_resources():
                assert content((await node.records.read(r["resourceType"], r["id"])).data) == plain(
                    r
                )
        return list(results)

    results = run(root, go)
    current = FileKeyStore.open(root / "keystore.json", PW).secret("kek_current").decode()
    assert current in {r["new"] for r in results}
    keks = [
        n for n in FileKeyStore.open(root / "keystore.json", PW).names() if n.startswith("kek:")
    ]
    assert keks == [f"kek:{current}"]
    verify(root)


# -- erasure -----------------------------------------------------------------------------------------


def test_erase_patient(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    bundles = generate_patients(4, seed=31, resources_per_patient=20)
    victim, others = bundles[1], [bundles[0], *bundles[2:]]
    victim_refs = [(r["resourceType"], r["id"]) for r in victim.all_resources()]

    async def go(node: Node) -> tuple[list[bytes], list[bytes]]:
        await write_bundles(node, bundles)
        # A second version of one of the victim's resources: every version is shredded.
        first = copy.deepcopy(victim.resources[0])
        first["meta"] = {"tag": [{"code": "v2"}]}
        await node.records.update(first["resourceType"], first["id"], first)
        rows = [row for t, i in victim_refs for row in node.index.history(t, i)]
        assert len(rows) == len(victim_refs) + 1
        blob_hashes = [r.blob_hash for r in rows]
        wrapped = [r.wrapped_dek for r in rows if r.wrapped_dek is not None]
        assert len(wrapped) == len(rows)
        mrn = victim.patient["identifier"][0]["value"]
        assert [s.id for s in await node.records.search("Patient", {"identifier": [mrn]})] == [
            victim.patient_id
        ]

        erased = await node.records.erase_patient(victim.patient_id)
        assert erased == len(victim_refs)

        for rtype, rid in victim_refs:
            with pytest.raises(Gone):
                await node.records.read(rtype, rid)
            with pytest.raises(Gone):
                await node.records.vread(rtype, rid, 1)
            history = await node.records.history(rtype, rid)
            assert history and all(v.stored is None for v in history)
        assert await node.records.search("Patient", {"identifier": [mrn]}) == []
        for rtype in {t for t, _ in victim_refs} - {"Patient"}:
            assert await node.records.search(rtype, {"patient": [victim.patient_id]}) == []
        found = {s.id for s in await node.records.search("Patient", {})}
        assert found == {b.patient_id for b in others}
        for b in others:
            for r in b.all_resources():
                stored = await node.records.read(r["resourceType"], r["id"])
                assert content(stored.data) == plain(r)
            obs = await node.records.search("Observation", {"patient": [b.patient_id]})
            assert len(obs) == sum(r["resourceType"] == "Observation" for r in b.resources)
        with pytest.raises(NotFound):
            await node.records.erase_patient(victim.patient_id)
        return blob_hashes, wrapped

    blob_hashes, wrapped = run(root, go)

    # Ciphertexts are gone; other patients' blobs are not.
    for h in blob_hashes:
        assert not blob_path(root, h).exists()
    assert len(blob_names(root)) == sum(len(b.all_resources()) for b in others)
    # Wrapped data keys are NULL in the index, and their old bytes are nowhere on disk.
    conn = sqlite3.connect(f"file:{root / 'records.db'}?mode=ro", uri=True)
    try:
        for rtype, rid in victim_refs:
            rows = conn.execute(
                "SELECT wrapped_dek, kek_id, erased FROM versions WHERE rtype = ? AND rid = ?",
                (rtype, rid),
            ).fetchall()
            assert rows and all(r == (None, None, 1) for r in rows), (rtype, rid, rows)
            assert conn.execute(
                "SELECT COUNT(*) FROM tokens WHERE rtype = ? AND rid = ?", (rtype, rid)
            ).fetchone() == (0,)
    finally:
        conn.close()
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for key in wrapped:
        leaks = [str(p) for p, data in files.items() if key in data]
        assert leaks == [], "shredded data key still on disk"
    assert scan_for_plaintext(root, phi_needles(bundles)) == []

    txs = chain_txs(root)
    tombstones = [t for t in txs if t["type"] == "record.erase"]
    assert len(tombstones) == len(victim_refs)
    assert sum(t["body"]["versions"] for t in tombstones) == len(victim_refs) + 1
    puts = {t["body"]["ref"]: t["body"]["patient"] for t in txs if t["type"] == "record.put"}
    pseudonyms = {t["body"]["patient"] for t in tombstones}
    assert len(pseudonyms) == 1 and None not in pseudonyms
    assert {t["body"]["ref"] for t in tombstones} <= set(puts)
    assert all(puts[t["body"]["ref"]] in pseudonyms for t in tombstones)
    text = json.dumps(tombstones)
    assert victim.patient_id not in text
    assert victim.patient["name"][0]["family"] not in text
    verify(root)

    async def after_reopen(node: Node) -> None:
        with pytest.raises(Gone):
            await node.records.read("Patient", victim.patient_id)

    run(root, after_reopen)


def test_erase_single_resource(tmp_path: Path) -> None:
    root = new_node(tmp_path / "n")
    bundle = generate_patient(0, seed=41, resources_per_patient=5)
    target = bundle.resources[2]
    rtype, rid = target["resourceType"], target["id"]

    async def go(node: Node) -> None:
        await write_bundles(node, [bundle])
        second = copy.deepcopy(target)
        second["meta"] = {"tag": [{"code": "v2"}]}
        await node.records.update(rtype, rid, second)
        hashes = [r.blob_hash for r in node.index.history(rtype, rid)]
        assert await node.records.erase(rtype, rid) == 2
        for h in hashes:
            assert not blob_path(root, h).exists()
        with pytest.raises(Gone):
            await node.records.read(rtype, rid)
        for v in (1, 2):
            with pytest.raises(Gone):
                await node.records.vread(rtype, rid, v)
        with pytest.raises(Gone):
            await node.records.erase(rtype, rid)
        with pytest.raises(NotFound) as exc:
            await node.records.erase(rtype, "does-not-exist")
        assert type(exc.value) is NotFound
        with pytest.raises(NotFound) as exc:
            await node.records.erase_patient("nobody")
        assert type(exc.value) is NotFound
        with pytest.raises(FhirInvalid):
            await node.records.erase(rtype, "bad/id")
        # Everything else of the patient is untouched.
        for r in bundle.all_resources():
            if r is not target:
                stored = await node.records.read(r["resourceType"], r["id"])
                assert content(stored.data) == plain(r)
        assert rid not in {s.id for s in await node.records.search(rtype, {})}

    run(root, go)
    tombstones = [t for t in chain_txs(root) if t["type"] == "record.erase"]
    assert len(tombstones) == 1 and tombstones[0]["body"]["versions"] == 2
    assert tombstones[0]["body"]["resource_type"] == rtype
    verify(root)


def test_reprs_hide_the_data_key_and_the_plaintext() -> None:
    """A record's data key and decrypted resource never reach a repr (so never a log line)."""
    dek = bytes(range(32))
    phi = b'{"resourceType":"Patient","name":[{"family":"Reprtest-Lastname"}]}'
    row = VersionRow(
        resource_type="Patient",
        id="p1",
        version=1,
        blob_hash=bytes(32),
        wrapped_dek=b"wrapped",
        kek_id="k1",
        patient=None,
        updated_ms=0,
        tx_hash=bytes(32),
    )
    sealed = SealedVersion(row=row, blob=b"ciphertext", dek=dek, tx_data=b"{}")
    stored = StoredResource(
        resource_type="Patient",
        id="p1",
        version=1,
        last_updated="2024-01-01T00:00:00.000Z",
        data=phi,
        tx_hash=bytes(32),
    )
    assert sealed.dek == dek and stored.data == phi  # still there for the code that needs it
    for text in (repr(sealed), str(sealed)):
        assert repr(dek) not in text and dek.hex() not in text and ", dek=" not in text
    for text in (repr(stored), str(stored)):
        assert "Reprtest" not in text and "data=" not in text and "p1" in text


def test_search_and_history_decrypt_off_the_event_loop(tmp_path: Path) -> None:
    """Issue #14 item 6: index look-ups and decryption of a search or a history run in a
    worker thread, so one expensive query does not stall every other request; a search
    page decrypts only the resources it shows."""
    root = new_node(tmp_path / "n")

    async def go(node: Node) -> None:
        for n in range(5):
            await node.records.update(
                "Patient", f"p{n}", {"resourceType": "Patient", "id": f"p{n}", "gender": "other"}
            )
        loop_thread = threading.get_ident()
        index_threads: list[int] = []
        opened: list[tuple[int, str]] = []
        search_index, open_row = node.index.search, node.records.reader.open

        def spying_search(rtype: str, groups: list[set[bytes]]) -> list[str]:
            index_threads.append(threading.get_ident())
            return search_index(rtype, groups)

        def spying_open(row: VersionRow) -> StoredResource:
            opened.append((threading.get_ident(), row.id))
            return open_row(row)

        node.index.search = spying_search  # type: ignore[method-assign]
        node.records.reader.open = spying_open  # type: ignore[method-assign]
        total, page = await node.records.search_page("Patient", {"gender": ["other"]}, 1, 2)
        assert total == 5 and [s.id for s in page] == ["p1", "p2"]
        assert index_threads and loop_thread not in index_threads
        assert [rid for _, rid in opened] == ["p1", "p2"]  # the page only
        opened.clear()
        assert len(await node.records.history("Patient", "p3")) == 1
        assert len(await node.records.type_history("Patient", 10)) == 5
        assert len(opened) == 6 and all(thread != loop_thread for thread, _ in opened)

    run(root, go)
