"""The store's health over HTTP: a lost blob answers 500 "store damaged" (never 404) and is
counted in /metrics; /readyz answers 503 with the reason while the disk is full or the scrub
has found damage, and 200 again once it is resolved."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from api_helpers import LiveServer, post_json, serving

PATIENT = {"resourceType": "Patient", "name": [{"family": "Qwertzuiop"}], "gender": "female"}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    with serving(tmp_path / "node") as server:
        yield server


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exposed")


def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def blob_of(live: LiveServer, rid: str) -> Path:
    row = live.node.index.latest("Patient", rid)
    assert row is not None
    return live.root / "blobs" / row.blob_hash.hex()[:2] / row.blob_hash.hex()


def test_a_lost_blob_is_a_counted_500_not_a_404(live: LiveServer) -> None:
    with live.client(live.clinician) as client:
        created = post_json(client, "/fhir/Patient", PATIENT)
        assert created.status_code == 201
        rid = created.json()["id"]
        assert metric(client, "medledger_integrity_errors_total") == 0
        blob_of(live, rid).unlink()
        for path in (f"/fhir/Patient/{rid}", f"/fhir/Patient/{rid}/_history/1"):
            answer = client.get(path)
            assert answer.status_code == 500
            outcome = answer.json()
            assert outcome["resourceType"] == "OperationOutcome"
            diagnostics = outcome["issue"][0]["diagnostics"]
            assert "store is damaged" in diagnostics and "blob is missing" in diagnostics
            assert "Qwertzuiop" not in answer.text
        assert client.get("/fhir/Patient/never-written").status_code == 404
        assert metric(client, "medledger_integrity_errors_total") == 2


def test_readyz_tells_the_truth_about_damage(live: LiveServer) -> None:
    with live.client(live.clinician) as client:
        rid = post_json(client, "/fhir/Patient", PATIENT).json()["id"]
        assert client.get("/readyz").status_code == 200
        assert metric(client, "medledger_store_ready") == 1
        path = blob_of(live, rid)
        saved = path.read_bytes()
        path.unlink()

        async def start_scrub() -> None:
            live.node.start_store_scrub(interval_s=0.05, rows_per_s=10_000)

        live.run(start_scrub())
        until(lambda: client.get("/readyz").status_code == 503)
        body = client.get("/readyz").json()
        assert body["status"] == "unhealthy"
        assert "store is damaged" in body["problems"]["record-store"]
        assert "disk" not in body["problems"]
        assert metric(client, "medledger_store_problems") == 1
        assert metric(client, "medledger_store_ready") == 0
        path.write_bytes(saved)
        until(lambda: client.get("/readyz").status_code == 200)
        assert metric(client, "medledger_store_problems") == 0


def test_readyz_is_503_while_the_disk_is_full(live: LiveServer) -> None:
    health = live.node.store_health
    free = health.free_bytes()
    assert free is not None
    with live.client() as client:
        assert client.get("/readyz").status_code == 200
        health.min_free_bytes = free * 4 + 2**40  # more than this disk will ever have free
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert "disk is full" in answer.json()["problems"]["disk"]
        health.min_free_bytes = 0
        assert client.get("/readyz").status_code == 200
